"""Which of a user's events made the model recommend an item, and by how much.

**Occlusion** (exact, the reference): an event's contribution to an item is the item's score
with every event minus its score in the world where that event never happened --
``log P(item | history) - log P(item | history without the event)``, in nats. The
counterfactual is encoded exactly as the model would see it (the tokenizer re-encodes the shorter
history: the next event's time gap changes, an older event slides into the window), so the
contributions answer "what if this had not happened", not "what if this token were blanked".

The cost is a few forward passes per user, not one per event: every variant of every user --
the full history and one without each event -- is encoded in one call and scored in batches,
and all of a user's recommended items are read from the same rows -- only those items'
log-probabilities are computed (one logsumexp over the catalog per row and next action, not a
catalog-wide matrix: 14 GB for 300 Taobao users before). Only the last ``max_len + 1``
events can matter (the input window, and the event that gives the window's oldest one its time
gap); older events are reported with contribution 0, which is exact: removing one changes
nothing the model sees (a test checks it). Events at or after the scoring time are never input.

``unit="session"`` removes a whole session at a time (a pause longer than ``session_gap``
starts one): "what if that visit had not happened", one row per session (:data:`SESSION_COLUMNS`).

A repeat-aware model can recommend an item outside its vocabulary by copying it from the
history; occlusion scores such an item as recommendation does (the copy path's column for the
first position holding it), and a variant whose history no longer holds it gets the row's lowest
vocabulary log-probability (the item cannot be recommended there; a finite floor rather than
an infinite contribution). Integrated gradients refuse such an item by name.

For a **repeat-aware** model (a copy head) each event also gets ``copy_weight``: the share of
the next-item probability the copy path puts on that position (gate times attention, averaged
over the next action as the score is) -- how much the model is "showing it again" rather than
generalising from it.

**Integrated gradients** (approximate; 1.1-2.6x occlusion's speed in benchmarks/RESULTS.md
section 24, and blind to the copy path's identity-based choices): each input token's content vector (item,
action and time gap; :meth:`~behaviorlm.nn.model.BehaviorTransformer.input_vectors`) is scaled
from zero to its value along ``steps`` points, and the item's log-probability's gradient is
integrated along the way (midpoint rule): one batched forward and backward pass of ``steps``
rows per recommended item. The contributions sum to the score minus the score with every
token's content zeroed (completeness; the rest -- positions, the copy head's item identities --
is the baseline's). Events outside the window get 0.

Output: :data:`COLUMNS`, one row per (user, recommended item, input event).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import polars as pl
import torch

from behaviorlm.data.events import Events
from behaviorlm.data.timestamps import to_utc
from behaviorlm.errors import ConfigurationError
from behaviorlm.sequence.tokenizer import N_SPECIAL

COLUMNS = (
    "user_id",
    "item_id",
    "event_index",  # position among the user's events, oldest 0
    "event_item",
    "event_action",
    "event_time",
    "contribution",  # nats: score with every event minus score without this one
    "copy_weight",  # repeat-aware models: the copy path's probability on this position (else null)
    "score",  # log P(item | every event)
)


SESSION_COLUMNS = (
    "user_id",
    "item_id",
    "session_index",  # the user's sessions numbered from 0, oldest first
    "first_event_index",
    "n_events",
    "session_start",
    "session_end",
    "contribution",  # nats: score with every event minus score without this session's events
    "copy_weight",  # repeat-aware models: the copy path's probability on the session's events (else null)
    "score",
)
#: A pause longer than this starts a new session (the common web-analytics convention).
SESSION_GAP = timedelta(minutes=30)


@dataclass(frozen=True)
class Attributions:
    """Per-event contributions (:data:`COLUMNS`) and, per (user, item), the score and the sum of
    the contributions (``totals``: ``user_id, item_id, score, total``)."""

    events: pl.DataFrame
    totals: pl.DataFrame


def occlusion(
    model: Any,
    recommendations: pl.DataFrame,
    events: Events | Any,
    as_of: datetime | None = None,
    batch_size: int = 128,
    unit: str = "event",
    session_gap: timedelta = SESSION_GAP,
) -> Attributions:
    """Occlusion contributions of each user's events to each of their ``recommendations``
    (``user_id, item_id``; items outside the model's vocabulary are scored as the copy path
    scores them, see the module docstring).

    ``events`` are the users' events (raw or validated; read with the model's schema); with
    ``as_of`` only those before it are input (and reported), as in scoring at that time.
    ``unit="session"`` removes one session at a time instead (events closer than
    ``session_gap`` to the previous one share its session) and reports :data:`SESSION_COLUMNS`."""
    if unit not in ("event", "session"):
        raise ConfigurationError(f"unit must be 'event' or 'session', got {unit!r}")
    engine = model.engine.on("cpu")  # reads the network itself: on the CPU, whatever model.engine runs on
    ev, recs, cols = _inputs(model, recommendations, events, as_of, new_items=True)
    if recs.height == 0:  # no recommended user has an input event: nothing to attribute
        return Attributions(pl.DataFrame(), pl.DataFrame())
    ev = ev.with_columns(_unit_of(unit, session_gap))
    tail, removable = _tail(ev, engine.max_len)
    variants, key = _variants(tail, removable)
    enc = engine.encode(
        Events.trusted(variants.drop("__variant", "__index", "__removed", "__unit"), "attribution variants")
    )
    slots = _Slots.of(recs, key, enc)
    columns = _Columns(engine, enc, cols, recs["item_id"])
    values, copy_w = _scores(
        engine, enc, batch_size, lambda h, a_logp, rows: columns.read(engine, h, a_logp, rows, slots.recs[rows])
    )
    row_of = {u: i for i, u in enumerate(enc.user_ids)}
    scored = _Scored(slots, key, row_of, values, copy_w, enc)
    units = ev.with_columns(pl.len().over("user_id").alias("__n")) if unit == "event" else _sessions(ev)
    return _assemble(units, recs, scored, unit)


def integrated_gradients(
    model: Any,
    recommendations: pl.DataFrame,
    events: Events | Any,
    as_of: datetime | None = None,
    steps: int = 32,
) -> Attributions:
    """Integrated-gradient contributions of each user's input events to each recommended item
    (see the module docstring); ``totals`` also carries ``baseline`` (the score with every
    content vector zeroed) so that ``total == score - baseline`` can be checked."""
    if steps < 1:
        raise ConfigurationError(f"steps must be >= 1, got {steps}")
    engine = model.engine.on("cpu")  # reads the network itself: on the CPU, whatever model.engine runs on
    ev, recs, cols = _inputs(model, recommendations, events, as_of)
    enc = engine.encode(Events.trusted(ev, "attribution input"))
    row_of = {u: i for i, u in enumerate(enc.user_ids)}
    by_user = ev.partition_by("user_id", as_dict=True, include_key=True)
    out, totals = [], []
    for (user, item), col in zip(recs.iter_rows(), cols, strict=True):
        per_token, score, base = integrated_gradients_row(engine, enc, row_of[user], int(col), steps)
        mine = by_user[(user,)]
        for e in mine.iter_rows(named=True):
            token = _token_of(e["__index"], mine.height, len(per_token))
            contribution = 0.0 if token is None else float(per_token[token])
            out.append(_row(user, item, e, contribution, None, score))
        total = float(per_token.sum())  # the BOS token's share included: completeness is over tokens
        totals.append({"user_id": user, "item_id": item, "score": score, "total": total, "baseline": base})
    return Attributions(_frame(out), pl.DataFrame(totals))


def _inputs(
    model: Any, recommendations: pl.DataFrame, events: Events | Any, as_of: datetime | None, new_items: bool = False
) -> tuple[pl.DataFrame, pl.DataFrame, np.ndarray]:
    """The recommended users' input events (model schema, time order, before ``as_of``), each
    numbered within its user (``__index``, oldest 0); the recommendations; their item columns
    (``[UNK]``'s for an item outside the vocabulary, with ``new_items`` and a repeat-aware model)."""
    ev = model.validate_input(events).df.sort("user_id", "timestamp", maintain_order=True)
    if as_of is not None:
        ev = ev.filter(pl.col("timestamp") < to_utc(as_of, "as_of"))
    recs = recommendations.select("user_id", "item_id")
    ev = ev.filter(pl.col("user_id").is_in(recs["user_id"].unique().implode()))
    recs = recs.filter(pl.col("user_id").is_in(ev["user_id"].unique().implode()))  # no events: nothing to attribute
    cols = _item_columns(model.engine, recs["item_id"], new_items and model.engine.network.copy_head is not None)
    return ev.with_columns(pl.int_range(pl.len()).over("user_id").alias("__index")), recs, cols


def _token_of(index: int, n_events: int, n_tokens: int) -> int | None:
    """Position in the encoded input of a user's event ``index`` (of ``n_events``), when the
    input holds ``n_tokens`` tokens: BOS first when nothing was cut, else the last events only;
    None for an event before the input."""
    has_bos = n_tokens == n_events + 1
    first = n_events - n_tokens + has_bos  # the oldest event in the input
    return None if index < first else index - first + has_bos


def _row(user: Any, item: Any, e: dict[str, Any], contribution: float, weight: float | None, score: float) -> dict:
    """One output row (:data:`COLUMNS`) for event ``e`` of ``user`` and recommended ``item``."""
    return {
        "user_id": user,
        "item_id": item,
        "event_index": e["__index"],
        "event_item": e["item_id"],
        "event_action": e["event_type"],
        "event_time": e["timestamp"],
        "contribution": contribution,
        "copy_weight": weight,
        "score": score,
    }


def _frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    if not rows:
        return pl.DataFrame()
    return pl.DataFrame(rows, schema_overrides={"copy_weight": pl.Float64}).select(COLUMNS)


def integrated_gradients_row(engine: Any, enc: Any, row: int, col: int, steps: int) -> tuple[np.ndarray, float, float]:
    """Per-token integrated gradients of one encoded row's log P(item ``col``), its score and
    its zero-content baseline: the lower level of :func:`integrated_gradients`, for callers that
    hold an encoding already (benchmarks/ig_vs_captum.py times it against Captum)."""
    net = engine.network
    items, actions, gaps, last = (torch.from_numpy(a) for a in enc.padded(slice(row, row + 1)))
    n = int(last[0]) + 1
    items, actions, gaps = items[:, :n], actions[:, :n], gaps[:, :n]
    with torch.no_grad():
        x = net.input_vectors(items, actions, gaps)  # (1, n, d)
    alphas = torch.cat([(torch.arange(steps, dtype=x.dtype) + 0.5) / steps, torch.tensor([0.0, 1.0])])
    scaled = (alphas[:, None, None] * x).requires_grad_(True)  # the path, then the two ends
    rep = len(alphas)
    f = differentiable_item_logp(engine, items.expand(rep, n), actions.expand(rep, n), gaps.expand(rep, n), scaled, col)
    # the gradient with respect to the path only: .backward() would also fill every weight's
    # gradient (the 55k-item output matrix among them) -- 1.4x the time on Taobao, measured
    (grad,) = torch.autograd.grad(f[:steps].sum(), scaled)
    mean_grad = grad[:steps].mean(0)  # (n, d)
    per_token = (x[0] * mean_grad).sum(-1).detach().numpy()
    return per_token, float(f[-1].detach()), float(f[-2].detach())


def differentiable_item_logp(
    engine: Any, items: torch.Tensor, actions: torch.Tensor, gaps: torch.Tensor, inputs: torch.Tensor, col: int
) -> torch.Tensor:
    """log P(item ``col``) at each row's last token, marginal over the next action, differentiable
    in ``inputs`` (the token content vectors): the function a gradient method integrates."""
    net = engine.network
    last = torch.full((len(items),), items.shape[1] - 1)
    state = net(items, actions, gaps, last=last, inputs=inputs)
    a_logits = net.action_logits(state)
    a_logits[:, :N_SPECIAL] = float("-inf")
    a_logp = torch.log_softmax(a_logits, -1)
    cols = torch.full((len(state), 1), col)
    parts = [a_logp[:, a] + net.item_logp_columns(state, a.expand(len(state)), cols)[:, 0] for a in engine.real_actions]
    return torch.logsumexp(torch.stack(parts), 0)


def _item_columns(engine: Any, items: pl.Series, new_items: bool = False) -> np.ndarray:
    """Vocabulary columns of ``items``; an item outside the vocabulary is refused by name unless
    ``new_items`` (a repeat-aware model recommends such an item by copying it from the history)."""
    cols = engine.tokenizer.item_index(items)
    unknown = items.filter(pl.Series(cols < N_SPECIAL))
    if len(unknown) and not new_items:
        raise ConfigurationError(
            f"item {unknown[0]!r} is not in the model's vocabulary: this method explains catalog items "
            f"({len(unknown):,} such recommendations; occlusion explains them for a repeat-aware model)"
        )
    return cols


class _Columns:
    """Where an item's log-probability sits in each encoded row's scores: its vocabulary column,
    or -- an item outside the vocabulary, which only the copy path can score -- ``n_items +`` the
    first position holding it in that row (:meth:`InferenceEngine.heads`); a row whose history no
    longer holds it cannot recommend it, and gets the row's lowest vocabulary log-probability."""

    def __init__(self, engine: Any, enc: Any, cols: np.ndarray, items: pl.Series):
        self.n_items, self.cols = engine.n_items, cols
        self.codes = enc.padded_new_codes(slice(0, len(enc)))
        names = {} if enc.new_ids is None else {v: i for i, v in enumerate(enc.new_ids.to_list())}
        self.code = [names.get(item, -2) if c < N_SPECIAL else -1 for item, c in zip(items, cols, strict=True)]

    def read(
        self, engine: Any, h: torch.Tensor, a_logp: torch.Tensor, rows: np.ndarray, recs: np.ndarray
    ) -> np.ndarray:
        """log P of the recommendations ``recs`` (rows x slots, -1: none) in each of ``rows``
        (global row numbers) of one batch's states: (rows x slots), NaN where none. Only those
        columns are computed (:meth:`InferenceEngine.item_logp_columns`); a new item no longer
        held gets its row's lowest vocabulary log-probability, the one case needing the catalog."""
        valid = recs >= 0
        col = np.where(valid, self.cols[np.where(valid, recs, 0)], 0)
        absent = np.zeros(recs.shape, bool)
        for b, r in zip(*np.nonzero(valid & (col < N_SPECIAL)), strict=True):
            held = self._first_held(int(rows[b]), int(recs[b, r]))
            absent[b, r] = held is None
            col[b, r] = 0 if held is None else self.n_items + held
        out = engine.item_logp_columns(h, a_logp, torch.from_numpy(col)).double().numpy()
        out[~valid] = np.nan
        for b in np.flatnonzero(absent.any(1)):
            floor = float(engine.item_logp(h[b : b + 1], a_logp[b : b + 1])[0, N_SPECIAL : self.n_items].min())
            out[b, absent[b]] = floor
        return out

    def _first_held(self, row: int, rec: int) -> int | None:
        """The first position of ``row`` holding recommendation ``rec``'s new item, if any."""
        if self.codes is None:
            return None
        held = np.flatnonzero(self.codes[row] == self.code[rec])
        return int(held[0]) if len(held) else None


@dataclass(frozen=True)
class _Slots:
    """Which recommendations each encoded row is read for (its user's, up to ``R`` per user):
    only those columns are kept, not a (variants x catalog) matrix -- 300 Taobao users' variants
    over a 55k-item catalog would hold 6.6 GB."""

    recs: np.ndarray  # (rows, R) recommendation numbers, -1 where the user has fewer
    slot: np.ndarray  # per recommendation, its column in ``recs``

    @classmethod
    def of(cls, recs: pl.DataFrame, key: pl.DataFrame, enc: Any) -> _Slots:
        numbered = recs.with_row_index("__rec").with_columns(pl.int_range(pl.len()).over("user_id").alias("__slot"))
        by_user = {u: g["__rec"].to_numpy() for (u,), g in numbered.partition_by("user_id", as_dict=True).items()}
        user_of = dict(key.select("__key", "user_id").iter_rows())
        width = max((len(v) for v in by_user.values()), default=1)
        table = np.full((len(enc), width), -1, np.int64)
        for row, k in enumerate(enc.user_ids):
            mine = by_user.get(user_of[k], ())
            table[row, : len(mine)] = mine
        return cls(table, numbered["__slot"].to_numpy())


def _unit_of(unit: str, gap: timedelta) -> pl.Expr:
    """``__unit``: what one variant removes -- the event itself, or its session (numbered from 0
    per user, a new one after a pause longer than ``gap``)."""
    if unit == "event":
        return pl.col("__index").alias("__unit")
    pause = (pl.col("timestamp").diff().over("user_id") > gap).fill_null(False)
    return pause.cast(pl.Int64).cum_sum().over("user_id").alias("__unit")


def _tail(ev: pl.DataFrame, max_len: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The events every variant needs, and the removable units (``user_id, __removed``).

    Only units with an event among a user's last ``max_len + 1`` can change the input (the
    window, and the event giving its oldest one a gap); removing a unit of ``m`` events slides
    ``m`` older ones in, so each user keeps ``max_len + 1 + m`` events for their largest such ``m``."""
    n = pl.len().over("user_id").cast(pl.Int64)  # UInt32 would underflow for users shorter than that
    in_reach = ev.filter(pl.col("__index") >= n - (max_len + 1))
    removable = in_reach.select("user_id", pl.col("__unit").alias("__removed")).unique(maintain_order=True)
    sizes = ev.group_by("user_id", "__unit").agg(pl.len().cast(pl.Int64).alias("__m"))
    largest = removable.join(sizes, left_on=["user_id", "__removed"], right_on=["user_id", "__unit"])
    keep = largest.group_by("user_id").agg((pl.col("__m").max() + max_len + 1).alias("__keep"))
    tail = ev.join(keep, on="user_id").filter(pl.col("__index") >= n - pl.col("__keep")).drop("__keep")
    return tail, removable


def _variants(tail: pl.DataFrame, removable: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Every user's recent events as-is (variant ``-1``) and without each removable unit (variant
    = that unit); each variant a pseudo-user ``user_id`` = its row key. Returns the variants and
    the key table (``__key, user_id, __removed``)."""
    full = tail.select("user_id").unique(maintain_order=True).with_columns(pl.lit(-1, pl.Int64).alias("__removed"))
    key = pl.concat([full, removable.with_columns(pl.col("__removed").cast(pl.Int64))])
    key = key.with_row_index("__key").with_columns(pl.col("__key").cast(pl.Int64))
    joined = tail.join(key, on="user_id", how="inner").filter(pl.col("__unit") != pl.col("__removed"))
    variants = joined.with_columns(pl.col("__key").alias("__variant")).drop("user_id").rename({"__key": "user_id"})
    variants = variants.sort("user_id", "timestamp", "__index", maintain_order=True)
    return variants, key


def _sessions(ev: pl.DataFrame) -> pl.DataFrame:
    """One row per session: ``user_id, __unit, __index`` (its first event), ``__last``,
    ``n_events``, ``start``, ``end``, and ``__n_user`` (the user's event count)."""
    return (
        ev.group_by("user_id", "__unit", maintain_order=True)
        .agg(
            pl.col("__index").min(),
            pl.col("__index").max().alias("__last"),
            pl.len().alias("n_events"),
            pl.col("timestamp").min().alias("start"),
            pl.col("timestamp").max().alias("end"),
        )
        .with_columns(pl.col("n_events").sum().over("user_id").alias("__n_user"))
    )


@torch.inference_mode()
def _scores(engine: Any, enc: Any, batch_size: int, keep: Any) -> tuple[np.ndarray, torch.Tensor | None]:
    """Per variant row, what ``keep(h, a_logp, rows)`` reads of its item log-probabilities, and
    -- repeat-aware models -- the copy path's probability per input position of each row."""
    parts, copies = [], []
    layout = engine.network.state_layout
    for start in range(0, len(enc), batch_size):
        rows = slice(start, min(start + batch_size, len(enc)))
        h, a_logp = engine.heads(enc, rows)
        parts.append(keep(h, a_logp, np.arange(rows.start, rows.stop)))
        if layout is not None and engine.network.copy_head is not None:
            copies.append(_copy_weights(engine, h, a_logp))
    return np.concatenate(parts), (torch.cat(copies) if copies else None)


def _copy_weights(engine: Any, state: torch.Tensor, a_logp: torch.Tensor) -> torch.Tensor:
    """(B, max_len): P(copy) x attention per input position, averaged over the next action."""
    net = engine.network
    layout = net.state_layout
    h = layout.hidden(state)
    alpha = layout.log_alpha(state).exp().nan_to_num(0.0)
    gate = torch.zeros(len(state))
    for a in engine.real_actions:
        actions = a.expand(len(state))
        g = torch.sigmoid(net.copy_head.gate_logits(net.item_query(h, actions)))
        gate += a_logp[:, a].exp() * g * layout.has_copy(state)
    return gate[:, None] * alpha


@dataclass(frozen=True)
class _Scored:
    """The variants' scores and where to read them: what :func:`_assemble` turns into rows."""

    slots: _Slots
    key: pl.DataFrame
    row_of: dict
    values: np.ndarray  # (rows, slots): log P of each row's user's recommendations
    copy_w: torch.Tensor | None
    enc: Any

    def logp(self, row: int, rec: int) -> float:
        return float(self.values[row, self.slots.slot[rec]])


def _assemble(units: pl.DataFrame, recs: pl.DataFrame, scored: _Scored, unit: str) -> Attributions:
    """Contributions per (user, item, unit): the full row's score minus the row without the unit."""
    key, row_of = scored.key, scored.row_of
    full_key = dict(key.filter(pl.col("__removed") < 0).select("user_id", "__key").iter_rows())
    variant_key = {(u, r): k for k, u, r in key.select("__key", "user_id", "__removed").iter_rows()}
    by_user = units.partition_by("user_id", as_dict=True, include_key=True)
    out: list[dict[str, Any]] = []
    totals: list[dict[str, Any]] = []
    for rec, (user, item) in enumerate(recs.iter_rows()):
        full_row = row_of[full_key[user]]
        score = scored.logp(full_row, rec)
        n_input = int(scored.enc.offsets[full_row + 1] - scored.enc.offsets[full_row])  # tokens the full row feeds
        total = 0.0
        for u in by_user[(user,)].iter_rows(named=True):
            k = variant_key.get((user, u["__unit"]))
            contribution = 0.0 if k is None else score - scored.logp(row_of[k], rec)
            total += contribution
            weight = _copy_weight(scored.copy_w, full_row, u, n_input)
            out.append((_row if unit == "event" else _session_row)(user, item, u, contribution, weight, score))
        totals.append({"user_id": user, "item_id": item, "score": score, "total": total})
    frame = _frame(out) if unit == "event" else _session_frame(out)
    return Attributions(frame, pl.DataFrame(totals))


def _copy_weight(copy_w: torch.Tensor | None, row: int, u: dict[str, Any], n_input: int) -> float | None:
    """The copy path's weight on an event (a session: the sum over its events in the input)."""
    if copy_w is None:
        return None
    n_events = u.get("__n_user")
    if n_events is None:  # an event row
        token = _token_of(u["__index"], u["__n"], n_input)
        return None if token is None else float(copy_w[row, token])
    tokens = [_token_of(i, n_events, n_input) for i in range(u["__index"], u["__last"] + 1)]
    held = [t for t in tokens if t is not None]
    return float(copy_w[row, held].sum()) if held else None


def _session_row(user: Any, item: Any, s: dict[str, Any], contribution: float, weight: float | None, score: float):
    """One output row (:data:`SESSION_COLUMNS`) for session ``s``."""
    return {
        "user_id": user,
        "item_id": item,
        "session_index": s["__unit"],
        "first_event_index": s["__index"],
        "n_events": s["n_events"],
        "session_start": s["start"],
        "session_end": s["end"],
        "contribution": contribution,
        "copy_weight": weight,
        "score": score,
    }


def _session_frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    if not rows:
        return pl.DataFrame()
    return pl.DataFrame(rows, schema_overrides={"copy_weight": pl.Float64}).select(SESSION_COLUMNS)
