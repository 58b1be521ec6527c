"""Segment step: conversion and churn propensity, tiers, clusters, profiles and figures as of the date.

Run alone: ``python -m pipelines.steps segment --date YYYY-MM-DD --dataset NAME`` (reads the earlier steps' outputs).
``segment_day`` is shared with ``pipelines.batch_score``, which runs it on the registry champion.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from pipelines.common import events_until
from pipelines.train import registered_as


@dataclass
class SegmentConfig:
    """How propensities and tiers are made; part of the output's plan, so a change recomputes."""

    method: str = "lightgbm"
    horizon: str = "auto"
    n_windows: int = 3
    bins: str = "quantile"


@dataclass
class DaySegments:
    out_dir: Path
    users: int
    clusters: int
    mean_propensity: float
    valid_roc_auc: dict[str, float] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    reused: bool = False


def segment_day(
    model, upto, items, out_dir: Path, end: datetime, cfg: SegmentConfig, provenance: dict[str, Any]
) -> DaySegments:
    """Propensities + segments for the users active before ``end``, written under ``out_dir``.

    Propensity models (LightGBM by default) are re-fitted on rolling windows that end at ``end``,
    so scoring a past date never sees later events. ``_SUCCESS`` holds the plan (model, events
    digest, config), the summary and the provenance (model URI, registry version, MLflow run, for
    the dashboard) and is written last: a rerun with the same plan reuses the folder, a different
    plan recomputes it.
    """
    from behaviorlm.data.events import events_digest
    from behaviorlm.propensity import user_propensities
    from behaviorlm.segments import parse_bins, run_segmentation, store

    plan = {"events_digest": events_digest(upto), "end": end.isoformat(), "config": asdict(cfg)}
    plan["model_version"] = model.model_version
    old = store.read_record(out_dir)
    if old is not None and old.get("plan") == plan:
        return DaySegments(out_dir, files=store.output_files(out_dir), reused=True, **old["summary"])
    table, models = user_propensities(upto, model, items, cfg.method, cfg.horizon, cfg.n_windows, at=end)
    saved = {c: pm for c, pm in models.items() if hasattr(pm.scorer_, "save")}  # the service scores new users
    auc = {c: float(pm.train_info_["valid_roc_auc"]) for c, pm in models.items()}
    record = {"plan": plan, "summary": {"valid_roc_auc": auc}, "provenance": provenance, "date": _day_of(end)}
    run_segmentation(model, upto, table, out_dir, bins=parse_bins(cfg.bins), items=items, models=saved, record=record)
    return DaySegments(out_dir, files=store.output_files(out_dir), **store.read_record(out_dir)["summary"])


def add_segment_args(ap) -> None:
    """The options of :class:`SegmentConfig`, shared by the pipeline and the scheduled job."""
    ap.add_argument("--propensity-method", default="lightgbm", help="heuristic|lightgbm|transformer|zero_shot")
    ap.add_argument(
        "--horizon", default="auto", help="conversion/churn window, e.g. 1d, 7d (auto: chosen from the data, said)"
    )
    ap.add_argument("--n-windows", type=int, default=3, help="rolling training windows for the propensity models")
    ap.add_argument("--bins", default="quantile", help="tier edges 'a,b' or 'quantile'")


def _day_of(end: datetime) -> str:
    """The day whose events were used: ``end`` is exclusive (midnight after it)."""
    return (end - timedelta(microseconds=1)).date().isoformat()


def config_from(args) -> SegmentConfig:
    return SegmentConfig(args.propensity_method, args.horizon, args.n_windows, args.bins)


def run_step(args, ev, items, source, out: Path) -> dict[str, Any]:
    import mlflow

    from behaviorlm.recommender import BehaviorLM

    upto, end = events_until(ev, args.date)
    model = BehaviorLM.load(out / "model")
    origin = {"model_uri": str(out / "model"), "run_id": mlflow.active_run().info.run_id} | registered_as(out, model)
    day = segment_day(model, upto, items, out / "segments" / f"date={args.date}", end, config_from(args), origin)
    for column, auc in day.valid_roc_auc.items():
        mlflow.log_metric(f"{column}_valid_roc_auc", auc)
    for path in day.files:
        mlflow.log_artifact(str(path), artifact_path="segments")
    mlflow.log_metrics({"clusters": day.clusters, "mean_propensity": day.mean_propensity})
    return {"users": day.users, "clusters": day.clusters}
