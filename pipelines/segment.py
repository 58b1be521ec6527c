"""Segment step: conversion and churn propensity, tiers, clusters, profiles and figures as of the date.

Run alone: ``python -m pipelines.segment --date YYYY-MM-DD --dataset NAME`` (reads the earlier steps' outputs).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import polars as pl

from pipelines.common import day_end


def run_step(args, ev, items, source, out: Path) -> dict[str, Any]:
    import mlflow

    from behaviorlm.propensity import user_propensities
    from behaviorlm.recommender import BehaviorLM
    from behaviorlm.segments import parse_bins, run_segmentation

    end = day_end(args.date)
    upto = ev.derive(ev.df.filter(pl.col("timestamp") < end), "events up to the date")
    model = BehaviorLM.load(out / "model")
    table, models = user_propensities(upto, model, items, args.propensity_method, args.horizon, args.n_windows, at=end)
    for column, pm in models.items():
        mlflow.log_metric(f"{column}_valid_roc_auc", pm.train_info_["valid_roc_auc"])
    bins = parse_bins(args.bins)
    res = run_segmentation(model, upto, table, out / "segments" / f"date={args.date}", bins=bins, items=items)
    for path in res.files.values():
        mlflow.log_artifact(str(path), artifact_path="segments")
    mlflow.log_metrics({"clusters": res.clustering.k, "mean_propensity": float(table["propensity"].mean())})
    return {"users": res.users.height, "clusters": res.clustering.k}


if __name__ == "__main__":
    from pipelines.steps import main

    sys.exit(main(["segment", *sys.argv[1:]]))
