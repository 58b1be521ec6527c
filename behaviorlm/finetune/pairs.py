"""Preference data from the training period: at each purchase, the bought item over the ones passed over.

A *context* is a user's events strictly before one of their purchases (what the model would
have seen when asked "what will they buy?"); its *chosen* item is the item bought then, and its
*rejected* items are ones the user touched in the window before it -- viewed, favourited or
carted -- and never bought in the training period ("only viewed, or carted and abandoned").
Items touched only *after* the purchase are not used: they are not in the context, so the
comparison would be between the copy of a seen item and the catalog guess of an unseen one. Model-drawn
negatives (random picks from the reference model's own top-K, RoDPO's finding; or its hardest,
top-ranked ones) are added by the stage, which has the model (:mod:`behaviorlm.finetune.stages`).

Only the events given -- the training split -- are read, so an evaluation target can be
neither a chosen item nor an input of a context; ``contexts_per_user`` keeps each user's newest
purchases, so heavy buyers do not dominate.

A context is a window into the token corpus the pretraining loop uses
(:class:`~behaviorlm.sequence.corpus.Corpus`), so its tokens are exactly what the model reads
at inference: the newest ``max_len`` tokens before the purchase.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import torch

from behaviorlm.data.events import Events
from behaviorlm.errors import InputDataError
from behaviorlm.sequence.corpus import Corpus
from behaviorlm.sequence.tokenizer import N_SPECIAL, PAD, ActionTokenizer

#: default window around a purchase in which a touched, never-bought item is a rejected one
WINDOW = "1d"


@dataclass
class PreferenceSet:
    """Contexts with a chosen item and up to ``n`` rejected ones (PAD where fewer)."""

    corpus: Corpus
    starts: np.ndarray  # (C,) first token of each context's window (global corpus position)
    ends: np.ndarray  # (C,) one past its last token: the context is tokens[starts:ends]
    chosen: np.ndarray  # (C,) vocabulary id of the item bought
    rejected: np.ndarray  # (C, n) vocabulary ids, PAD where a context has fewer
    users: np.ndarray  # (C,) row of the context's user in the corpus
    times: np.ndarray  # (C,) when the purchase happened (datetime64): the context is everything before it
    bought: list[np.ndarray]  # per corpus user: every item they bought in the period (never a negative)
    carted: list[np.ndarray]  # per context: items carted in its window and not bought (a reward's soft hit)

    def __len__(self) -> int:
        return len(self.chosen)

    @property
    def n_rejected(self) -> np.ndarray:
        return (self.rejected != PAD).sum(1)

    def batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Right-padded context tokens, each row's last position, its chosen and rejected ids."""
        starts, ends = self.starts[rows], self.ends[rows]
        width = int((ends - starts).max())
        idx = starts[:, None] + np.arange(width)[None, :]
        valid = idx < ends[:, None]
        idx = np.where(valid, idx, 0)

        def take(name: str) -> torch.Tensor:
            return torch.from_numpy(np.where(valid, self.corpus.take(name, idx), PAD))

        return {
            "items": take("items"),
            "actions": take("actions"),
            "gaps": take("gaps"),
            "last": torch.from_numpy(ends - starts - 1),
            "chosen": torch.from_numpy(self.chosen[rows]),
            "rejected": torch.from_numpy(self.rejected[rows]),
        }

    def with_rejected(self, rejected: np.ndarray) -> PreferenceSet:
        """The same contexts with other rejected items (model-drawn negatives)."""
        return PreferenceSet(
            self.corpus, self.starts, self.ends, self.chosen, rejected, self.users, self.times, self.bought, self.carted
        )

    def keep(self, rows: np.ndarray) -> PreferenceSet:
        return PreferenceSet(
            self.corpus,
            self.starts[rows],
            self.ends[rows],
            self.chosen[rows],
            self.rejected[rows],
            self.users[rows],
            self.times[rows],
            self.bought,
            [self.carted[r] for r in rows],
        )


def mine_pairs(
    events: Events,
    tokenizer: ActionTokenizer,
    *,
    action: str = "purchase",
    window: str = WINDOW,
    contexts_per_user: int = 8,
    n_rejected: int = 8,
    seed: int = 0,
) -> PreferenceSet:
    """Contexts at each user's newest ``contexts_per_user`` ``action`` events of ``events``, with
    up to ``n_rejected`` window negatives each (a seeded sample when there are more). Contexts
    whose chosen item is outside the vocabulary, or with no event before them, are skipped."""
    if contexts_per_user < 1 or n_rejected < 0:
        raise InputDataError("contexts_per_user must be >= 1 and n_rejected >= 0")
    df = events.df.select("user_id", "item_id", "event_type", "timestamp")
    if not (df["event_type"] == action).any():
        raise InputDataError(f"no {action!r} events to learn preferences from (column event_type)")
    enc = tokenizer.encode(events, truncate=False)
    corpus = Corpus.from_sequences(enc)
    df = df.with_columns(
        pl.Series("v", tokenizer.item_index(df["item_id"])),
        pl.int_range(pl.len()).over("user_id").alias("pos"),
        (pl.col("user_id").rle_id()).alias("row"),
    )
    bought_df = df.filter(pl.col("event_type") == action)
    bought = _per_user(bought_df, len(enc))
    contexts = _contexts(df, bought_df, contexts_per_user)
    negatives, carted = _window_negatives(df, contexts, bought_df, window)
    rng = np.random.default_rng(seed)
    rejected = np.full((contexts.height, max(n_rejected, 1)), PAD, np.int64)
    for c, cand in enumerate(negatives):
        if len(cand):
            pick = cand if len(cand) <= n_rejected else rng.choice(cand, n_rejected, replace=False)
            rejected[c, : len(pick)] = pick
    n_before = contexts["n_before"].to_numpy()
    row = contexts["row"].to_numpy().astype(np.int64)
    ends = enc.offsets[:-1][row] + 1 + n_before  # BOS, then the events before the purchase
    starts = np.maximum(enc.offsets[:-1][row], ends - tokenizer.max_len)
    return PreferenceSet(
        corpus,
        starts.astype(np.int64),
        ends.astype(np.int64),
        contexts["v"].to_numpy().astype(np.int64),
        rejected[:, :n_rejected] if n_rejected else rejected[:, :0],
        row,
        contexts["timestamp"].to_numpy(),
        bought,
        carted,
    )


def _per_user(bought_df: pl.DataFrame, n_users: int) -> list[np.ndarray]:
    out = [np.zeros(0, np.int64)] * n_users
    for r, items in bought_df.group_by("row").agg(pl.col("v").unique()).iter_rows():
        out[r] = np.asarray(items, np.int64)
    return out


def _contexts(df: pl.DataFrame, bought_df: pl.DataFrame, per_user: int) -> pl.DataFrame:
    """One row per kept purchase: the user's row, the bought vocabulary id, its time, and how
    many of the user's events came strictly before that time."""
    first_at = df.group_by("row", "timestamp").agg(pl.col("pos").min().alias("n_before"))
    ctx = (
        bought_df.filter(pl.col("v") >= N_SPECIAL)
        .join(first_at, on=["row", "timestamp"])
        .filter(pl.col("n_before") > 0)
        .sort("row", "pos")
    )
    return ctx.group_by("row", maintain_order=True).tail(per_user).with_row_index("ctx")


def _window_negatives(
    df: pl.DataFrame, contexts: pl.DataFrame, bought_df: pl.DataFrame, window: str
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per context: vocabulary items the user touched within ``window`` before the purchase
    and never bought in the period -- what they were choosing among, all in the context the
    model reads -- and those of them that were carted."""
    never = df.join(bought_df.select("row", "v").unique(), on=["row", "v"], how="anti").filter(pl.col("v") >= N_SPECIAL)
    span = pl.duration(**_duration(window))
    around = contexts.select("ctx", "row", pl.col("timestamp").alias("t")).join(never, on="row")
    around = around.filter((pl.col("timestamp") >= pl.col("t") - span) & (pl.col("timestamp") < pl.col("t")))
    grouped = around.group_by("ctx").agg(
        pl.col("v").unique(maintain_order=True).alias("neg"),
        pl.col("v").filter(pl.col("event_type") == "add_to_cart").unique().alias("cart"),
    )
    neg = [np.zeros(0, np.int64)] * contexts.height
    cart = [np.zeros(0, np.int64)] * contexts.height
    for c, n, k in grouped.iter_rows():
        neg[c], cart[c] = np.asarray(n, np.int64), np.asarray(k, np.int64)
    return neg, cart


def _duration(text: str) -> dict[str, Any]:
    """``"30m"``, ``"12h"``, ``"7d"`` -> keyword arguments of :func:`polars.duration`."""
    units = {"m": "minutes", "h": "hours", "d": "days"}
    try:
        return {units[text[-1]]: int(text[:-1])}
    except (KeyError, ValueError, IndexError):
        raise InputDataError(
            f"window must be a number and a unit (m, h or d), e.g. '1d'; got {text!r}",
            cli_hint=f"--window must be like 30m, 12h or 1d; got {text!r}",
        ) from None
