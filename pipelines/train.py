"""Train step: fit on a leave-one-out split, log and register the model, apply the promotion gate.

Run alone: ``python -m pipelines.train --date YYYY-MM-DD --dataset NAME`` (reads the earlier steps' outputs).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pipelines.common import log_input


def run_step(args, ev, items, source, out: Path) -> dict[str, Any]:
    import mlflow

    from behaviorlm.evaluation import leave_one_out
    from behaviorlm.recommender import BehaviorLM
    from behaviorlm.tracking import MODEL_NAME, log_model, promote

    split = leave_one_out(ev)
    # full softmax over a large catalog is slow on CPU; sampled softmax is the usual trade
    loss = "sampled" if ev.n_items > 20_000 else "full"
    params = {"epochs": args.epochs, "max_len": args.max_len, "dim": 64, "seed": 42, "loss": loss}
    params["batch_size"] = args.batch_size  # small data needs small batches to get enough optimiser steps
    # the recipe measured on Taobao (benchmarks/RESULTS.md 1b): slow starts need patience
    params |= {"lr": 2e-3, "patience": args.patience, "dropout": 0.1, "n_negatives": 4096}
    mlflow.log_params(params)
    log_input(split.train, source, "training")
    mlflow.log_param("exclude_seen", not args.keep_seen)
    model = BehaviorLM(**params, progress=False).fit(
        split.train, validation=split.valid, items=items, exclude_seen=not args.keep_seen
    )
    model.save(out / "model")
    score = float(model.history_.best_score or 0.0)
    mlflow.log_metric("val_ndcg_10", score)
    info = log_model(model, out / "model", registered_model_name=MODEL_NAME)
    decision = promote(info.registered_model_version, score, tolerance=args.tolerance)
    mlflow.log_params(decision.as_params())
    return {"val_ndcg_10": score, "version": decision.version, "alias": decision.alias}


if __name__ == "__main__":
    from pipelines.steps import main

    sys.exit(main(["train", *sys.argv[1:]]))
