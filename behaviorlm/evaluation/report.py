"""``evaluate``: a model and its baselines on one holdout, under one stated protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from behaviorlm.data.events import Events, read_table
from behaviorlm.errors import ConfigurationError, InputDataError
from behaviorlm.evaluation.baselines import BASELINES, FACTORIES, SEEN_ONLY, Scorer, catalog_index
from behaviorlm.evaluation.leakage import check_no_leak
from behaviorlm.evaluation.metrics import (
    ContextCatalog,
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

    def notes(self) -> list[str]:
        """What a reader needs to read the table: which catalog was ranked (and why it is smaller
        than the item count of the events), the share of targets no scorer could rank, and the
        bar for the next-action accuracy."""
        p, lines = self.protocol, []
        extra = p.get("items_in_events", p["catalog_size"]) - p["catalog_size"]
        held = f"; {extra:,} more appear only in held-out events" if extra > 0 else ""
        lines.append(f"catalog: the {p['catalog_size']:,} items of the training events{held}")
        n, bad = p["users"], p["unrankable_targets"]
        lines.append(
            f"unrankable targets: {bad:,} of {n:,} ({bad / max(n, 1):.1%}) are items outside that catalog, "
            "a miss for every scorer"
        )
        if "majority_action_accuracy" in p and "next_action_accuracy" in self.model:
            lines.append(
                f"next_action_accuracy: the model's next-action head; always predicting the commonest action "
                f"scores {p['majority_action_accuracy']:.4f} (baselines rank items only)"
            )
        return lines

    def better_baselines(self) -> dict[str, str]:
        """The baselines significantly better than the model (paired bootstrap CI of the NDCG
        difference entirely below zero), each with that difference and CI in words: what the
        promotion gate and the demo's verdict both read."""
        return {name: _diff(p) for name, p in self.paired.items() if p["significant"] and p["diff"] < 0}

    def rows(self) -> list[tuple[str, dict[str, Any]]]:
        return [("behaviorlm", self.model), *self.baselines.items()]

    def table(self) -> str:
        """One row per scorer: the metrics with their CIs, then NDCG@k with context items and
        on repeat / new-item targets where computed; ``n/a`` for a rule the protocol excludes."""
        k = self.protocol["k"]
        names = [f"ndcg@{k}", f"hr@{k}", "mrr", f"coverage@{k}", "next_action_accuracy"]
        names = [n for n in names if any(n in m for _, m in self.rows())]
        extra = [e for e in ("with_context_items", "repeat", "new") if any(_extra(m, e, k) for _, m in self.rows())]
        titles = {"with_context_items": f"ndcg@{k}+context", "repeat": "ndcg repeat", "new": "ndcg new"}
        head = f"{'model':<14}" + "".join(f"{n:>26}" for n in names) + "".join(f"{titles[e]:>17}" for e in extra)
        lines = [head, "-" * len(head)]
        for label, m in self.rows():
            if "not_applicable" in m:
                lines.append(f"{label:<14}{'n/a (seen items excluded)':>26}")
                continue
            cells = []
            for n in names:
                v = m.get(n)
                ci = m.get("ci95", {}).get(n)
                cell = "" if v is None else f"{v:.4f}" + (f" [{ci[0]:.3f},{ci[1]:.3f}]" if ci else "")
                cells.append(f"{cell:>26}")
            cells += [f"{_extra(m, e, k) or '':>17}" for e in extra]
            lines.append(f"{label:<14}" + "".join(cells))
        return "\n".join(lines)


def _extra(m: dict[str, Any], kind: str, k: int) -> str:
    """A cell of the context / by-target columns ('' when the row has none)."""
    if kind == "with_context_items":
        v = m.get(kind, {}).get(f"ndcg@{k}")
        return "" if v is None else f"{v:.4f}"
    sub = m.get("by_target", {}).get(kind)
    return "" if not sub or not sub["users"] else f"{sub[f'ndcg@{k}']:.4f} ({sub['users']})"


def comparison_lines(report: EvaluationReport) -> list[str]:
    """One sentence per baseline: the paired NDCG difference, its CI, and whether it is noise."""
    k = report.protocol["k"]
    lines = []
    for name, p in report.paired.items():
        line = f"ndcg@{k} vs {name}: {_diff(p)}"
        if "with_context_items" in p:
            line += f"; with context items {_diff(p['with_context_items'])}"
        lines.append(line)
    return lines


def _diff(p: dict[str, Any]) -> str:
    verdict = "significant" if p["significant"] else "inside the noise"
    return f"{p['diff']:+.4f} [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}] ({verdict})"


def evaluate(
    model: Scorer,
    split: Split,
    k: int = 10,
    exclude_seen: bool = True,
    holdout: str = "test",
    n_boot: int = 1000,
    baselines: tuple[str, ...] = BASELINES,
    events: Events | None = None,
) -> EvaluationReport:
    """Evaluate ``model`` and the baselines on ``split.test`` (or ``split.valid``).

    A fitted model is first checked for leaks (:func:`~behaviorlm.evaluation.leakage.check_no_leak`):
    one that trained on the holdout's targets is refused with :class:`LeakError`; ``events``
    (what the split was made from) lets the check also say when they differ from the model's.
    The check's outcome is in ``protocol["leak_check"]``.

    Ranks are over the training catalog; where seen items are kept they are also computed
    over the training catalog plus each user's own context items (``with_context_items``),
    since a rule or model that proposes a new item the user just touched deserves the credit.
    ``recent`` and ``repeat`` only propose seen items: with ``exclude_seen`` they are listed as
    not applicable. Every scorer's NDCG is also split by repeat and new-item targets.
    """
    if k < 1:
        raise ConfigurationError(f"k must be >= 1, got {k}", cli_hint=f"--k must be >= 1, got {k}")
    unknown = sorted(set(baselines) - set(FACTORIES))
    if unknown:
        raise ConfigurationError(f"unknown baseline(s) {unknown}; choose from {list(FACTORIES)}")
    ho = split.test if holdout == "test" else split.valid
    if ho.n_users == 0:
        raise InputDataError(f"{split.name} {holdout} holdout has no users to evaluate")
    leak_check = check_no_leak(model, events, split.name, ho) if hasattr(model, "training_data_") else None
    catalog = split.train.df["item_id"].unique(maintain_order=True)
    ranked: pl.Series | ContextCatalog = catalog if exclude_seen else ContextCatalog.of(catalog, ho.inputs)
    seen = seen_lists(ho.inputs, catalog) if exclude_seen else {}
    ur = rank_targets(model, ho, ranked, k, exclude_seen, seen)
    _add_action_accuracy(model, split.train, ho, ur)
    model_metrics = summarise(ur, k, len(catalog), n_boot)
    base_results: dict[str, dict[str, Any]] = {}
    paired: dict[str, Any] = {}
    for name in baselines:
        if exclude_seen and name in SEEN_ONLY:
            base_results[name] = {"not_applicable": "proposes only seen items, which this protocol excludes"}
            continue
        bur = rank_targets(FACTORIES[name]().fit(split.train, catalog), ho, ranked, k, exclude_seen, seen)
        base_results[name] = summarise(bur, k, len(catalog), n_boot)
        paired[name] = _paired(ur, bur, k, n_boot)
    protocol = {
        **split.info,
        "holdout": holdout,
        "k": k,
        "exclude_seen": exclude_seen,
        "catalog_size": len(catalog),
        "users": ho.n_users,
        "ranking": "full catalog, ties counted against the model",
        "unrankable_targets": int((catalog_index(catalog, ho.targets["item_id"]) < 0).sum()),
        "repeat_targets": int(ur.repeat.sum()) if ur.repeat is not None else None,
        "leak_check": "not a fitted model" if leak_check is None else (leak_check or "passed"),
    }
    if events is not None:
        protocol["items_in_events"] = events.n_items  # the catalog is the training events' items only
    if ur.action_correct is not None:  # what always predicting the commonest action scores: the bar
        protocol["majority_action_accuracy"] = float(_majority_action_correct(split.train, ho, ur.users).mean())
    if isinstance(ranked, ContextCatalog):
        protocol["context_items"] = len(ranked.catalog) - ranked.n_train
        protocol["unrankable_targets_with_context"] = int(
            sum(
                _outside_context(ranked, u, t)
                for u, t in zip(ur.users, _target_index(ranked, ho, ur.users), strict=True)
            )
        )
    return EvaluationReport(protocol, model_metrics, base_results, paired)


def _paired(ur: UserRanks, bur: UserRanks, k: int, n_boot: int) -> dict[str, Any]:
    """The model minus a baseline, per user, NDCG@k: over the training catalog, and with
    context items where those were ranked."""
    key = f"ndcg@{k}"
    order = _alignment(ur.users, bur.users)
    out = paired_difference(per_user_metrics(ur.ranks, k)[key], per_user_metrics(bur.ranks[order], k)[key], n_boot)
    if ur.ranks_context is not None and bur.ranks_context is not None:
        out["with_context_items"] = paired_difference(
            per_user_metrics(ur.ranks_context, k)[key], per_user_metrics(bur.ranks_context[order], k)[key], n_boot
        )
    return out


def _alignment(users: list[Any], other: list[Any]) -> np.ndarray:
    """Positions in ``other`` of each of ``users``: a paired difference compares a user with the
    same user, whatever order each scorer returned them in. Different users are a bug in a
    scorer, never something to pair by position."""
    where = {u: i for i, u in enumerate(other)}
    if len(where) != len(other) or len(other) != len(users) or any(u not in where for u in users):
        missing = [u for u in users if u not in where][:3]
        raise ValueError(
            f"cannot pair per-user results: the scorers ranked different users "
            f"({len(users)} vs {len(other)} rows, {len(set(other))} distinct; e.g. missing {missing})"
        )
    return np.array([where[u] for u in users], dtype=np.int64)


def _target_index(ctx: ContextCatalog, ho: Holdout, users: list[Any]) -> list[int]:
    idx = dict(zip(ho.targets["user_id"].to_list(), catalog_index(ctx.catalog, ho.targets["item_id"]), strict=True))
    return [int(idx[u]) for u in users]


def _outside_context(ctx: ContextCatalog, user: Any, t: int) -> bool:
    """A target no scorer can rank even with context items: unknown, or a new item not in the user's inputs."""
    if t < 0:
        return True
    return t >= ctx.n_train and not bool((ctx.own.get(user, np.zeros(0, np.int64)) == t).any())


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
