"""The batch pipeline's steps, each an MLflow run that reads the previous step's outputs.

    python -m pipelines.steps all --dataset taobao --date 2017-12-03        # every step, nested runs
    python -m pipelines.steps segment --dataset taobao --date 2017-12-03    # one step again

Outputs live under ``--out`` (default ``data/outputs``): ``model/`` (train), ``metrics.json``
(evaluate), ``scores/date=D/`` (score), ``segments/date=D/`` (segment), ``rationales/date=D.parquet``
(explain). Each step logs its parameters, metrics, artifacts, the input dataset (``mlflow.data``
with digest) and the code version (git commit), so any step can be rerun alone and traced.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl

from behaviorlm.events import Events, EventsError, read_table, validate_events

STEPS = ("train", "evaluate", "score", "segment", "explain")


def _code_version() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _events(args: argparse.Namespace) -> tuple[Events, pl.DataFrame | None, str]:
    if (args.events is None) == (args.dataset is None):
        raise EventsError("give exactly one of --events PATH or --dataset NAME")
    if args.dataset:
        from behaviorlm.datasets import load_dataset

        ds = load_dataset(args.dataset)
        return ds.events, ds.items, args.dataset
    return validate_events(read_table(args.events)), None, str(args.events)


def _log_input(ev: Events, source: str, context: str) -> None:
    import mlflow

    frame = ev.df.select("user_id", "item_id", "event_type", "timestamp").to_pandas()
    mlflow.log_input(mlflow.data.from_pandas(frame, source=source, name=Path(source).name), context=context)


def _day_end(date: str) -> datetime:
    try:
        return datetime.strptime(date, "%Y-%m-%d").replace(tzinfo=UTC) + timedelta(days=1)
    except ValueError:
        raise EventsError(f"--date must be YYYY-MM-DD, got {date!r}") from None


def step_train(args, ev, items, source, out: Path) -> dict[str, Any]:
    import mlflow

    from behaviorlm.evaluation import leave_one_out
    from behaviorlm.recommender import BehaviorLM
    from behaviorlm.tracking import MODEL_NAME, log_model, promote

    split = leave_one_out(ev)
    # full softmax over a large catalog is slow on CPU; sampled softmax is the usual trade
    loss = "sampled" if ev.n_items > 20_000 else "full"
    params = {"epochs": args.epochs, "max_len": args.max_len, "dim": 64, "seed": 42, "loss": loss}
    mlflow.log_params(params)
    _log_input(split.train, source, "training")
    model = BehaviorLM(**params, progress=False).fit(split.train, validation=split.valid, items=items)
    model.save(out / "model")
    score = float(model.history_.best_score or 0.0)
    mlflow.log_metric("val_ndcg_10", score)
    info = log_model(model, out / "model", registered_model_name=MODEL_NAME)
    decision = promote(info.registered_model_version, score, tolerance=args.tolerance)
    mlflow.log_params(decision.as_params())
    return {"val_ndcg_10": score, "version": decision.version, "alias": decision.alias}


def step_evaluate(args, ev, items, source, out: Path) -> dict[str, Any]:
    import mlflow

    from behaviorlm.evaluation import evaluate, leave_one_out
    from behaviorlm.recommender import BehaviorLM

    model = BehaviorLM.load(out / "model")
    _log_input(ev, source, "evaluation")
    report = evaluate(model, leave_one_out(ev), k=10, exclude_seen=model.exclude_seen_)
    metrics = report.to_dict()
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in metrics.items() if isinstance(v, float)})
    mlflow.log_artifact(str(out / "metrics.json"))
    return {"ndcg@10": metrics["ndcg@10"]}


def step_score(args, ev, items, source, out: Path) -> dict[str, Any]:
    import mlflow

    from behaviorlm.recommender import BehaviorLM
    from behaviorlm.scoring import score_partition

    end = _day_end(args.date)
    upto = ev.derive(ev.df.filter(pl.col("timestamp") < end), "events up to the date")
    _log_input(upto, source, "scoring")
    model = BehaviorLM.load(out / "model")
    s = score_partition(model, upto, out / "scores" / f"date={args.date}", scored_at=end, k=10, progress=False)
    mlflow.log_metrics({"users": s.n_users, "rows": s.n_rows, "users_per_s": s.users_per_s})
    return {"users": s.n_users, "rows": s.n_rows}


def step_segment(args, ev, items, source, out: Path) -> dict[str, Any]:
    import mlflow

    from behaviorlm.propensity import PropensityModel
    from behaviorlm.recommender import BehaviorLM
    from behaviorlm.segments import run_segmentation

    end = _day_end(args.date)
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


def step_explain(args, ev, items, source, out: Path) -> dict[str, Any]:
    import mlflow

    from behaviorlm.explain import build_contexts, explain_batch, make_explainer
    from behaviorlm.io import write_parquet_atomic
    from behaviorlm.recommender import BehaviorLM

    model = BehaviorLM.load(out / "model")
    scores = pl.read_parquet(sorted((out / "scores" / f"date={args.date}").glob("part-*.parquet")))
    users = scores["user_id"].unique(maintain_order=True).head(args.explain_users)
    recs = scores.filter(pl.col("user_id").is_in(users.implode()) & (pl.col("rank") <= 5))
    seg_path = out / "segments" / f"date={args.date}" / "users.parquet"
    profiles = (
        pl.read_parquet(seg_path).select("user_id", "propensity", "tier", "cluster") if seg_path.exists() else None
    )
    mine = ev.df.filter(pl.col("user_id").is_in(users.implode()) & (pl.col("timestamp") < _day_end(args.date)))
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


RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "train": step_train,
    "evaluate": step_evaluate,
    "score": step_score,
    "segment": step_segment,
    "explain": step_explain,
}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import mlflow

    from behaviorlm.scoring import set_threads
    from behaviorlm.tracking import setup

    setup(args.experiment)
    set_threads()
    ev, items, source = _events(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = list(STEPS) if args.step == "all" else [args.step]
    results: dict[str, Any] = {}
    tags = {"code_version": _code_version(), "date": args.date}
    with mlflow.start_run(run_name=f"pipeline {args.step} {args.date}", tags=tags):
        for name in steps:
            with mlflow.start_run(run_name=name, nested=True, tags=tags):
                results[name] = RUNNERS[name](args, ev, items, source, out)
                print(f"{name}: {results[name]}")
    return results


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step", choices=[*STEPS, "all"])
    ap.add_argument("--date", required=True, help="YYYY-MM-DD: score and segment as of the end of this day")
    ap.add_argument("--events")
    ap.add_argument("--dataset")
    ap.add_argument("--out", default="data/outputs")
    ap.add_argument("--experiment", default="behaviorlm")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--max-len", type=int, default=100)
    ap.add_argument("--tolerance", type=float, default=0.0, help="promotion: allowed NDCG@10 drop vs the champion")
    ap.add_argument("--propensity-method", default="lightgbm")
    ap.add_argument("--horizon", default="1d")
    ap.add_argument("--n-windows", type=int, default=3)
    ap.add_argument("--bins", default="quantile")
    ap.add_argument("--explain-users", type=int, default=50)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse(argv))
    except (EventsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
