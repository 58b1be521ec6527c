"""Scorer protocol and the baselines every model figure stands beside: popularity, co-occurrence."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import polars as pl
import torch

from behaviorlm.data.events import Events

# --------------------------------------------------------------------------- scorers


class Scorer(Protocol):
    """Anything that scores the catalog for users from their input events."""

    name: str

    def score(self, inputs: Events, users: list[Any], catalog: pl.Series) -> Iterator[tuple[list[Any], torch.Tensor]]:
        """Yield (users of the chunk, scores of shape (chunk, len(catalog)))."""
        ...


def catalog_index(catalog: pl.Series, ids: pl.Series) -> np.ndarray:
    """Map item ids to positions in the catalog; -1 where absent."""
    ids = ids.cast(catalog.dtype, strict=False)
    return ids.replace_strict(catalog, np.arange(len(catalog)), default=-1, return_dtype=pl.Int64).to_numpy(
        writable=True
    )


class PopularityBaseline:
    """Most-popular items in the training events, the same list for every user."""

    name = "popularity"

    def fit(self, train: Events, catalog: pl.Series) -> PopularityBaseline:
        idx = catalog_index(catalog, train.df["item_id"])
        self.counts_ = torch.from_numpy(np.bincount(idx[idx >= 0], minlength=len(catalog)).astype(np.float32))
        return self

    def score(self, inputs, users, catalog, chunk: int = 1024):
        for i in range(0, len(users), chunk):
            part = users[i : i + chunk]
            yield part, self.counts_.expand(len(part), -1).clone()


class CooccurrenceBaseline:
    """Next-item co-occurrence: how often item j directly followed the user's last item in training.

    Popularity (scaled below one transition) breaks ties, so users whose last item was never
    followed by anything still get a sensible ranking.
    """

    name = "cooccurrence"

    def fit(self, train: Events, catalog: pl.Series) -> CooccurrenceBaseline:
        df = train.df.with_columns(item=pl.Series(catalog_index(catalog, train.df["item_id"])))
        pairs = (
            df.select(pl.col("item").alias("prev"), pl.col("item").shift(-1).over("user_id").alias("next"))
            .drop_nulls()
            .filter((pl.col("prev") >= 0) & (pl.col("next") >= 0))
        )
        counts = pairs.group_by("prev", "next").len().sort("prev")
        self.prev_ = counts["prev"].to_numpy(writable=True)
        self.next_ = counts["next"].to_numpy(writable=True)
        self.val_ = counts["len"].to_numpy(writable=True).astype(np.float32)
        self.row_ptr_ = np.searchsorted(self.prev_, np.arange(len(catalog) + 1))
        pop = np.bincount(df["item"].filter(df["item"] >= 0).to_numpy(), minlength=len(catalog)).astype(np.float32)
        self.tiebreak_ = torch.from_numpy(pop / (pop.max() + 1.0))
        return self

    def score(self, inputs, users, catalog, chunk: int = 1024):
        last = inputs.df.group_by("user_id", maintain_order=True).last()
        last_idx = dict(zip(last["user_id"].to_list(), catalog_index(catalog, last["item_id"]), strict=True))
        for i in range(0, len(users), chunk):
            part = users[i : i + chunk]
            out = self.tiebreak_.expand(len(part), -1).clone()
            for r, u in enumerate(part):
                j = last_idx.get(u, -1)
                if j >= 0:
                    s, e = self.row_ptr_[j], self.row_ptr_[j + 1]
                    out[r, torch.from_numpy(self.next_[s:e])] += torch.from_numpy(self.val_[s:e])
            yield part, out
