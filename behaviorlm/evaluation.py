"""Honest offline evaluation: leak-free splits, full-catalog ranking, baselines, bootstrap CIs.

Protocol rules this module enforces (and the tests check):

* **Splits never leak.** In leave-one-out the model is trained on each user's events minus the
  last two; it is validated on the second-to-last with the earlier events as input and tested
  on the last with all earlier events as input. A target event is never an input of its own
  prediction and never a training target. The temporal split cuts at global times.
* **Full catalog, no sampled negatives.** Every item of the training catalog is ranked. Ties
  are counted *against* the model (rank = number of items scoring >= the target), so a constant
  scorer gets rank = catalog size, never rank 1.
* A target the scorer cannot rank (item unseen in training, or excluded because already seen
  when ``exclude_seen=True``) counts as a miss; nothing is silently dropped from the average.
* Baselines (most-popular, last-item co-occurrence) are scored on the same users, catalog and
  masks, and every metric carries a percentile-bootstrap 95% CI over users.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import polars as pl
import torch

from behaviorlm.events import Events, as_events

# --------------------------------------------------------------------------- splits


@dataclass
class Holdout:
    """Per-user prediction tasks: the model sees ``inputs`` and must rank ``targets`` (one per user)."""

    inputs: Events
    targets: pl.DataFrame  # user_id, item_id, event_type, timestamp

    @property
    def n_users(self) -> int:
        return self.targets.height


@dataclass
class Split:
    name: str
    train: Events
    valid: Holdout
    test: Holdout
    info: dict[str, Any] = field(default_factory=dict)


def leave_one_out(events: Events | Any, min_events: int = 3) -> Split:
    """Last event of each user = test, second-to-last = validation, the rest = train.

    Users with fewer than ``min_events`` (>= 3) events are kept in training but not evaluated.
    """
    if min_events < 3:
        raise ValueError("leave-one-out needs min_events >= 3 (train, validation, test)")
    ev = as_events(events)
    df = ev.df.with_columns(
        pl.int_range(pl.len()).over("user_id").alias("__pos"), pl.len().over("user_id").cast(pl.Int64).alias("__n")
    )
    evaluated = pl.col("__n") >= min_events
    cols = ev.df.columns
    train = df.filter(~evaluated | (pl.col("__pos") < pl.col("__n") - 2)).select(cols)
    val_t = df.filter(evaluated & (pl.col("__pos") == pl.col("__n") - 2)).select(cols)
    test_in = df.filter(evaluated & (pl.col("__pos") < pl.col("__n") - 1)).select(cols)
    test_t = df.filter(evaluated & (pl.col("__pos") == pl.col("__n") - 1)).select(cols)
    val_in = train.filter(pl.col("user_id").is_in(val_t["user_id"].implode()))
    n_skipped = ev.n_users - val_t.height
    info = {"split": "loo", "min_events": min_events, "users_evaluated": val_t.height, "users_too_short": n_skipped}
    return Split(
        "loo",
        train=ev.derive(train, "loo train: all but each user's last two events"),
        valid=Holdout(ev.derive(val_in, "loo validation inputs"), val_t),
        test=Holdout(ev.derive(test_in, "loo test inputs"), test_t),
        info=info,
    )


def temporal_split(events: Events | Any, test_start: Any = None, val_start: Any = None) -> Split:
    """Global time cut: train < val_start <= validation < test_start <= test.

    Targets are each user's *first* event after the cut (next-action prediction at that time),
    for users with at least one event before it; defaults cut at the 80% / 90% time quantiles.
    """
    ev = as_events(events)
    ts = ev.df["timestamp"]
    test_start = _as_time(test_start if test_start is not None else ts.quantile(0.9, "nearest"))
    val_start = _as_time(val_start if val_start is not None else ts.quantile(0.8, "nearest"))
    if not val_start < test_start:
        raise ValueError(f"val_start ({val_start}) must be before test_start ({test_start})")
    train = ev.df.filter(pl.col("timestamp") < val_start)
    if train.height == 0:
        raise ValueError(f"temporal split: no events before val_start={val_start}")
    val_in, val_t = _next_event_targets(ev.df, val_start, test_start)
    test_in, test_t = _next_event_targets(ev.df, test_start, None)
    info = {
        "split": "temporal",
        "val_start": str(val_start),
        "test_start": str(test_start),
        "users_evaluated": test_t.height,
        "valid_users": val_t.height,
    }
    return Split(
        "temporal",
        train=ev.derive(train, f"temporal train: events before {val_start}"),
        valid=Holdout(ev.derive(val_in, "temporal validation inputs"), val_t),
        test=Holdout(ev.derive(test_in, "temporal test inputs"), test_t),
        info=info,
    )


def _as_time(value: Any) -> Any:
    s = pl.Series([value])
    if s.dtype == pl.String:
        s = s.str.to_datetime(time_zone="UTC")
    elif s.dtype == pl.Datetime and getattr(s.dtype, "time_zone", None) is None:
        s = s.dt.replace_time_zone("UTC")
    return s.dt.cast_time_unit("us")[0]


def _next_event_targets(df: pl.DataFrame, start: Any, end: Any) -> tuple[pl.DataFrame, pl.DataFrame]:
    before = df.filter(pl.col("timestamp") < start)
    window = df.filter(pl.col("timestamp") >= start)
    if end is not None:
        window = window.filter(pl.col("timestamp") < end)
    targets = window.group_by("user_id", maintain_order=True).first()
    targets = targets.filter(pl.col("user_id").is_in(before["user_id"].unique().implode()))
    inputs = before.filter(pl.col("user_id").is_in(targets["user_id"].implode()))
    return inputs, targets.select(df.columns)


# --------------------------------------------------------------------------- scorers


class Scorer(Protocol):
    """Anything that scores the catalog for users from their input events."""

    name: str

    def score(self, inputs: Events, users: list[Any], catalog: pl.Series) -> Iterator[tuple[list[Any], torch.Tensor]]:
        """Yield (users of the chunk, scores of shape (chunk, len(catalog)))."""
        ...


def _catalog_index(catalog: pl.Series, ids: pl.Series) -> np.ndarray:
    """Map item ids to positions in the catalog; -1 where absent."""
    ids = ids.cast(catalog.dtype, strict=False)
    return ids.replace_strict(catalog, np.arange(len(catalog)), default=-1, return_dtype=pl.Int64).to_numpy(
        writable=True
    )


class PopularityBaseline:
    """Most-popular items in the training events, the same list for every user."""

    name = "popularity"

    def fit(self, train: Events, catalog: pl.Series) -> PopularityBaseline:
        idx = _catalog_index(catalog, train.df["item_id"])
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
        df = train.df.with_columns(item=pl.Series(_catalog_index(catalog, train.df["item_id"])))
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
        last_idx = dict(zip(last["user_id"].to_list(), _catalog_index(catalog, last["item_id"]), strict=True))
        for i in range(0, len(users), chunk):
            part = users[i : i + chunk]
            out = self.tiebreak_.expand(len(part), -1).clone()
            for r, u in enumerate(part):
                j = last_idx.get(u, -1)
                if j >= 0:
                    s, e = self.row_ptr_[j], self.row_ptr_[j + 1]
                    out[r, torch.from_numpy(self.next_[s:e])] += torch.from_numpy(self.val_[s:e])
            yield part, out


# --------------------------------------------------------------------------- metrics


@dataclass
class UserRanks:
    """Per-user outcome of one scorer on one holdout (rank = inf for a miss)."""

    users: list[Any]
    ranks: np.ndarray
    topk: np.ndarray  # (n_users, k) catalog indices recommended
    action_correct: np.ndarray | None = None


def rank_targets(
    scorer: Scorer,
    holdout: Holdout,
    catalog: pl.Series,
    k: int = 10,
    exclude_seen: bool = True,
    seen: dict[Any, np.ndarray] | None = None,
) -> UserRanks:
    """Rank each user's target among the full catalog (pessimistic ties).

    ``seen`` (from :func:`seen_lists`) lets callers that rank the same holdout repeatedly --
    several scorers, or every epoch's validation -- compute the seen-item lists once.
    """
    targets = holdout.targets
    users = targets["user_id"].to_list()
    tgt = dict(zip(users, _catalog_index(catalog, targets["item_id"]), strict=True))
    if not exclude_seen:
        seen = {}
    elif seen is None:
        seen = seen_lists(holdout.inputs, catalog)
    ranks, tops, order = [], [], []
    for part, scores in scorer.score(holdout.inputs, users, catalog):
        scores = scores.float().clone()
        t_idx = torch.tensor([tgt[u] for u in part], dtype=torch.long)
        t_score = scores.gather(1, t_idx.clamp(min=0)[:, None]).squeeze(1)
        target_seen = torch.zeros(len(part), dtype=torch.bool)
        if exclude_seen:
            for r, u in enumerate(part):
                s = seen.get(u)
                if s is not None and len(s):
                    target_seen[r] = bool((s == tgt[u]).any())
                    scores[r, torch.from_numpy(s)] = float("-inf")
        rank = (scores >= t_score[:, None]).sum(1).double()
        miss = (t_idx < 0) | target_seen | ~torch.isfinite(t_score)
        rank[miss] = float("inf")
        ranks.append(rank.numpy())
        tops.append(torch.topk(scores, min(k, scores.shape[1]), dim=1).indices.numpy())
        order += part
    return UserRanks(order, np.concatenate(ranks), np.concatenate(tops))


def seen_lists(inputs: Events, catalog: pl.Series) -> dict[Any, np.ndarray]:
    """Catalog positions of the items each user touched in ``inputs``."""
    df = inputs.df.select("user_id", pl.Series("c", _catalog_index(catalog, inputs.df["item_id"])))
    g = df.filter(pl.col("c") >= 0).group_by("user_id").agg(pl.col("c").unique())
    return {u: np.asarray(c, dtype=np.int64) for u, c in zip(g["user_id"].to_list(), g["c"].to_list(), strict=True)}


def per_user_metrics(ranks: np.ndarray, k: int) -> dict[str, np.ndarray]:
    hit = ranks <= k
    with np.errstate(divide="ignore"):
        ndcg = np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0)
        rr = np.where(np.isfinite(ranks), 1.0 / ranks, 0.0)
    return {f"hr@{k}": hit.astype(float), f"ndcg@{k}": ndcg, "mrr": rr}


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean over users."""
    if len(values) == 0 or n_boot < 1:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    means = values[idx].mean(1)
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def summarise(ur: UserRanks, k: int, n_catalog: int, n_boot: int = 1000) -> dict[str, Any]:
    per_user = per_user_metrics(ur.ranks, k)
    out: dict[str, Any] = {name: float(v.mean()) if len(v) else float("nan") for name, v in per_user.items()}
    out[f"coverage@{k}"] = float(len(np.unique(ur.topk)) / n_catalog) if ur.topk.size else 0.0
    if ur.action_correct is not None:
        out["next_action_accuracy"] = float(ur.action_correct.mean())
    if n_boot:
        out["ci95"] = {name: list(bootstrap_ci(v, n_boot)) for name, v in per_user.items()}
    return out


# --------------------------------------------------------------------------- report


@dataclass
class EvaluationReport:
    """Model and baseline metrics on one holdout, under one stated protocol."""

    protocol: dict[str, Any]
    model: dict[str, Any]
    baselines: dict[str, dict[str, Any]]
    paired: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.model,
            "baselines": self.baselines,
            "paired_vs_baselines": self.paired,
            "protocol": self.protocol,
        }

    def rows(self) -> list[tuple[str, dict[str, Any]]]:
        return [("behaviorlm", self.model), *self.baselines.items()]

    def table(self) -> str:
        k = self.protocol["k"]
        names = [f"ndcg@{k}", f"hr@{k}", "mrr", f"coverage@{k}", "next_action_accuracy"]
        names = [n for n in names if any(n in m for _, m in self.rows())]
        head = f"{'model':<14}" + "".join(f"{n:>26}" for n in names)
        lines = [head, "-" * len(head)]
        for label, m in self.rows():
            cells = []
            for n in names:
                v = m.get(n)
                ci = m.get("ci95", {}).get(n)
                cell = "" if v is None else f"{v:.4f}" + (f" [{ci[0]:.3f},{ci[1]:.3f}]" if ci else "")
                cells.append(f"{cell:>26}")
            lines.append(f"{label:<14}" + "".join(cells))
        return "\n".join(lines)


def comparison_lines(report: EvaluationReport) -> list[str]:
    """One sentence per baseline: the paired NDCG difference, its CI, and whether it is noise."""
    k = report.protocol["k"]
    lines = []
    for name, p in report.paired.items():
        verdict = "significant" if p["significant"] else "inside the noise"
        lines.append(f"ndcg@{k} vs {name}: {p['diff']:+.4f} [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}] ({verdict})")
    return lines


def paired_difference(a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Mean difference a-b over the same users with a bootstrap CI; says if it is inside the noise."""
    lo, hi = bootstrap_ci(a - b, n_boot, seed)
    return {"diff": float((a - b).mean()), "ci95": [lo, hi], "significant": bool(lo > 0 or hi < 0)}  # nan -> False


def evaluate(
    model: Scorer,
    split: Split,
    k: int = 10,
    exclude_seen: bool = True,
    holdout: str = "test",
    n_boot: int = 1000,
    baselines: tuple[str, ...] = ("popularity", "cooccurrence"),
) -> EvaluationReport:
    """Evaluate ``model`` and the baselines on ``split.test`` (or ``split.valid``)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ho = split.test if holdout == "test" else split.valid
    if ho.n_users == 0:
        raise ValueError(f"{split.name} {holdout} holdout has no users to evaluate")
    catalog = split.train.df["item_id"].unique(maintain_order=True)
    seen = seen_lists(ho.inputs, catalog) if exclude_seen else {}
    ur = rank_targets(model, ho, catalog, k, exclude_seen, seen)
    _add_action_accuracy(model, split.train, ho, ur)
    results = {"behaviorlm": summarise(ur, k, len(catalog), n_boot)}
    model_metrics = per_user_metrics(ur.ranks, k)
    base_results, paired = {}, {}
    factories = {"popularity": PopularityBaseline, "cooccurrence": CooccurrenceBaseline}
    for name in baselines:
        base = factories[name]().fit(split.train, catalog)
        bur = rank_targets(base, ho, catalog, k, exclude_seen, seen)
        if ur.action_correct is not None:
            bur.action_correct = _majority_action_correct(split.train, ho, bur.users)
        base_results[name] = summarise(bur, k, len(catalog), n_boot)
        paired[name] = paired_difference(
            model_metrics[f"ndcg@{k}"], per_user_metrics(bur.ranks, k)[f"ndcg@{k}"], n_boot
        )
    protocol = {
        **split.info,
        "holdout": holdout,
        "k": k,
        "exclude_seen": exclude_seen,
        "catalog_size": len(catalog),
        "users": ho.n_users,
        "ranking": "full catalog, ties counted against the model",
        "unrankable_targets": int((_catalog_index(catalog, ho.targets["item_id"]) < 0).sum()),
    }
    return EvaluationReport(protocol, results["behaviorlm"], base_results, paired)


def _add_action_accuracy(model: Any, train: Events, ho: Holdout, ur: UserRanks) -> None:
    """Next-action-type accuracy, when the scorer predicts action types and training has several."""
    if not hasattr(model, "next_action_proba") or train.df["event_type"].n_unique() < 2:
        return
    proba = model.next_action_proba(events=ho.inputs)
    pred = proba.select("user_id", pl.col("predicted_action"))
    joined = ho.targets.select("user_id", "event_type").join(pred, on="user_id", how="left")
    lookup = dict(
        zip(joined["user_id"].to_list(), (joined["event_type"] == joined["predicted_action"]).to_list(), strict=True)
    )
    ur.action_correct = np.array([bool(lookup.get(u)) for u in ur.users])


def _majority_action_correct(train: Events, ho: Holdout, users: list[Any]) -> np.ndarray:
    majority = train.df["event_type"].mode().sort()[0]
    lookup = dict(zip(ho.targets["user_id"].to_list(), ho.targets["event_type"].to_list(), strict=True))
    return np.array([lookup[u] == majority for u in users])
