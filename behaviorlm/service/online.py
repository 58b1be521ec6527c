"""Low-latency, one-user-at-a-time inference for the online service.

:meth:`BehaviorLM.recommend` is built for batches: every call filters the stored histories and
re-encodes them with polars, a few milliseconds that dominate a single-user request. Here
the known users' sequences are encoded once at start-up and requests are answered with a
single padded forward pass, batched across whatever requests are waiting (:class:`MicroBatcher`),
so throughput grows with concurrency while an idle server answers at once.

Rankings equal :meth:`BehaviorLM.recommend` (tested): both call the same
:class:`~behaviorlm.inference.engine.InferenceEngine` for the forward pass, the marginal over
actions, the masks and the top-k; only the per-request bookkeeping lives here.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import torch

from behaviorlm.data.events import Events, EventsError
from behaviorlm.inference.engine import InferenceEngine
from behaviorlm.sequence.tokenizer import N_SPECIAL, EncodedSequences
from behaviorlm.service.rank_cache import DEFAULT_ENTRIES, CachedList, RankCache, Stamp
from behaviorlm.service.request_events import EncodedRequest


@dataclass
class Query:
    """One user's input sequence (vocabulary indices) and what to return for it."""

    user_id: Any
    items: np.ndarray
    actions: np.ndarray
    gaps: np.ndarray
    seen: np.ndarray  # vocabulary indices of the items in the user's history
    k: int = 10
    exclude_seen: bool = True
    allowed: np.ndarray | None = None  # vocabulary indices, or None for the whole catalog
    known_row: int = -1  # row of a user seen at fit time (their hidden state can be cached)
    new_codes: np.ndarray | None = None  # per position: code of an item outside the vocabulary, else -1
    new_ids: Any = None  # code -> original id (a sequence), for the items a repeat-aware model may return
    last_time: float | None = None  # the newest event's time (epoch seconds): a request-time model reads it

    def has_known_items(self) -> bool:
        return bool((self.items >= N_SPECIAL).any())


@dataclass
class Ranked:
    user_id: Any
    item_ids: list[Any]
    scores: list[float]


class OnlineRecommender:
    """An inference engine with the known users' histories pre-encoded for per-request inference.

    ``rank_cache``: how many known users' ranked lists to keep (:mod:`~behaviorlm.service.rank_cache`;
    0 turns it off); a request-time model keeps none.
    """

    def __init__(
        self, engine: InferenceEngine, histories: Events, seen: pl.DataFrame, rank_cache: int = DEFAULT_ENTRIES
    ):
        self.engine = engine
        self.tok = engine.tokenizer
        enc = engine.encode(histories)
        self.enc_ = enc
        self.rows_ = {self._key(u): i for i, u in enumerate(enc.user_ids)}
        # the known users' items outside the vocabulary, as an array: a query indexes it directly
        # (a polars Series per query cost ~130 us once known histories hold new items)
        self.new_ids_ = None if enc.new_ids is None else np.array(enc.new_ids.to_list(), dtype=object)
        rows, cols = engine.seen_pairs(seen, enc.user_ids)
        cuts = np.searchsorted(rows, np.arange(len(enc) + 1))
        self.seen_ = [cols[cuts[i] : cuts[i + 1]] for i in range(len(enc))]
        # A known user's history is fixed, so is their last hidden state: computed on first
        # request, then only the output layer runs (exact, not an approximation). Not for a
        # request-time model, whose state moves with the clock.
        self.cache_states_ = engine.time_context != "request"
        self.hidden_ = torch.zeros(len(enc), engine.state_width)
        self.action_logp_ = torch.zeros(len(enc), self.tok.n_actions)
        self.cached_ = np.zeros(len(enc), dtype=bool)
        self.ranks_ = RankCache(rank_cache if self.cache_states_ else 0)

    @classmethod
    def from_model(cls, model: Any, rank_cache: int = DEFAULT_ENTRIES) -> OnlineRecommender:
        """From a fitted :class:`~behaviorlm.recommender.BehaviorLM`: its engine and known users."""
        return cls(model.engine, model.history_events(), model.seen_, rank_cache)

    @staticmethod
    def _key(user_id: Any) -> str:
        return str(user_id)

    def knows(self, user_id: Any) -> bool:
        return self._key(user_id) in self.rows_

    def query_for_user(self, user_id: Any, **opts: Any) -> Query:
        """The stored history of a user seen at fit time; ``KeyError`` for anyone else."""
        row = self.rows_[self._key(user_id)]
        items, actions, gaps = self.enc_.sequence(row)
        codes = _codes(self.enc_, row)
        return Query(
            self.enc_.user_ids[row],
            items,
            actions,
            gaps,
            self.seen_[row],
            known_row=row,
            **opts,
            new_codes=codes,
            new_ids=self.new_ids_,
            last_time=_last_time(self.enc_, row),
        )

    def cached(self, user_id: Any, k: int, exclude_seen: bool) -> Ranked | None:
        """A known user's top-``k`` from the rank cache (no allow-list), or ``None``: not known,
        not cached yet, or ranked from another history."""
        row = self.rows_.get(self._key(user_id))
        if row is None:
            return None
        entry = self.ranks_.get(row, exclude_seen, k, self._stamp(row))
        if entry is None:
            return None
        return Ranked(self.enc_.user_ids[row], *entry.first(k))

    def _stamp(self, row: int) -> Stamp:
        """The history a known row is ranked from: its length and newest event time."""
        return int(self.enc_.offsets[row + 1] - self.enc_.offsets[row]), _last_time(self.enc_, row)

    def _remember(self, q: Query, ranked: Ranked) -> None:
        """Keep a known user's list in the rank cache (allow-listed answers are not reusable)."""
        if q.known_row >= 0 and q.allowed is None and self.ranks_.enabled:
            entry = CachedList(tuple(ranked.item_ids), tuple(ranked.scores), self._stamp(q.known_row), q.k)
            self.ranks_.put(q.known_row, q.exclude_seen, entry)

    def query_for_events(self, user_id: Any, events: Events, **opts: Any) -> Query:
        """Raw recent events of one user (validated :class:`Events`), encoded on the fly."""
        enc = self.engine.encode(events)
        if len(enc) != 1:
            raise EventsError(f"events must belong to exactly one user, got {len(enc)}")
        items, actions, gaps = enc.sequence(0)
        seen = self.tok.item_index(events.df["item_id"].unique())
        return Query(
            user_id,
            items,
            actions,
            gaps,
            seen[seen >= N_SPECIAL],
            **opts,
            new_codes=_codes(enc, 0),
            new_ids=enc.new_ids,
            last_time=_last_time(enc, 0),
        )

    def query_for_request(self, user_id: Any, enc: EncodedRequest, **opts: Any) -> Query:
        """Raw recent events already read by the lean path (:mod:`behaviorlm.service.request_events`)."""
        return Query(
            user_id, enc.items, enc.actions, enc.gaps, enc.seen, **opts, new_codes=enc.new_codes, new_ids=enc.new_ids,
            last_time=enc.last_time,
        )  # fmt: skip

    def allowed_index(self, item_ids: Sequence[Any]) -> np.ndarray:
        idx = self.tok.item_index(list(item_ids))
        return np.unique(idx[idx >= N_SPECIAL])

    @torch.inference_mode()
    def recommend(self, queries: list[Query]) -> list[Ranked]:
        """Top-k for each query from one padded forward pass over those not cached."""
        h, a_logp = self._heads(queries)
        seen = _seen_pairs(queries)
        k = max(q.k for q in queries)
        new_items = self._new_items(queries, h)
        val, idx = self.engine.rank(h, a_logp, slice(0, len(queries)), k, seen, self._allowed(queries), None, new_items)
        out = [self._ranked(q, val[r, : q.k], idx[r, : q.k]) for r, q in enumerate(queries)]
        for q, ranked in zip(queries, out, strict=True):
            self._remember(q, ranked)
        return out

    def _new_items(self, queries: list[Query], h: torch.Tensor) -> bool:
        """Whether new context items may be returned (a repeat-aware model, seen items kept);
        rows that exclude seen items lose their new items' names in ``h``, in place."""
        layout = self.engine.network.state_layout
        if layout is None:
            return False
        excluded = torch.tensor([q.exclude_seen for q in queries])
        if excluded.any():
            h[excluded] = layout.without_new_items(h[excluded], self.tok.n_items)
        return not bool(excluded.all())

    def _allowed(self, queries: list[Query]) -> torch.Tensor | None:
        """One allow-list row per query (the whole catalog where a query has none)."""
        if all(q.allowed is None for q in queries):
            return None
        mask = torch.ones(len(queries), self.tok.n_items, dtype=torch.bool)
        for r, q in enumerate(queries):
            if q.allowed is not None:
                mask[r] = False
                mask[r, torch.from_numpy(q.allowed)] = True
        return mask

    def _ranked(self, q: Query, val: torch.Tensor, idx: torch.Tensor) -> Ranked:
        ok = torch.isfinite(val)
        codes = None if q.new_codes is None else q.new_codes[None, :]
        kept = self.engine.codes_of_new(idx[ok].numpy()[None, :], codes)[0]
        new_ids = q.new_ids if q.new_ids is None or isinstance(q.new_ids, np.ndarray) else pl.Series(q.new_ids)
        ids = self.engine.decode(kept, new_ids)
        return Ranked(q.user_id, ids, val[ok].exp().tolist())

    def _heads(self, queries: list[Query]) -> tuple[torch.Tensor, torch.Tensor]:
        """Last hidden state and next-action log-probs per query; cached rows skip the transformer."""
        rows = torch.tensor([q.known_row for q in queries])
        hit = (rows >= 0) & torch.from_numpy(self.cached_[rows.clamp(min=0).numpy()])
        h = self.hidden_[rows.clamp(min=0)]
        a_logp = self.action_logp_[rows.clamp(min=0)]
        todo = (~hit).nonzero().flatten()
        if len(todo):
            enc = _stack([queries[i] for i in todo.tolist()])
            h[todo], a_logp[todo] = self.engine.heads(enc, slice(0, len(todo)))
            known = todo[rows[todo] >= 0]
            self.hidden_[rows[known]], self.action_logp_[rows[known]] = h[known], a_logp[known]
            self.cached_[rows[known].numpy()] = self.cache_states_
        return h, a_logp

    def popular(self, k: int, allowed: np.ndarray | None = None) -> Ranked:
        """Cold start: the most popular items (score = training share), as ``recommend`` does."""
        frame = self.engine.popular([None], k, _mask(allowed, self.tok.n_items))
        return Ranked(None, frame["item_id"].to_list(), frame["score"].to_list())


def _seen_pairs(queries: list[Query]) -> tuple[np.ndarray, np.ndarray]:
    """(query row, vocabulary index) of the items to exclude, sorted by row."""
    parts = [(r, q.seen) for r, q in enumerate(queries) if q.exclude_seen and len(q.seen)]
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rows = np.concatenate([np.full(len(s), r, np.int64) for r, s in parts])
    return rows, np.concatenate([s for _, s in parts]).astype(np.int64)


def _mask(allowed: np.ndarray | None, n: int) -> torch.Tensor | None:
    if allowed is None:
        return None
    m = torch.zeros(n, dtype=torch.bool)
    m[torch.from_numpy(allowed)] = True
    return m


def _stack(queries: list[Query]) -> EncodedSequences:
    lens = np.array([len(q.items) for q in queries], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    cat = lambda name: np.concatenate([getattr(q, name) for q in queries])  # noqa: E731
    # codes name new items within each row only (first positions): no need to make them unique
    codes = np.concatenate([q.new_codes if q.new_codes is not None else np.full(len(q.items), -1) for q in queries])
    enc = EncodedSequences([q.user_id for q in queries], offsets, cat("items"), cat("actions"), cat("gaps"))
    enc.new_codes = codes.astype(np.int64)
    if all(q.last_time is not None for q in queries):  # asked now (the engine's default request time)
        enc.last_times = np.array([q.last_time for q in queries], np.float64)
    return enc


def _last_time(enc: EncodedSequences, row: int) -> float | None:
    """One sequence's newest event time (epoch seconds), when the encoding kept it."""
    return None if enc.last_times is None else float(enc.last_times[row])


def _codes(enc: EncodedSequences, row: int) -> np.ndarray | None:
    """One sequence's new-item codes (see :attr:`EncodedSequences.new_codes`), or None."""
    if enc.new_codes is None:
        return None
    return enc.new_codes[enc.offsets[row] : enc.offsets[row + 1]]


class MicroBatcher:
    """Runs ``fn(list of inputs) -> list of outputs`` on one worker thread, batching what waits.

    A request that arrives while the worker is busy joins the next batch (up to ``max_batch``),
    so a loaded server does one forward pass per batch instead of per request, and the model
    is only ever used from one thread. No timer: an idle server starts a batch immediately.
    """

    def __init__(
        self,
        fn: Callable[[list[Any]], list[Any]],
        max_batch: int = 32,
        name: str = "batcher",
        on_batch: Callable[[int], Any] | None = None,
    ):
        self.fn, self.max_batch, self.on_batch = fn, max_batch, on_batch
        self._q: queue.SimpleQueue[tuple[Any, Future] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        self.batches, self.items = 0, 0

    def pending(self) -> int:
        """Requests queued and not yet taken into a batch (approximate while the worker runs)."""
        return self._q.qsize()

    def submit(self, item: Any) -> Future:
        fut: Future = Future()
        self._q.put((item, fut))
        return fut

    def stopped(self, timeout: float = 0.0) -> bool:
        """Whether the worker thread has ended (waiting up to ``timeout`` seconds for it)."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def close(self, wait: bool = True) -> None:
        """Stop after the requests already queued (their answers still arrive)."""
        self._q.put(None)
        if wait:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            first = self._q.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._q.put(None)
                    break
                batch.append(nxt)
            self._run(batch)

    def _run(self, batch: list[tuple[Any, Future]]) -> None:
        self.batches, self.items = self.batches + 1, self.items + len(batch)
        if self.on_batch is not None:
            self.on_batch(len(batch))
        try:
            results = self.fn([item for item, _ in batch])
        except Exception as e:  # one bad batch fails its requests, not the worker
            for _, fut in batch:
                fut.set_exception(e)
            return
        for (_, fut), res in zip(batch, results, strict=True):
            fut.set_result(res)


def ranked_frame(ranked: Ranked, user_id: Any) -> pl.DataFrame:
    """``user_id, item_id, score, rank`` for explanations and tests."""
    n = len(ranked.item_ids)
    return pl.DataFrame(
        {
            "user_id": [user_id] * n,
            "item_id": ranked.item_ids,
            "score": ranked.scores,
            "rank": list(range(1, n + 1)),
        }
    )
