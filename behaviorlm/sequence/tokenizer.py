"""ActionTokenizer: validated events -> per-user token sequences, and back.

Representation: **factorised** tokens. Each position carries three ids -- item, action type and
a log-scale time-gap bucket -- whose embeddings the model sums. The alternative, one
composite token per (item, action) pair, was measured and rejected
(``benchmarks/tokenizer_choice.py``, figures in ``benchmarks/RESULTS.md``):

* cutting each multi-action dataset at its 80% time quantile, the share of later *purchase*
  events whose token was never seen before the cut is 94.4% composite vs 65.0% factorised on
  Taobao, 66.7% vs 5.6% on REES46 and 98.1% vs 69.7% on Tmall: a composite (item, buy) token
  is UNK even for an item the user viewed many times, exactly the signal purchase prediction
  needs. The composite vocabulary is also larger (49,323 vs 45,425 on Taobao);
* a composite output softmax splits each item's probability over its action variants, so
  "recommend items" needs a marginalisation the factorised model gets for free:
  ``P(action, item) = P(action) * P(item | action)``, which the model computes with an action
  head and an item head conditioned on the next action.

Special item tokens are ``[PAD]=0, [BOS]=1, [UNK]=2, [MASK]=3``; items follow from index 4 in
order of first appearance in training (stable across reruns of the same data). Action ids use
the same four specials. Time-gap ids: 0 = pad, 1 = no previous event (BOS and first event),
2.. = ``floor(log2(1 + seconds))`` buckets, capped.

Side features, both optional and both vocabularies saved with the tokenizer:

* **per-event values** (``value_buckets > 0``): each of the events' ``amount`` and ``quantity``
  is cut into quantile buckets learned in training (id 0 = unknown, so BOS, the propensity query
  and events without a value share it). They travel *packed into the time-gap id* --
  ``gap + n_gaps * (b_amount + n_amount * b_quantity)`` -- so every batch, engine and exported
  graph carries them without a fourth tensor; the model unpacks the id and sums one embedding
  per part (:meth:`BehaviorTransformer.context_vectors`).
* **item side features** (``side_columns``, e.g. category and brand from the item table): a
  vocabulary per column (id 0 = none, for the special tokens; 1 = ``[UNK]``, an item without a
  known value) and the id of each item's value; the model adds that value's embedding to the
  item's, in the input and in the tied output matrix, so an item seen once borrows strength
  from its category.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from behaviorlm.data.events import Events, EventsError, require_events
from behaviorlm.data.ids import index_of
from behaviorlm.data.io import write_text_atomic
from behaviorlm.data.timestamps import to_utc, unix_micros
from behaviorlm.errors import ConfigurationError, InputDataError, ModelFormatError, NotFittedError

SPECIAL_TOKENS = ("[PAD]", "[BOS]", "[UNK]", "[MASK]")
PAD, BOS, UNK, MASK = range(4)
N_SPECIAL = len(SPECIAL_TOKENS)
GAP_NONE = 1  # "no previous event": the BOS position and each user's first event
FORMAT_VERSION = 1
VALUE_COLUMNS = ("amount", "quantity")  # the per-event numbers a tokenizer can bucket
SIDE_NONE, SIDE_UNK = 0, 1  # side-feature ids of the special tokens and of unknown values


@dataclass
class EncodedSequences:
    """Token sequences of many users, stored flat (CSR style) to stay compact for 1M+ events.

    User ``u``'s tokens are ``items[offsets[u]:offsets[u+1]]`` (likewise actions, gaps); each
    sequence starts with BOS when it still holds the user's first event.
    """

    user_ids: list[Any]
    offsets: np.ndarray
    items: np.ndarray
    actions: np.ndarray
    gaps: np.ndarray
    #: per position, the code of an item outside the vocabulary (an index into ``new_ids``), else -1:
    #: what lets a repeat-aware model return a new item the user just touched (encoded from events only)
    new_codes: np.ndarray | None = None
    new_ids: pl.Series | None = None  # code -> original item id
    #: per user, the time of their last event (epoch seconds; filled by :meth:`ActionTokenizer.encode`)
    #: and the time the prediction is asked for (``None``: now) -- what a request-time model reads
    last_times: np.ndarray | None = None
    request_times: np.ndarray | None = None

    @classmethod
    def empty(cls) -> EncodedSequences:
        z = np.zeros(0, np.int64)
        return cls([], np.zeros(1, np.int64), z, z, z)

    def __len__(self) -> int:
        return len(self.user_ids)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, u: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s, e = self.offsets[u], self.offsets[u + 1]
        return self.items[s:e], self.actions[s:e], self.gaps[s:e]

    def padded(self, rows: slice | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Right-padded ``(items, actions, gaps)`` arrays for some users (a slice or an index
        array), plus each row's last real position -- the one batch layout every model call uses."""
        part = self.lengths()[rows]
        width = int(part.max())
        starts = self.offsets[:-1][rows]
        idx = starts[:, None] + np.arange(width)[None, :]
        valid = np.arange(width)[None, :] < part[:, None]
        idx = np.where(valid, idx, 0)
        items, actions, gaps = (np.where(valid, a[idx], PAD) for a in (self.items, self.actions, self.gaps))
        return items, actions, gaps, part - 1

    def subset(self, rows: np.ndarray | list[int]) -> EncodedSequences:
        rows = np.asarray(rows, dtype=np.int64)
        starts = np.asarray(self.offsets, np.int64)
        idx, offsets = concat_ranges(starts[rows], starts[rows + 1])
        return EncodedSequences(
            user_ids=[self.user_ids[r] for r in rows],
            offsets=offsets,
            items=self.items[idx],
            actions=self.actions[idx],
            gaps=self.gaps[idx],
            new_codes=None if self.new_codes is None else self.new_codes[idx],
            new_ids=self.new_ids,
            last_times=None if self.last_times is None else self.last_times[rows],
            request_times=None if self.request_times is None else self.request_times[rows],
        )

    def newest(self, rows: np.ndarray, max_len: int) -> EncodedSequences:
        """Some users' newest ``max_len`` tokens (what a model reads of a long history), in
        ``rows`` order; user ids are the row numbers (callers name them)."""
        rows = np.asarray(rows, dtype=np.int64)
        lo, hi = self.offsets[rows].astype(np.int64), self.offsets[rows + 1].astype(np.int64)
        flat, offsets = concat_ranges(np.maximum(lo, hi - max_len), hi)
        items, actions, gaps = (np.asarray(getattr(self, f)[flat], np.int64) for f in ("items", "actions", "gaps"))
        return EncodedSequences(list(range(len(rows))), offsets, items, actions, gaps)

    def padded_new_codes(self, rows: slice | np.ndarray) -> np.ndarray | None:
        """:attr:`new_codes` in the layout of :meth:`padded` (-1 on padding), or None."""
        if self.new_codes is None:
            return None
        part = self.lengths()[rows]
        idx = self.offsets[:-1][rows][:, None] + np.arange(int(part.max()))[None, :]
        valid = np.arange(int(part.max()))[None, :] < part[:, None]
        return np.where(valid, self.new_codes[np.where(valid, idx, 0)], -1)


def with_request_times(enc: EncodedSequences, as_of: Any) -> EncodedSequences:
    """``enc`` with each user's request time set from ``as_of`` -- one time (a datetime, date,
    ISO string or unix time) or a ``{user_id: time}`` mapping covering every user -- or left
    unset (``None``: now, read when scored). A time before a user's last event is refused: those
    events would be the future of the request."""
    if as_of is None or not len(enc):
        return enc
    if isinstance(as_of, Mapping):
        missing = [u for u in enc.user_ids if u not in as_of]
        if missing:
            raise InputDataError(f"as_of gives no request time for {len(missing)} user(s), e.g. {missing[0]!r}")
        times = np.array([unix_micros(to_utc(as_of[u], "as_of")) for u in enc.user_ids], np.float64) / 1e6
    else:
        times = np.full(len(enc), unix_micros(to_utc(as_of, "as_of")) / 1e6)
    if enc.last_times is not None:
        early = np.flatnonzero(times < enc.last_times)
        if len(early):
            u = early[0]
            raise InputDataError(
                f"as_of is before the last event of {len(early)} user(s), e.g. user {enc.user_ids[u]!r} "
                f"(last event at unix time {enc.last_times[u]:.0f}, as_of {times[u]:.0f}): pass only events "
                "before the request time",
                cli_hint="--as-of must not precede any scored user's last event",
            )
    return replace(enc, request_times=times)


class ActionTokenizer:
    """Fit vocabularies on events; encode any user's raw events; save/load as JSON.

    Parameters
    ----------
    max_len: tokens kept per user at inference (the most recent ones, BOS included).
    min_item_count: items seen fewer times in training become ``[UNK]``.
    n_time_buckets: number of log2 time-gap buckets (24 covers gaps up to ~194 days).
    """

    def __init__(
        self,
        max_len: int = 200,
        min_item_count: int = 1,
        n_time_buckets: int = 24,
        value_buckets: int = 0,
        side_columns: tuple[str, ...] = (),
    ):
        if max_len < 2:
            raise ConfigurationError(f"max_len must be >= 2, got {max_len}")
        if min_item_count < 1:
            raise ConfigurationError(f"min_item_count must be >= 1, got {min_item_count}")
        if value_buckets < 0 or value_buckets == 1:
            raise ConfigurationError(f"value_buckets must be 0 (off) or >= 2, got {value_buckets}")
        self.max_len = max_len
        self.min_item_count = min_item_count
        self.n_time_buckets = n_time_buckets
        self.value_buckets = value_buckets
        self.side_columns = tuple(side_columns)
        self.value_edges_: dict[str, list[float]] = {}
        self.side_vocab_: dict[str, list[Any]] = {}
        self.item_sides_ = np.zeros((0, 0), np.int64)

    # ------------------------------------------------------------------ fit
    def fit(self, events: Events, items: pl.DataFrame | None = None) -> ActionTokenizer:
        """Vocabularies of ``events``; with ``items`` (``item_id`` + the ``side_columns``) also the
        item side-feature vocabularies. A side column the item table lacks is an error."""
        df = require_events(events).df
        counts = _item_counts(df).filter(pl.col("n") >= self.min_item_count)
        if counts.height == 0:
            raise EventsError(f"no item occurs at least min_item_count={self.min_item_count} times")
        item_dtype = "int" if df["item_id"].dtype.is_integer() else "str"
        actions = sorted(df["event_type"].unique().to_list())
        self._set_vocabulary(item_dtype, counts["item_id"].to_list(), counts["n"].to_list(), actions)
        self.value_edges_ = _value_edges(df, self.value_buckets) if self.value_buckets else {}
        if self.side_columns:
            self._fit_sides(items)
        return self

    def _fit_sides(self, items: pl.DataFrame | None) -> None:
        """Each side column's values, most frequent among the vocabulary's items first."""
        missing = [c for c in self.side_columns if items is None or c not in items.columns]
        if missing:
            have = [] if items is None else items.columns
            raise EventsError(f"side features {missing} need an item table with those columns (it has {have})")
        assert items is not None
        table = self._item_table(items)
        self.side_vocab_ = {}
        for col in self.side_columns:
            values = table[col].drop_nulls().value_counts(sort=True, name="n").sort("n", col, descending=[True, False])
            self.side_vocab_[col] = values[col].to_list()
        self.item_sides_ = self._side_ids(table)

    def _item_table(self, items: pl.DataFrame) -> pl.DataFrame:
        """The side columns of each vocabulary item, in vocabulary order (null where unknown)."""
        ids = pl.DataFrame({"item_id": pl.Series(self.items_, dtype=self.item_polars_dtype)})
        meta = items.select(pl.col("item_id").cast(self.item_polars_dtype, strict=False), *self.side_columns)
        meta = meta.with_columns(pl.col(c).cast(pl.String) for c in self.side_columns).unique("item_id", keep="first")
        return ids.join(meta, on="item_id", how="left", maintain_order="left")

    def _side_ids(self, table: pl.DataFrame) -> np.ndarray:
        """(n_items incl. specials, n_sides) ids: specials SIDE_NONE, unknown values SIDE_UNK."""
        out = np.full((N_SPECIAL + table.height, len(self.side_columns)), SIDE_NONE, np.int64)
        for k, col in enumerate(self.side_columns):
            vocab = self.side_vocab_[col]
            ids = table[col].replace_strict(
                vocab, np.arange(2, len(vocab) + 2), default=SIDE_UNK, return_dtype=pl.Int64
            )
            out[N_SPECIAL:, k] = ids.to_numpy()
        return out

    @classmethod
    def from_vocabulary(
        cls,
        items: list[Any],
        item_counts: list[int],
        actions: list[str],
        item_dtype: str,
        max_len: int = 200,
        min_item_count: int = 1,
        n_time_buckets: int = 24,
    ) -> ActionTokenizer:
        """A tokenizer from vocabularies counted elsewhere (the streaming ``prepare``), in the
        order :meth:`fit` would give: ``items`` by first appearance, already filtered by count."""
        if not items:
            raise EventsError(f"no item occurs at least min_item_count={min_item_count} times")
        tok = cls(max_len=max_len, min_item_count=min_item_count, n_time_buckets=n_time_buckets)
        return tok._set_vocabulary(item_dtype, list(items), item_counts, sorted(actions))

    def extended(self, events: Events) -> ActionTokenizer:
        """A copy whose vocabulary also covers ``events`` (a new day's log): existing items and
        actions keep their ids, counts add up, and new items (now seen ``min_item_count`` times)
        and new actions are appended -- so a model trained with this tokenizer stays valid."""
        self._check_fitted()
        df = require_events(events).df
        counts = dict(zip(self.items_, self.item_counts_, strict=True))
        added = []
        for item, n in _item_counts(df).select("item_id", "n").iter_rows():
            if item in counts:
                counts[item] += int(n)
            elif n >= self.min_item_count:
                added.append(item)
                counts[item] = int(n)
        items = self.items_ + added
        actions = self.actions_ + sorted(set(df["event_type"].unique().to_list()) - set(self.actions_))
        tok = ActionTokenizer(
            self.max_len, self.min_item_count, self.n_time_buckets, self.value_buckets, self.side_columns
        )
        tok._set_vocabulary(self.item_dtype_, items, [counts[i] for i in items], actions)
        tok.value_edges_, tok.side_vocab_ = self.value_edges_, self.side_vocab_
        if self.side_columns:  # new items: side features unknown (no item table here)
            pad = np.full((len(added), len(self.side_columns)), SIDE_UNK, np.int64)
            tok.item_sides_ = np.concatenate([self.item_sides_, pad])
        return tok

    @property
    def item_polars_dtype(self) -> pl.DataType:
        """The polars type of the original item ids (Int64 or String)."""
        return pl.Int64() if self.item_dtype_ == "int" else pl.String()

    def _set_vocabulary(
        self, item_dtype: str, items: list[Any], item_counts: list[int], actions: list[str]
    ) -> ActionTokenizer:
        """The one place the learned vocabulary is set (fit, from_vocabulary, from_dict)."""
        self.item_dtype_, self.items_ = item_dtype, items
        self.item_counts_ = [int(n) for n in item_counts]
        self.actions_ = list(actions)
        self._build_lookups()
        return self

    def _build_lookups(self) -> None:
        self._item_index = {item: i + N_SPECIAL for i, item in enumerate(self.items_)}
        self._action_index = {a: i + N_SPECIAL for i, a in enumerate(self.actions_)}
        self.item_ids_array_ = np.array(list(SPECIAL_TOKENS) + list(self.items_), dtype=object)
        if self.item_dtype_ == "int":
            self.item_ids_array_ = np.array([-1] * N_SPECIAL + list(self.items_), dtype=np.int64)

    def _check_fitted(self) -> None:
        if not hasattr(self, "items_"):
            raise NotFittedError("ActionTokenizer is not fitted: call fit(events) or load(path)")

    # ------------------------------------------------------------------ sizes
    @property
    def n_items(self) -> int:
        """Size of the item vocabulary, specials included."""
        self._check_fitted()
        return N_SPECIAL + len(self.items_)

    @property
    def n_actions(self) -> int:
        self._check_fitted()
        return N_SPECIAL + len(self.actions_)

    @property
    def n_gaps(self) -> int:
        return 2 + self.n_time_buckets

    @property
    def value_sizes(self) -> tuple[int, ...]:
        """Embedding sizes of the packed per-event value parts (unknown included), in
        :data:`VALUE_COLUMNS` order; empty without value features."""
        return tuple(len(self.value_edges_[c]) + 2 for c in VALUE_COLUMNS if c in self.value_edges_)

    @property
    def side_sizes(self) -> tuple[int, ...]:
        """Vocabulary size of each item side column (none and unknown included)."""
        return tuple(len(self.side_vocab_[c]) + 2 for c in self.side_columns)

    def value_ids(self, df: pl.DataFrame) -> np.ndarray:
        """The packed value part of each event's context id: ``0`` without value features."""
        packed, scale = np.zeros(df.height, np.int64), 1
        for col in (c for c in VALUE_COLUMNS if c in self.value_edges_):
            edges = np.asarray(self.value_edges_[col], np.float64)
            if col in df.columns:
                v = df[col].cast(pl.Float64).to_numpy()
                ids = np.where(np.isnan(v), 0, 1 + np.searchsorted(edges, np.nan_to_num(v), side="right"))
                packed += scale * ids
            scale *= len(edges) + 2
        return packed

    # ------------------------------------------------------------------ encode
    def item_index(self, item_ids: pl.Series | list[Any]) -> np.ndarray:
        """Original item ids -> vocabulary indices; unknown (or uncastable) ids -> UNK
        (the id rules of :mod:`behaviorlm.data.ids`, which the evaluation shares)."""
        self._check_fitted()
        return index_of(item_ids, pl.Series(self.items_, dtype=self.item_polars_dtype), default=UNK, offset=N_SPECIAL)

    def action_index(self, actions: pl.Series | list[str], strict: bool = True) -> np.ndarray:
        """Action names -> ids; with ``strict`` an action unseen in training is an error."""
        self._check_fitted()
        s = actions if isinstance(actions, pl.Series) else pl.Series("event_type", actions, dtype=pl.String)
        if strict:
            unknown = sorted(set(s.unique().to_list()) - set(self.actions_))
            if unknown:
                raise EventsError(
                    f"column 'event_type': action(s) {unknown} were not seen in training; known: {self.actions_}"
                )
        return s.replace_strict(
            self.actions_, np.arange(N_SPECIAL, self.n_actions), default=UNK, return_dtype=pl.Int64
        ).to_numpy(writable=True)

    def gap_bucket(self, seconds: np.ndarray) -> np.ndarray:
        """Log2 buckets of inter-event gaps; negative/NaN (first event) -> GAP_NONE."""
        sec = np.asarray(seconds, dtype=np.float64)
        b = np.floor(np.log2(1.0 + np.clip(np.nan_to_num(sec, nan=0.0), 0, None))).astype(np.int64)
        out = 2 + np.minimum(b, self.n_time_buckets - 1)
        return np.where(np.isnan(sec), GAP_NONE, out)

    def lookup_items(self, item_ids: list[Any]) -> np.ndarray:
        """:meth:`item_index` for a short list in pure Python (the service's per-request path):
        the same answers -- an integer vocabulary matches ints and plainly written integer text
        only, a text vocabulary matches the text of each id -- without building a Series."""
        self._check_fitted()
        get, unk = self._item_index.get, repeat(UNK)
        keys = map(_as_plain_int, item_ids) if self.item_dtype_ == "int" else map(str, item_ids)
        return np.fromiter(map(get, keys, unk), np.int64, len(item_ids))

    def lookup_actions(self, actions: list[str]) -> np.ndarray:
        """:meth:`action_index` (not strict) for a short list of canonical names, in pure Python."""
        self._check_fitted()
        return np.fromiter(map(self._action_index.get, actions, repeat(UNK)), np.int64, len(actions))

    def encode_one(
        self,
        user_id: Any,
        items: np.ndarray,
        actions: np.ndarray,
        seconds: np.ndarray,
        new_codes: np.ndarray | None = None,
    ) -> EncodedSequences:
        """One user's time-sorted events (vocabulary ids and seconds since the previous event,
        NaN for the first; optionally their new-item codes) -> the sequence :meth:`encode`
        builds for them, truncated."""
        self._check_fitted()
        counts = np.array([len(items)], np.int64)
        return self._assemble([user_id], counts, items, actions, self.gap_bucket(seconds), True, new_codes)

    def encode(self, events: Events, truncate: bool = True, strict_actions: bool = False) -> EncodedSequences:
        """Encode every user's events (sorted by time) into BOS-prefixed token sequences.

        ``truncate`` keeps the most recent ``max_len`` tokens per user (inference); training
        uses the full sequences and windows them itself.
        """
        self._check_fitted()
        df = require_events(events).df
        gaps_s = df.select((pl.col("timestamp").diff().over("user_id").dt.total_microseconds() / 1e6).alias("g"))[
            "g"
        ].to_numpy()
        items = self.item_index(df["item_id"])
        codes, new_ids = _new_item_codes(df["item_id"], items == UNK)
        actions = self.action_index(df["event_type"], strict=strict_actions)
        gaps = self.gap_bucket(gaps_s)
        if self.value_edges_:  # the values ride in the gap id (module docstring)
            gaps = gaps + self.n_gaps * self.value_ids(df)
        users = df["user_id"]
        starts = (
            np.flatnonzero(np.r_[True, (users[1:] != users[:-1]).to_numpy()]) if len(users) else np.zeros(0, np.int64)
        )
        user_ids = users.gather(starts).to_list()
        counts = np.diff(np.r_[starts, len(users)])
        enc = self._assemble(user_ids, counts, items, actions, gaps, truncate, codes)
        enc.new_ids = new_ids
        ends = starts + counts - 1
        enc.last_times = df["timestamp"].dt.epoch("us").gather(ends).to_numpy().astype(np.float64) / 1e6
        return enc

    def _assemble(self, user_ids, counts, items, actions, gaps, truncate, codes=None) -> EncodedSequences:
        """Insert BOS before each user's first event and (optionally) keep the newest tokens."""
        n_users = len(counts)
        lens = counts + 1
        bos_pos = np.concatenate([[0], np.cumsum(lens)[:-1]]) if n_users else np.zeros(0, np.int64)
        total = int(lens.sum())
        is_bos = np.zeros(total, dtype=bool)
        is_bos[bos_pos] = True
        out_items = np.full(total, BOS, np.int64)
        out_actions = np.full(total, BOS, np.int64)
        out_gaps = np.full(total, GAP_NONE, np.int64)
        out_items[~is_bos], out_actions[~is_bos], out_gaps[~is_bos] = items, actions, gaps
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        out_codes = None
        if codes is not None:
            out_codes = np.full(total, -1, np.int64)
            out_codes[~is_bos] = codes
        enc = EncodedSequences(list(user_ids), offsets, out_items, out_actions, out_gaps, out_codes)
        if truncate and (lens > self.max_len).any():
            keep, new_offsets = concat_ranges(np.maximum(offsets[:-1], offsets[1:] - self.max_len), offsets[1:])
            kept_codes = None if out_codes is None else out_codes[keep]
            enc = EncodedSequences(
                list(user_ids), new_offsets, out_items[keep], out_actions[keep], out_gaps[keep], kept_codes
            )
        return enc

    # ------------------------------------------------------------------ decode
    def decode_items(self, indices: np.ndarray) -> np.ndarray:
        """Vocabulary indices -> original item ids (specials decode to their token names)."""
        self._check_fitted()
        if self.item_dtype_ == "int":
            arr = np.asarray(indices)
            if (arr < N_SPECIAL).any():
                raise ValueError("cannot decode special tokens to integer item ids")
        return self.item_ids_array_[np.asarray(indices)]

    def decode_actions(self, indices: np.ndarray | list[int]) -> list[str]:
        names = list(SPECIAL_TOKENS) + list(self.actions_)
        return [names[i] for i in np.asarray(indices).ravel()]

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        self._check_fitted()
        return {
            "format_version": FORMAT_VERSION,
            "max_len": self.max_len,
            "min_item_count": self.min_item_count,
            "n_time_buckets": self.n_time_buckets,
            "special_tokens": list(SPECIAL_TOKENS),
            "item_dtype": self.item_dtype_,
            "items": list(self.items_),
            "item_counts": list(self.item_counts_),
            "actions": list(self.actions_),
            "value_buckets": self.value_buckets,
            "value_edges": self.value_edges_,
            "side_columns": list(self.side_columns),
            "side_vocab": self.side_vocab_,
            "item_sides": self.item_sides_[N_SPECIAL:].tolist() if self.side_columns else [],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ActionTokenizer:
        if d.get("format_version") != FORMAT_VERSION or tuple(d.get("special_tokens", ())) != SPECIAL_TOKENS:
            raise ModelFormatError(
                f"tokenizer format version {d.get('format_version')!r}; this behaviorlm reads {FORMAT_VERSION}"
            )
        tok = cls(
            max_len=d["max_len"],
            min_item_count=d["min_item_count"],
            n_time_buckets=d["n_time_buckets"],
            value_buckets=d.get("value_buckets", 0),
            side_columns=tuple(d.get("side_columns", ())),
        )
        cast = int if d["item_dtype"] == "int" else str
        tok._set_vocabulary(d["item_dtype"], [cast(x) for x in d["items"]], d["item_counts"], d["actions"])
        tok.value_edges_ = {k: [float(x) for x in v] for k, v in d.get("value_edges", {}).items()}
        tok.side_vocab_ = {k: list(v) for k, v in d.get("side_vocab", {}).items()}
        if tok.side_columns:
            sides = np.asarray(d["item_sides"], np.int64).reshape(-1, len(tok.side_columns))
            tok.item_sides_ = np.concatenate([np.full((N_SPECIAL, len(tok.side_columns)), SIDE_NONE), sides])
        return tok

    def save(self, path: str | Path) -> None:
        write_text_atomic(json.dumps(self.to_dict(), ensure_ascii=False), path)

    @classmethod
    def load(cls, path: str | Path) -> ActionTokenizer:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def __repr__(self) -> str:
        fitted = f", n_items={len(self.items_)}, actions={self.actions_}" if hasattr(self, "items_") else ""
        return f"ActionTokenizer(max_len={self.max_len}, min_item_count={self.min_item_count}{fitted})"


def _as_plain_int(x: Any) -> int | None:
    """An id as an integer if it is one or is written as one (``"12"``, not ``"012"`` or ``"1e3"``)."""
    if isinstance(x, int) and not isinstance(x, bool):
        return x
    text = str(x).strip()
    try:
        value = int(text)
    except ValueError:
        return None
    return value if str(value) == text else None


def _new_item_codes(item_ids: pl.Series, unknown: np.ndarray) -> tuple[np.ndarray, pl.Series]:
    """Per event, a code for an item outside the vocabulary (-1 otherwise), and the code table:
    the distinct such ids in order of first appearance."""
    new_ids = item_ids.filter(pl.Series(unknown)).unique(maintain_order=True)
    codes = np.full(len(item_ids), -1, np.int64)
    if len(new_ids):
        lookup = item_ids.filter(pl.Series(unknown)).replace_strict(
            new_ids, np.arange(len(new_ids)), return_dtype=pl.Int64
        )
        codes[unknown] = lookup.to_numpy()
    return codes, new_ids


def _value_edges(df: pl.DataFrame, n_buckets: int) -> dict[str, list[float]]:
    """Quantile bucket edges of each value column with known values (duplicates merged: a
    quantity that is mostly 1 gets few buckets)."""
    out = {}
    for col in VALUE_COLUMNS:
        if col not in df.columns:
            continue
        v = df[col].drop_nulls().cast(pl.Float64).to_numpy()
        if len(v):
            qs = np.quantile(v, np.linspace(0, 1, n_buckets + 1)[1:-1])
            out[col] = sorted({float(q) for q in qs})
    return out


def _item_counts(df: pl.DataFrame) -> pl.DataFrame:
    """``item_id, n, first``: each item's count and first row, in first-appearance order."""
    return (
        df.with_row_index("__r")
        .group_by("item_id")
        .agg(pl.len().alias("n"), pl.col("__r").min().alias("first"))
        .sort("first")
    )


def concat_ranges(start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The concatenation of ``range(start[i], end[i])`` and its CSR offsets, vectorised: how a
    subset of users' tokens is gathered from flat arrays without a Python loop per user."""
    counts = np.asarray(end, np.int64) - np.asarray(start, np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return np.repeat(np.asarray(start, np.int64) - offsets[:-1], counts) + np.arange(offsets[-1]), offsets
