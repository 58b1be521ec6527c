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
    tgt = dict(zip(users, catalog_index(catalog, targets["item_id"]), strict=True))
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
    df = inputs.df.select("user_id", pl.Series("c", catalog_index(catalog, inputs.df["item_id"])))
    g = df.filter(pl.col("c") >= 0).group_by("user_id").agg(pl.col("c").unique())
    return {u: np.asarray(c, dtype=np.int64) for u, c in zip(g["user_id"].to_list(), g["c"].to_list(), strict=True)}


def list_ranks(top: np.ndarray, target: np.ndarray) -> np.ndarray:
    """1-based rank of each row's target in its top-k list (``inf`` when absent): metrics for
    lists that came from a top-k (another engine, approximate retrieval), not a full ranking."""
    hit = top == np.asarray(target)[:, None]
    return np.where(hit.any(1), hit.argmax(1) + 1.0, np.inf)


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


def paired_difference(a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Mean difference a-b over the same users with a bootstrap CI; says if it is inside the noise."""
    lo, hi = bootstrap_ci(a - b, n_boot, seed)
    return {"diff": float((a - b).mean()), "ci95": [lo, hi], "significant": bool(lo > 0 or hi < 0)}  # nan -> False
