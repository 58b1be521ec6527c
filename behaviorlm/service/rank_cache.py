"""Known users' ranked lists, kept so that a repeat request skips the model and the batcher.

A known user's history is part of the model version being served: it changes only when a new
version is loaded (a hot reload builds a new :class:`~behaviorlm.service.online.OnlineRecommender`,
and with it a new, empty cache), so their top-k is a pure function of (user, ``exclude_seen``,
``k``) until then. The cache holds the deepest list computed per (user, ``exclude_seen``) and
answers any request for as many items or fewer by slicing it -- a top-10 is the first ten of a
top-20. Every entry also carries the history it was ranked from (its length and newest event
time), checked on every hit, so a history that changed under the same row is ranked again, never
served stale.

What is not cached: requests with an allow-list (their answers differ by list), raw-event requests
(their history is the body) and a request-time model (its ranking moves with the clock).

Bounded: least recently used entries leave first. Reads happen on the event loop and writes on
the batcher's thread, so a lock guards the dictionary (an uncontended lock costs ~0.1 us).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

#: entries kept by default: ~0.5 kB each for a top-10 (ids, scores, keys)
DEFAULT_ENTRIES = 100_000

#: the history a list was ranked from: (number of events, newest event time or None)
Stamp = tuple[int, float | None]


@dataclass(frozen=True)
class CachedList:
    """One user's ranked list: ``item_ids`` and ``scores`` best first, as deep as it was asked."""

    item_ids: tuple[Any, ...]
    scores: tuple[float, ...]
    stamp: Stamp
    depth: int  # the k it was computed for (it may hold fewer items: everything else masked)

    def first(self, k: int) -> tuple[list[Any], list[float]]:
        return list(self.item_ids[:k]), list(self.scores[:k])


class RankCache:
    """A bounded LRU of :class:`CachedList` per (known row, ``exclude_seen``), with hit counts."""

    def __init__(self, max_entries: int = DEFAULT_ENTRIES):
        if max_entries < 0:
            raise ValueError(f"max_entries must be >= 0, got {max_entries}")
        self.max_entries = max_entries
        self._lists: OrderedDict[tuple[int, bool], CachedList] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def __len__(self) -> int:
        return len(self._lists)

    def get(self, row: int, exclude_seen: bool, k: int, stamp: Stamp) -> CachedList | None:
        """The entry that answers a top-``k`` for this row and history, or ``None`` (a miss)."""
        if not self.enabled:
            return None
        key = (row, exclude_seen)
        with self._lock:
            entry = self._lists.get(key)
            if entry is None or entry.depth < k or entry.stamp != stamp:
                self.misses += 1
                return None
            self._lists.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, row: int, exclude_seen: bool, entry: CachedList) -> None:
        """Keep ``entry`` unless a deeper list for the same history is already held."""
        if not self.enabled:
            return
        key = (row, exclude_seen)
        with self._lock:
            held = self._lists.get(key)
            if held is not None and held.stamp == entry.stamp and held.depth > entry.depth:
                return
            self._lists[key] = entry
            self._lists.move_to_end(key)
            while len(self._lists) > self.max_entries:
                self._lists.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._lists.clear()
