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
    from behaviorlm.explain import explain_batch, make_explainer
    from behaviorlm.explain.grounded import grounded_contexts
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
    grounded = grounded_contexts(model, recs.select("user_id", "item_id", "score", "rank"), mine, items, profiles)
    explainer = make_explainer(cache_dir=out / "cache" / "explanations")
    table = explain_batch(grounded.contexts, explainer)
    path = write_parquet_atomic(table, out / "rationales" / f"date={args.date}.parquet")
    mlflow.log_artifact(str(path), artifact_path="rationales")
    if grounded.attributions is not None:
        att = write_parquet_atomic(grounded.attributions.events, out / "attributions" / f"date={args.date}.parquet")
        mlflow.log_artifact(str(att), artifact_path="attributions")
    figures = rationale_figures(table)
    mlflow.log_metrics({"rationales": table.height} | figures)
    return {"rationales": table.height, "source": explainer.source} | figures


def rationale_figures(table: pl.DataFrame) -> dict[str, float]:
    """What the step's run reports: fallbacks, how many items the model's attributions explain,
    how many of those rationales cite the strongest attributed event, and how varied they are."""
    if not table.height:
        return {"fallback_rate": 0.0, "attributed_share": 0.0, "cites_attributed": 0.0, "distinct_per_1000": 0.0}
    attributed = table.filter(pl.col("attributed").list.len() > 0)
    cites = attributed.select(pl.col("evidence").list.contains(pl.col("attributed").list.first()).mean()).item()
    return {
        "fallback_rate": float((table["source"] == "fallback").mean()),
        "attributed_share": attributed.height / table.height,
        "cites_attributed": float(cites) if attributed.height else 0.0,
        "distinct_per_1000": 1000 * table["rationale"].n_unique() / table.height,
    }
