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

    from behaviorlm.propensity import PropensityModel
    from behaviorlm.recommender import BehaviorLM
    from behaviorlm.segments import run_segmentation

    end = day_end(args.date)
    upto = ev.derive(ev.df.filter(pl.col("timestamp") < end), "events up to the date")
    model = BehaviorLM.load(out / "model")
    table = None
    for target, column in (("conversion", "propensity"), ("churn", "churn_propensity")):
        pm = PropensityModel(args.propensity_method, target, horizon=args.horizon, n_windows=args.n_windows)
        pm.fit(upto, model, items)
        mlflow.log_metric(f"{column}_valid_roc_auc", pm.train_info_["valid_roc_auc"])
        s = pm.predict(upto, at=end, column=column)
        table = s if table is None else table.join(s.drop("as_of"), on="user_id")
    bins = args.bins if args.bins == "quantile" else [float(x) for x in args.bins.split(",")]
    res = run_segmentation(model, upto, table, out / "segments" / f"date={args.date}", bins=bins, items=items)
    for path in res.files.values():
        mlflow.log_artifact(str(path), artifact_path="segments")
    mlflow.log_metrics({"clusters": res.clustering.k, "mean_propensity": float(table["propensity"].mean())})
    return {"users": res.users.height, "clusters": res.clustering.k}


if __name__ == "__main__":
    from pipelines.steps import main

    sys.exit(main(["segment", *sys.argv[1:]]))
