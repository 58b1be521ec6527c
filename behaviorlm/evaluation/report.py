"""``evaluate``: a model and its baselines on one holdout, under one stated protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from behaviorlm.data.events import Events, read_table
from behaviorlm.errors import ConfigurationError, InputDataError
from behaviorlm.evaluation.baselines import CooccurrenceBaseline, PopularityBaseline, Scorer, catalog_index
from behaviorlm.evaluation.metrics import (
    UserRanks,
    paired_difference,
    per_user_metrics,
    rank_targets,
    seen_lists,
    summarise,
)
from behaviorlm.evaluation.splits import Holdout, Split

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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvaluationReport:
        """The inverse of :meth:`to_dict` (a ``metrics.json`` read back for a summary)."""
        rest = {k: v for k, v in d.items() if k not in ("baselines", "paired_vs_baselines", "protocol")}
        return cls(d["protocol"], rest, d.get("baselines", {}), d.get("paired_vs_baselines", {}))

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
        raise ConfigurationError(f"k must be >= 1, got {k}", cli_hint=f"--k must be >= 1, got {k}")
    ho = split.test if holdout == "test" else split.valid
    if ho.n_users == 0:
        raise InputDataError(f"{split.name} {holdout} holdout has no users to evaluate")
    catalog = split.train.df["item_id"].unique(maintain_order=True)
    seen = seen_lists(ho.inputs, catalog) if exclude_seen else {}
    ur = rank_targets(model, ho, catalog, k, exclude_seen, seen)
    _add_action_accuracy(model, split.train, ho, ur)
    results = {"behaviorlm": summarise(ur, k, len(catalog), n_boot)}
    model_metrics = per_user_metrics(ur.ranks, k)
    base_results, paired = {}, {}
    factories: dict[str, type[Any]] = {"popularity": PopularityBaseline, "cooccurrence": CooccurrenceBaseline}
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
        "unrankable_targets": int((catalog_index(catalog, ho.targets["item_id"]) < 0).sum()),
    }
    return EvaluationReport(protocol, results["behaviorlm"], base_results, paired)


def _add_action_accuracy(model: Any, train: Events, ho: Holdout, ur: UserRanks) -> None:
    """Next-action-type accuracy, when the scorer predicts action types and training has several."""
    if not hasattr(model, "next_action_proba") or train.df["event_type"].n_unique() < 2:
        return
    proba = read_table(model.next_action_proba(events=ho.inputs), "next-action probabilities")  # any set_output
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
