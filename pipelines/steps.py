"""The batch pipeline's steps, each an MLflow run that reads the previous step's outputs.

    python -m pipelines.steps all --dataset taobao --date 2017-12-03        # every step, nested runs
    python -m pipelines.steps segment --dataset taobao --date 2017-12-03    # one step again

Outputs live under ``--out`` (default ``data/outputs``): ``model/`` (train; replaced by the
fine-tuned copy when ``--finetune`` gives a method and its gate passes), ``metrics.json``
(evaluate), ``scores/date=D/`` (score), ``segments/date=D/`` (segment), ``rationales/date=D.parquet``
(explain). Each step logs its parameters, metrics, artifacts, the input dataset (``mlflow.data``
with digest) and the code version (git commit), so any step can be rerun alone and traced.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from behaviorlm import __version__
from pipelines import evaluate, explain, finetune, score, segment, train
from pipelines.common import add_source_args, cli_main, code_version, load_events

STEPS = ("train", "finetune", "evaluate", "score", "segment", "explain")


RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "train": train.run_step,
    "finetune": finetune.run_step,  # skipped unless --finetune METHOD
    "evaluate": evaluate.run_step,
    "score": score.run_step,
    "segment": segment.run_step,
    "explain": explain.run_step,
}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import mlflow

    from behaviorlm.inference.batch import set_threads
    from behaviorlm.tracking import setup

    setup(args.experiment)
    set_threads()
    ev, items, source = load_events(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = list(STEPS) if args.step == "all" else [args.step]
    results: dict[str, Any] = {
        "input": {"source": source, "events": len(ev), "users": ev.n_users, "items": ev.n_items, "actions": ev.actions}
    }
    tags = {"code_version": code_version(), "behaviorlm_version": __version__, "date": args.date}
    with mlflow.start_run(run_name=f"pipeline {args.step} {args.date}", tags=tags):
        for name in steps:
            with mlflow.start_run(run_name=name, nested=True, tags=tags):
                t0 = time.perf_counter()
                results[name] = RUNNERS[name](args, ev, items, source, out)
                results[name]["wall_s"] = round(time.perf_counter() - t0, 1)
                mlflow.log_metric("step_wall_s", results[name]["wall_s"])
                print(f"{name}: {results[name]}")
    return results


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step", choices=[*STEPS, "all"])
    add_source_args(ap, "YYYY-MM-DD: score and segment as of the end of this day")
    ap.add_argument("--experiment", default="behaviorlm")
    ap.add_argument("--recipe", default="clickstream-small", help="training recipe (behaviorlm.recipes)")
    ap.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--max-len", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    ap.add_argument(
        "--patience", type=int, default=None, help="validations without gain before stopping; default: the recipe's"
    )
    ap.add_argument("--keep-seen", action="store_true", help="recommend already-seen items (repeat-heavy clickstreams)")
    ap.add_argument("--tolerance", type=float, default=0.0, help="promotion: allowed NDCG@10 drop vs the champion")
    ap.add_argument(
        "--init-from", default=None, help="continue this model (models:/NAME@ALIAS or a folder) on --date's events"
    )
    segment.add_segment_args(ap)
    finetune.add_finetune_args(ap)
    ap.add_argument("--explain-users", type=int, default=50)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return cli_main(run, parse, argv)


if __name__ == "__main__":
    sys.exit(main())
