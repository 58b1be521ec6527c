"""Full-catalog ranking of held-out targets, per-user metrics, bootstrap intervals."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import torch

from behaviorlm.data.events import Events
from behaviorlm.evaluation.baselines import Scorer, catalog_index
from behaviorlm.evaluation.splits import Holdout
from behaviorlm.inference.engine import mask_seen_, seen_pairs_of

# --------------------------------------------------------------------------- metrics


@dataclass
class UserRanks:
    """Per-user outcome of one scorer on one holdout (rank = inf for a miss).

    ``ranks`` are over the training catalog; ``ranks_context`` (when computed) over the
    training catalog plus each user's own context items, so that a scorer proposing a new item
    the user just touched gets credit; ``repeat`` flags targets the user had touched before.
    """

    users: list[Any]
    ranks: np.ndarray
    topk: np.ndarray  # (n_users, k) catalog indices recommended
    action_correct: np.ndarray | None = None
    ranks_context: np.ndarray | None = None
    repeat: np.ndarray | None = None


@dataclass
class ContextCatalog:
    """The training catalog followed by the items of a holdout's inputs that it lacks, and which
    of those each user's own inputs hold: scorers rank the whole of it, and each user's row is
    masked to the training catalog plus *their* context items."""

    catalog: pl.Series
    n_train: int
    own: dict[Any, np.ndarray]  # user -> positions >= n_train in their inputs

    @classmethod
    def of(cls, train_catalog: pl.Series, inputs: Events) -> ContextCatalog:
        extra = inputs.df["item_id"].unique(maintain_order=True)
        extra = extra.filter(~extra.is_in(train_catalog.implode()))
        full = pl.concat([train_catalog, extra.cast(train_catalog.dtype)]) if len(extra) else train_catalog
        idx = catalog_index(full, inputs.df["item_id"])
        df = inputs.df.select("user_id", pl.Series("c", idx)).filter(pl.col("c") >= len(train_catalog))
        g = df.group_by("user_id").agg(pl.col("c").unique())
        own = {u: np.asarray(c, np.int64) for u, c in zip(g["user_id"].to_list(), g["c"].to_list(), strict=True)}
        return cls(full, len(train_catalog), own)


def rank_targets(
    scorer: Scorer,
    holdout: Holdout,
    catalog: pl.Series | ContextCatalog,
    k: int = 10,
    exclude_seen: bool = True,
    seen: dict[Any, np.ndarray] | None = None,
) -> UserRanks:
    """Rank each user's target among the full catalog (pessimistic ties).

    ``seen`` (from :func:`seen_lists`) lets callers that rank the same holdout repeatedly --
    several scorers, or every epoch's validation -- compute the seen-item lists once. With a
    :class:`ContextCatalog` the ranks with context items are computed from the same scores.
    """
    ctx = catalog if isinstance(catalog, ContextCatalog) else None
    full: pl.Series = catalog.catalog if isinstance(catalog, ContextCatalog) else catalog
    n_train = ctx.n_train if ctx else len(full)
    targets = holdout.targets
    users = targets["user_id"].to_list()
    tgt = dict(zip(users, catalog_index(full, targets["item_id"]), strict=True))
    if not exclude_seen:
        seen = {}
    elif seen is None:
        seen = seen_lists(holdout.inputs, full)
    ranks, ranks_ctx, tops, order = [], [], [], []
    for part, scores in scores_of(scorer, holdout, users, full):
        scores = scores.float().clone()
        t_idx = torch.tensor([tgt[u] for u in part], dtype=torch.long)
        target_seen = (
            _mask_seen(scores, part, t_idx, seen) if exclude_seen else torch.zeros(len(part), dtype=torch.bool)
        )
        if ctx is not None:
            _mask_others_context(scores, part, ctx)
            ranks_ctx.append(_ranks(scores, t_idx, target_seen))
        in_train = scores[:, :n_train]
        ranks.append(_ranks(in_train, t_idx.masked_fill(t_idx >= n_train, -1), target_seen))
        tops.append(torch.topk(in_train, min(k, n_train), dim=1).indices.numpy())
        order += part
    return UserRanks(
        order,
        np.concatenate(ranks),
        np.concatenate(tops),
        ranks_context=np.concatenate(ranks_ctx) if ctx is not None else None,
        repeat=repeat_targets(holdout, order),
    )


def scores_of(scorer: Scorer, holdout: Holdout, users: list[Any], catalog: pl.Series):
    """The scorer's chunks for the holdout's users. A model that reads the request time
    (``time_context_ == "request"``) is asked at each target's own timestamp -- the time the
    request would have come -- and given nothing else of the target."""
    if getattr(scorer, "time_context_", "history") != "request":
        return scorer.score(holdout.inputs, users, catalog)
    when = dict(zip(holdout.targets["user_id"].to_list(), holdout.targets["timestamp"].to_list(), strict=True))
    return scorer.score(holdout.inputs, users, catalog, as_of=when)  # type: ignore[call-arg]


def _mask_seen(scores: torch.Tensor, part: list[Any], t_idx: torch.Tensor, seen: dict[Any, np.ndarray]) -> torch.Tensor:
    """Mask each row's seen items in place with the engine's own mask (what serving runs);
    whether each row's target was among them."""
    rows, cols = pairs = seen_pairs_of([seen.get(u, _NONE) for u in part])
    mask_seen_(scores, slice(0, len(part)), pairs)
    hit = np.zeros(len(part), dtype=bool)
    hit[rows[cols == t_idx.numpy()[rows]]] = True
    return torch.from_numpy(hit)


_NONE = np.zeros(0, np.int64)


def _mask_others_context(scores: torch.Tensor, part: list[Any], ctx: ContextCatalog) -> None:
    """Each row keeps the training catalog and its own context items; other users' go to -inf."""
    if scores.shape[1] == ctx.n_train:
        return
    keep = torch.zeros(len(part), scores.shape[1] - ctx.n_train, dtype=torch.bool)
    for r, u in enumerate(part):
        own = ctx.own.get(u)
        if own is not None and len(own):
            keep[r, torch.from_numpy(own - ctx.n_train)] = True
    scores[:, ctx.n_train :].masked_fill_(~keep, float("-inf"))


def _ranks(scores: torch.Tensor, t_idx: torch.Tensor, target_seen: torch.Tensor) -> np.ndarray:
    """1-based pessimistic rank of each row's target (``inf``: unknown, excluded or -inf)."""
    t_score = scores.gather(1, t_idx.clamp(min=0)[:, None]).squeeze(1)
    rank = (scores >= t_score[:, None]).sum(1).double()
    rank[(t_idx < 0) | target_seen | ~torch.isfinite(t_score)] = float("inf")
    return rank.numpy()


def repeat_targets(holdout: Holdout, users: list[Any]) -> np.ndarray:
    """Whether each user's target item is one their inputs already hold (a repeat target)."""
    t = holdout.targets.select("user_id", "item_id")
    hit = t.join(holdout.inputs.df.select("user_id", "item_id").unique(), on=["user_id", "item_id"], how="semi")
    found = set(hit["user_id"].to_list())
    return np.array([u in found for u in users], dtype=bool)


def seen_lists(inputs: Events, catalog: pl.Series) -> dict[Any, np.ndarray]:
    """Catalog positions of the items each user touched in ``inputs``."""
    df = inputs.df.select("user_id", pl.Series("c", catalog_index(catalog, inputs.df["item_id"])))
    g = df.filter(pl.col("c") >= 0).group_by("user_id").agg(pl.col("c").unique())
    return {u: np.asarray(c, dtype=np.int64) for u, c in zip(g["user_id"].to_list(), g["c"].to_list(), strict=True)}


def list_ranks(top: np.ndarray, target: np.ndarray) -> np.ndarray:
    """1-based rank of each row's target in its top-k list (``inf`` when absent): metrics for
    lists that came from a top-k (another engine, approximate retrieval), not a full ranking."""
    hit = top == np.asarray(target)[:, None]
    return np.where(hit.any(1), hit.argmax(1) + 1.0, np.inf)


def mean_ndcg(
    scorer: Scorer,
    holdout: Holdout,
    catalog: pl.Series,
    k: int = 10,
    exclude_seen: bool = True,
    seen: dict[Any, np.ndarray] | None = None,
) -> float:
    """Mean NDCG@k of ``scorer`` on ``holdout``: the one number early stopping, a stage's
    validation and a pipeline gate compare."""
    ranks = rank_targets(scorer, holdout, catalog, k, exclude_seen, seen).ranks
    return float(per_user_metrics(ranks, k)[f"ndcg@{k}"].mean())


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
    """Means and bootstrap CIs of the per-user metrics, coverage, next-action accuracy, and --
    where known -- the figures with context items and split by repeat / new-item targets."""
    out = _means(ur.ranks, k, n_boot)
    out[f"coverage@{k}"] = float(len(np.unique(ur.topk)) / n_catalog) if ur.topk.size else 0.0
    if ur.action_correct is not None:
        out["next_action_accuracy"] = float(ur.action_correct.mean())
    if ur.ranks_context is not None:
        out["with_context_items"] = _means(ur.ranks_context, k, n_boot)
    if ur.repeat is not None:
        out["by_target"] = {
            kind: {"users": int(sel.sum()), **_means(ur.ranks[sel], k, 0)}
            for kind, sel in (("repeat", ur.repeat), ("new", ~ur.repeat))
        }
    return out


def _means(ranks: np.ndarray, k: int, n_boot: int) -> dict[str, Any]:
    per_user = per_user_metrics(ranks, k)
    out: dict[str, Any] = {name: float(v.mean()) if len(v) else float("nan") for name, v in per_user.items()}
    if n_boot:
        out["ci95"] = {name: list(bootstrap_ci(v, n_boot)) for name, v in per_user.items()}
    return out


def paired_difference(a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Mean difference a-b over the same users with a bootstrap CI; says if it is inside the noise."""
    lo, hi = bootstrap_ci(a - b, n_boot, seed)
    return {"diff": float((a - b).mean()), "ci95": [lo, hi], "significant": bool(lo > 0 or hi < 0)}  # nan -> False
