"""Train step: fit on a leave-one-out split, log and register the model, apply the promotion gate.

Run alone: ``python -m pipelines.steps train --date YYYY-MM-DD --dataset NAME`` (reads the earlier steps' outputs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.common import log_input


def run_step(args, ev, items, source, out: Path) -> dict[str, Any]:
    import mlflow

    from behaviorlm.evaluation import leave_one_out
    from behaviorlm.recommender import BehaviorLM
    from behaviorlm.tracking import MODEL_NAME, log_model, promote

    split = leave_one_out(ev)
    overrides = {
        "epochs": args.epochs,
        "max_len": args.max_len,
        "batch_size": args.batch_size,
        "patience": args.patience,
    }
    model = BehaviorLM(args.recipe, progress=False, **overrides)
    mlflow.log_params({"recipe": repr(model), **model.params})
    log_input(split.train, source, "training")
    mlflow.log_param("exclude_seen", not args.keep_seen)
    provenance = {"source": source, "holdout": "loo"}
    model.fit(
        split.train, validation=split.valid, items=items, exclude_seen=not args.keep_seen, training_data=provenance
    )
    model.save(out / "model")
    score = float(model.history_.best_score or 0.0)
    mlflow.log_metric("val_ndcg_10", score)
    info = log_model(model, out / "model", registered_model_name=MODEL_NAME)
    decision = promote(info.registered_model_version, score, tolerance=args.tolerance)
    mlflow.log_params(decision.as_params())
    return {"val_ndcg_10": score, "version": decision.version, "alias": decision.alias}
