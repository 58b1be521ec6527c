"""Scorer protocol and the baselines every model figure stands beside.

The rules a practitioner would try before any model, each fitted on training events only:

* ``popularity`` -- the same most-popular list for everyone;
* ``cooccurrence`` -- what most often directly followed the user's last item;
* ``recent`` -- the user's own distinct items, newest first ("recently viewed");
* ``repeat`` -- the user's items by a recency-decayed, action-weighted count ("buy again /
  continue shopping"); its action weights and half-life are fitted on the training events;
* ``sknn`` -- V-SKNN, session-based k-nearest neighbours with a linearly decaying query, and
  ``itemknn`` -- session co-occurrence cosine neighbours of the last item; the strongest
  simple rules of session-based recommendation (Ludewig & Jannach, UMUAI 2018);
* for purchase targets (:mod:`behaviorlm.evaluation.purchase`): ``cart`` ("in your cart":
  carted and not bought since, newest first, then recent items), ``purchase_popularity`` and
  ``purchase_cooccurrence`` (what was bought next after the user's last item).

Every scorer ranks the items its rule scores first (popularity only breaking exact ties), then
the rest by popularity, so a user whose history gives the rule nothing still gets a sensible
list. ``recent`` and ``repeat`` can only propose items the user already touched: where seen
items are excluded they do not apply
(:data:`SEEN_ONLY`), and evaluation lists them as such instead of scoring them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import polars as pl
import scipy.sparse as sp
import torch

from behaviorlm.data.events import Events
from behaviorlm.data.ids import index_of

# --------------------------------------------------------------------------- scorers


class Scorer(Protocol):
    """Anything that scores the catalog for users from their input events."""

    name: str

    def score(self, inputs: Events, users: list[Any], catalog: pl.Series) -> Iterator[tuple[list[Any], torch.Tensor]]:
        """Yield (users of the chunk, scores of shape (chunk, len(catalog)))."""
        ...


def catalog_index(catalog: pl.Series, ids: pl.Series) -> np.ndarray:
    """Map item ids to positions in the catalog; -1 where absent (the tokenizer's id rules:
    :mod:`behaviorlm.data.ids`, so a baseline and the model read an id alike)."""
    return index_of(ids, catalog)


def widen(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Scores over the fitted catalog, padded with 0 to ``n`` columns: a ranking may add items
    after the training catalog (a user's context items), which a rule fitted on training
    events knows nothing about unless it reads them from the user's own inputs."""
    if scores.shape[-1] >= n:
        return scores
    return torch.nn.functional.pad(scores, (0, n - scores.shape[-1]))


class PopularityBaseline:
    """Most-popular items in the training events, the same list for every user."""

    name = "popularity"

    def fit(self, train: Events, catalog: pl.Series) -> PopularityBaseline:
        idx = catalog_index(catalog, train.df["item_id"])
        self.counts_ = torch.from_numpy(np.bincount(idx[idx >= 0], minlength=len(catalog)).astype(np.float32))
        return self

    def score(self, inputs, users, catalog, chunk: int = 1024):
        counts = widen(self.counts_, len(catalog))
        for i in range(0, len(users), chunk):
            part = users[i : i + chunk]
            yield part, counts.expand(len(part), -1).clone()


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
            out = widen(self.tiebreak_, len(catalog)).expand(len(part), -1).clone()
            for r, u in enumerate(part):
                j = last_idx.get(u, -1)
                if 0 <= j < len(self.row_ptr_) - 1:  # a last item after the training catalog has no successors
                    s, e = self.row_ptr_[j], self.row_ptr_[j + 1]
                    out[r, torch.from_numpy(self.next_[s:e])] += torch.from_numpy(self.val_[s:e])
            yield part, out


#: baselines that only ever propose the user's own items: not applicable when seen items are excluded
SEEN_ONLY = ("recent", "repeat")
#: every baseline, in the order reports list them
BASELINES = ("popularity", "cooccurrence", "recent", "repeat", "sknn", "itemknn")


def popularity_tiebreak(train: Events, catalog: pl.Series) -> torch.Tensor:
    """Training popularity scaled into [0, 1): added to a rule's scores, it orders the items
    the rule scores equally without ever overtaking one unit of the rule's own score."""
    idx = catalog_index(catalog, train.df["item_id"])
    pop = np.bincount(idx[idx >= 0], minlength=len(catalog)).astype(np.float32)
    return torch.from_numpy(pop / (pop.max() + 1.0 if len(pop) else 1.0))


def _user_chunks(users: list[Any], chunk: int) -> Iterator[list[Any]]:
    for i in range(0, len(users), chunk):
        yield users[i : i + chunk]


def _history(inputs: Events, catalog: pl.Series) -> pl.DataFrame:
    """``user_id, c`` (catalog position, -1 when unknown), ``event_type`` and ``age`` (0 for each
    user's newest event, 1 for the one before ...) of every input event."""
    df = inputs.df
    return df.select(
        "user_id",
        "event_type",
        pl.Series("c", catalog_index(catalog, df["item_id"])),
        (pl.len().over("user_id") - 1 - pl.int_range(pl.len()).over("user_id")).cast(pl.Int64).alias("age"),
    )


#: how much popularity may add to a rule's own score: it breaks ties, it does not reorder
TIE_WEIGHT = 1e-4


def _dense_rows(
    part: list[Any], pairs: pl.DataFrame, value: str, base: torch.Tensor, user_dtype: pl.DataType
) -> torch.Tensor:
    """``base`` for each user of ``part``, with ``pairs[value]`` (one row per (user, ``c``)) in
    place of it at (user, ``c``) plus :data:`TIE_WEIGHT` times the base there."""
    rows_of = pl.DataFrame({"user_id": pl.Series(part, dtype=user_dtype), "__r": np.arange(len(part))})
    sub = pairs.join(rows_of, on="user_id", how="inner")
    out = base.expand(len(part), -1).clone()
    r = torch.from_numpy(sub["__r"].to_numpy().astype(np.int64))
    c = torch.from_numpy(sub["c"].to_numpy().astype(np.int64))
    v = torch.from_numpy(sub[value].to_numpy().astype(np.float32))
    out.index_put_((r, c), v + TIE_WEIGHT * base[c])
    return out


class RecentBaseline:
    """The user's distinct items, newest first ("recently viewed"); popularity below them."""

    name = "recent"

    def fit(self, train: Events, catalog: pl.Series) -> RecentBaseline:
        self.tiebreak_ = popularity_tiebreak(train, catalog)
        return self

    def score(self, inputs, users, catalog, chunk: int = 1024):
        h = _history(inputs, catalog).filter(pl.col("c") >= 0)
        last = h.group_by("user_id", "c").agg(pl.col("age").min())
        last = last.with_columns(s=1.0 + 1.0 / (1.0 + pl.col("age")))  # newest -> 2, older -> towards 1
        for part in _user_chunks(users, chunk):
            yield part, _dense_rows(part, last, "s", widen(self.tiebreak_, len(catalog)), inputs.df["user_id"].dtype)


class RepeatBaseline:
    """``sum_e w[action_e] * 0.5 ** (age_e / half_life)`` over the user's events on each item
    ("buy again / continue shopping"), popularity below.

    Fitted on the training events alone: each training user's last training event is an
    internal target, the events before it the input. ``w[a]`` is how often an item touched
    with action ``a`` (among the last :attr:`window` events) is the next item, and the
    half-life (in events) is the one of :attr:`half_lives` with the best internal NDCG@10.
    """

    name = "repeat"
    window = 20
    half_lives = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 1e9)

    def fit(self, train: Events, catalog: pl.Series) -> RepeatBaseline:
        self.tiebreak_ = popularity_tiebreak(train, catalog)
        h = _history(train, catalog)
        target = h.filter(pl.col("age") == 0).select("user_id", pl.col("c").alias("t"))
        past = h.filter(pl.col("age") > 0).with_columns(pl.col("age") - 1).join(target, on="user_id")
        near = past.filter(pl.col("age") < self.window)
        w = near.group_by("event_type").agg(((pl.col("c") == pl.col("t")) & (pl.col("c") >= 0)).mean().alias("w"))
        top = float(w["w"].fill_null(0.0).max() or 0.0)  # type: ignore[arg-type]  # a float column's max
        floor = max(top * 1e-3, 1e-6)  # an action never repeated still counts a little
        self.weights_ = {a: max(float(x), floor) for a, x in zip(w["event_type"], w["w"], strict=True)}
        self.default_weight_ = floor
        scored = {hl: self._internal_ndcg(past, hl) for hl in self.half_lives}
        self.half_life_ = max(scored, key=lambda hl: (scored[hl], -hl))
        self.fit_ndcg_ = scored
        return self

    def _scores(self, h: pl.DataFrame, half_life: float) -> pl.DataFrame:
        w = pl.col("event_type").replace_strict(self.weights_, default=self.default_weight_, return_dtype=pl.Float64)
        decay = pl.lit(0.5).pow(pl.col("age").cast(pl.Float64) / half_life)
        return h.filter(pl.col("c") >= 0).group_by("user_id", "c").agg((w * decay).sum().alias("s"))

    def _internal_ndcg(self, past: pl.DataFrame, half_life: float) -> float:
        s = self._scores(past, half_life).join(past.select("user_id", "t").unique(), on="user_id")
        rank = s.with_columns(r=pl.col("s").rank("min", descending=True).over("user_id"))
        hit = rank.filter((pl.col("c") == pl.col("t")) & (pl.col("r") <= 10))
        n_users = past["user_id"].n_unique()
        return float((1.0 / np.log2(hit["r"].to_numpy() + 1.0)).sum() / max(n_users, 1))

    def score(self, inputs, users, catalog, chunk: int = 1024):
        s = self._scores(_history(inputs, catalog), self.half_life_)
        s = s.with_columns(pl.col("s") / pl.col("s").max().over("user_id") + 1.0)  # (1, 2]: above the tiebreak
        for part in _user_chunks(users, chunk):
            yield part, _dense_rows(part, s, "s", widen(self.tiebreak_, len(catalog)), inputs.df["user_id"].dtype)


def sessions_matrix(train: Events, catalog: pl.Series, gap_s: float = 1800.0) -> sp.csr_matrix:
    """Binary (sessions x catalog) matrix of the training events, a session ending at a gap of
    more than ``gap_s`` seconds (30 minutes, the usual web-analytics cut) or at a user change."""
    df = train.df.select(
        "user_id",
        pl.Series("c", catalog_index(catalog, train.df["item_id"])),
        (pl.col("timestamp").diff().over("user_id").dt.total_seconds().fill_null(0) > gap_s).alias("cut"),
    )
    new = (df["user_id"] != df["user_id"].shift(1)).fill_null(True) | df["cut"]
    sess = new.cast(pl.Int64).cum_sum().to_numpy() - 1
    keep = df["c"].to_numpy() >= 0
    n_sess = int(sess.max()) + 1 if len(sess) else 0
    m = sp.csr_matrix(
        (np.ones(int(keep.sum()), np.float32), (sess[keep], df["c"].to_numpy()[keep])), shape=(n_sess, len(catalog))
    )
    m.data[:] = 1.0
    m.sum_duplicates()
    m.data[:] = 1.0  # a set, not a count
    return m


class SessionKNNBaseline:
    """V-SKNN (Ludewig & Jannach 2018): the user's last :attr:`query_len` events, weighted by
    position (newest 1, then linearly down), against every training session; the
    :attr:`k` most similar sessions vote for their items with their similarity."""

    name = "sknn"
    k = 100
    query_len = 10

    def fit(self, train: Events, catalog: pl.Series) -> SessionKNNBaseline:
        self.tiebreak_ = popularity_tiebreak(train, catalog)
        self.sessions_ = sessions_matrix(train, catalog)
        norms = np.sqrt(np.asarray(self.sessions_.sum(1)).ravel()).astype(np.float32)
        self.inv_norm_ = sp.diags(1.0 / np.maximum(norms, 1.0))
        return self

    def score(self, inputs, users, catalog, chunk: int = 256):
        n_fit = self.sessions_.shape[1]  # items after the training catalog have no sessions
        h = _history(inputs, catalog).filter(
            (pl.col("c") >= 0) & (pl.col("c") < n_fit) & (pl.col("age") < self.query_len)
        )
        q = h.group_by("user_id", "c").agg((1.0 - pl.col("age").min() / self.query_len).alias("w"))
        dtype = inputs.df["user_id"].dtype
        for part in _user_chunks(users, chunk):
            query = _dense_rows(part, q, "w", torch.zeros(n_fit), dtype).numpy()
            sims = sp.csr_matrix(query) @ self.sessions_.T @ self.inv_norm_  # (chunk, sessions)
            votes = _keep_top(sims.tocsr(), self.k) @ self.sessions_
            out = torch.from_numpy(np.asarray(votes.todense(), dtype=np.float32))
            yield part, widen(_above_tiebreak(out, self.tiebreak_), len(catalog))


class ItemKNNBaseline:
    """Item-kNN (session-rec's ``iknn``): cosine similarity of items' session co-occurrence,
    the neighbours of the user's last item."""

    name = "itemknn"

    def fit(self, train: Events, catalog: pl.Series) -> ItemKNNBaseline:
        self.tiebreak_ = popularity_tiebreak(train, catalog)
        s = sessions_matrix(train, catalog)
        counts = np.asarray(s.sum(0)).ravel().astype(np.float32)
        inv = sp.diags(1.0 / np.sqrt(np.maximum(counts, 1.0)))
        self.sim_ = (inv @ (s.T @ s) @ inv).tocsr()
        return self

    def score(self, inputs, users, catalog, chunk: int = 1024):
        n_fit = self.sim_.shape[0]
        last = _history(inputs, catalog).filter((pl.col("age") == 0) & (pl.col("c") >= 0) & (pl.col("c") < n_fit))
        last = last.with_columns(w=pl.lit(1.0))
        dtype = inputs.df["user_id"].dtype
        for part in _user_chunks(users, chunk):
            onehot = sp.csr_matrix(_dense_rows(part, last, "w", torch.zeros(n_fit), dtype).numpy())
            out = torch.from_numpy(np.asarray((onehot @ self.sim_).todense(), dtype=np.float32))
            yield part, widen(_above_tiebreak(out, self.tiebreak_), len(catalog))


def _keep_top(m: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """Each row's ``k`` largest entries (the nearest sessions); the rest dropped."""
    m = m.tocsr()
    for r in range(m.shape[0]):
        s, e = m.indptr[r], m.indptr[r + 1]
        if e - s > k:
            row = m.data[s:e]
            row[np.argpartition(row, e - s - k)[: e - s - k]] = 0.0
    m.eliminate_zeros()
    return m


def _above_tiebreak(scores: torch.Tensor, tiebreak: torch.Tensor) -> torch.Tensor:
    """Rule scores (>= 0) lifted above the popularity tiebreak wherever they are positive."""
    lifted = scores / scores.amax(1, keepdim=True).clamp(min=1e-12) + 1.0 + TIE_WEIGHT * tiebreak
    return torch.where(scores > 0, lifted, tiebreak)


#: the canonical action names the purchase rules read (:mod:`behaviorlm.data.events` maps aliases to them)
PURCHASE = "purchase"
CART = "add_to_cart"


class CartBaseline:
    """ "In your cart": items carted and not bought since, newest first; then the user's other
    items, newest first; then popularity."""

    name = "cart"

    def fit(self, train: Events, catalog: pl.Series) -> CartBaseline:
        self.tiebreak_ = popularity_tiebreak(train, catalog)
        return self

    def score(self, inputs, users, catalog, chunk: int = 1024):
        h = _history(inputs, catalog).filter(pl.col("c") >= 0)
        bought_after = (
            h.filter(pl.col("event_type") == PURCHASE).group_by("user_id", "c").agg(pl.col("age").min().alias("b"))
        )
        carts = h.filter(pl.col("event_type") == CART).group_by("user_id", "c").agg(pl.col("age").min())
        open_carts = carts.join(bought_after, on=["user_id", "c"], how="left").filter(
            pl.col("b").is_null() | (pl.col("b") > pl.col("age"))  # no purchase since the cart event
        )
        recent = h.group_by("user_id", "c").agg(pl.col("age").min())
        s = recent.join(open_carts.select("user_id", "c", pl.lit(2.0).alias("bonus")), on=["user_id", "c"], how="left")
        s = s.with_columns(s=1.0 + pl.col("bonus").fill_null(0.0) + 1.0 / (2.0 + pl.col("age")))
        for part in _user_chunks(users, chunk):
            yield part, _dense_rows(part, s, "s", widen(self.tiebreak_, len(catalog)), inputs.df["user_id"].dtype)


class PurchasePopularityBaseline:
    """The most bought items in training, the same list for everyone (all-event popularity breaks ties)."""

    name = "purchase_popularity"

    def fit(self, train: Events, catalog: pl.Series) -> PurchasePopularityBaseline:
        idx = catalog_index(catalog, train.df.filter(pl.col("event_type") == PURCHASE)["item_id"])
        bought = torch.from_numpy(np.bincount(idx[idx >= 0], minlength=len(catalog)).astype(np.float32))
        self.scores_ = _above_tiebreak(bought[None, :], popularity_tiebreak(train, catalog)[None, :])[0]
        return self

    def score(self, inputs, users, catalog, chunk: int = 1024):
        s = widen(self.scores_, len(catalog))
        for part in _user_chunks(users, chunk):
            yield part, s.expand(len(part), -1).clone()


class PurchaseCooccurrenceBaseline:
    """What was bought next after the user's last item: counts of (item touched, the user's
    next purchase after it) over the training events; purchase popularity breaks ties."""

    name = "purchase_cooccurrence"

    def fit(self, train: Events, catalog: pl.Series) -> PurchaseCooccurrenceBaseline:
        df = train.df.select("user_id", "event_type", pl.Series("c", catalog_index(catalog, train.df["item_id"])))
        bought = pl.when(pl.col("event_type") == PURCHASE).then(pl.col("c"))
        # the next purchase strictly after each event: shift by one, then fill backwards within the user
        nxt = df.with_columns(bought.shift(-1).backward_fill().over("user_id").alias("next"))
        pairs = nxt.filter((pl.col("c") >= 0) & pl.col("next").is_not_null() & (pl.col("next") >= 0))
        counts = pairs.group_by("c", "next").len()
        self.matrix_ = sp.csr_matrix(
            (counts["len"].to_numpy().astype(np.float32), (counts["c"].to_numpy(), counts["next"].to_numpy())),
            shape=(len(catalog), len(catalog)),
        )
        self.fallback_ = PurchasePopularityBaseline().fit(train, catalog).scores_
        return self

    def score(self, inputs, users, catalog, chunk: int = 1024):
        last = inputs.df.group_by("user_id", maintain_order=True).last()
        last_idx = dict(zip(last["user_id"].to_list(), catalog_index(catalog, last["item_id"]), strict=True))
        n = self.matrix_.shape[0]
        for part in _user_chunks(users, chunk):
            rows = torch.tensor([last_idx.get(u, -1) for u in part], dtype=torch.long)
            known = (rows >= 0) & (rows < n)
            counts = torch.zeros(len(part), n)
            if known.any():
                counts[known] = torch.from_numpy(self.matrix_[rows[known].numpy()].toarray())
            fallback = self.fallback_ / (self.fallback_.max() + 1.0)
            yield part, widen(_above_tiebreak(counts, fallback[None, :].expand(len(part), -1)), len(catalog))


FACTORIES: dict[str, type[Any]] = {
    "popularity": PopularityBaseline,
    "cooccurrence": CooccurrenceBaseline,
    "recent": RecentBaseline,
    "repeat": RepeatBaseline,
    "sknn": SessionKNNBaseline,
    "itemknn": ItemKNNBaseline,
    "cart": CartBaseline,
    "purchase_popularity": PurchasePopularityBaseline,
    "purchase_cooccurrence": PurchaseCooccurrenceBaseline,
}
