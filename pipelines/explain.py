"""Explain step: rationales for the top recommendations of the first users scored on the date.

Run alone: ``python -m pipelines.steps explain --date YYYY-MM-DD --dataset NAME`` (reads the earlier steps' outputs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from pipelines.common import events_until


def run_step(args, ev, items, source, out: Path) -> dict[str, Any]:
    import mlflow

    from behaviorlm.data.io import write_parquet_atomic
    from behaviorlm.explain import build_contexts, explain_batch, make_explainer
    from behaviorlm.recommender import BehaviorLM
    from behaviorlm.segments import store

    model = BehaviorLM.load(out / "model")
    scores = pl.read_parquet(sorted((out / "scores" / f"date={args.date}").glob("part-*.parquet")))
    users = scores["user_id"].unique(maintain_order=True).head(args.explain_users)
    recs = scores.filter(pl.col("user_id").is_in(users.implode()) & (pl.col("rank") <= 5))
    seg_users = store.read_users(store.day_folder(out / "segments", args.date))
    profiles = seg_users.select("user_id", "propensity", "tier", "cluster") if seg_users is not None else None
    upto, _ = events_until(ev, args.date)
    mine = upto.derive(upto.df.filter(pl.col("user_id").is_in(users.implode())), "the explained users' events")
    contexts = build_contexts(
        recs, mine, items if items is not None else model.items_, profiles, model_version=model.model_version
    )
    explainer = make_explainer(cache_dir=out / "cache" / "explanations")
    table = explain_batch(contexts, explainer)
    path = write_parquet_atomic(table, out / "rationales" / f"date={args.date}.parquet")
    mlflow.log_artifact(str(path), artifact_path="rationales")
    fallback = float((table["source"] == "fallback").mean()) if table.height else 0.0
    mlflow.log_metrics({"rationales": table.height, "fallback_rate": fallback})
    return {"rationales": table.height, "source": explainer.source}
