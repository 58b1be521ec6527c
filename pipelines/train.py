"""Train step: fit on a leave-one-out split, log and register the model, apply the promotion gate.

Run alone: ``python -m pipelines.steps train --date YYYY-MM-DD --dataset NAME`` (reads the earlier steps' outputs).
With ``--init-from REF`` (``models:/behaviorlm@champion`` or a model directory) the step is the
daily increment: the previous model continues on the training events of ``--date``'s day
(``BehaviorLM.fit_partial``) instead of being retrained; validation and the promotion gate are
the same, so a worse increment is not promoted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from behaviorlm.errors import ConfigurationError
from pipelines.common import log_input


def run_step(args, ev, items, source, out: Path) -> dict[str, Any]:
    import mlflow

    from behaviorlm.data.loading import LoadedEvents
    from behaviorlm.evaluation import leave_one_out
    from behaviorlm.fitting import fit_from_source
    from behaviorlm.tracking import MODEL_NAME, log_model, promote

    split = leave_one_out(ev)
    overrides = {
        "epochs": args.epochs,
        "max_len": args.max_len,
        "batch_size": args.batch_size,
        "patience": args.patience,
    }
    if args.init_from:
        model = _increment(args, split, source)
    else:
        log_input(split.train, source, "training")
        mlflow.log_param("exclude_seen", not args.keep_seen)
        loaded = LoadedEvents(ev, source, items)
        model = fit_from_source(loaded, holdout="loo", recipe=args.recipe, exclude_seen=not args.keep_seen, **overrides)
        mlflow.log_params({"recipe": repr(model), **model.params})
    model.save(out / "model")
    score = float(model.history_.best_score or 0.0)
    mlflow.log_metric("val_ndcg_10", score)
    info = log_model(model, out / "model", registered_model_name=MODEL_NAME)
    decision = promote(info.registered_model_version, score, tolerance=args.tolerance)
    mlflow.log_params(decision.as_params())
    return {"val_ndcg_10": score, "version": decision.version, "alias": decision.alias}


def _increment(args, split, source: str) -> Any:
    """The previous model continued on the day's training events (leave-one-out targets stay
    held out; events the model already holds are not trained on again)."""
    import mlflow

    from behaviorlm.tracking import load_model_ref
    from pipelines.common import events_on

    model, origin = load_model_ref(args.init_from)
    day = events_on(split.train, args.date)
    mlflow.log_params({"init_from": origin["model_uri"], "parent_version": model.model_version, "day_events": len(day)})
    if len(day) == 0:
        raise ConfigurationError(f"--init-from: no training events on {args.date}; nothing to continue on")
    record = {"source": f"{source}, {args.date}", "holdout": "loo", "events_digest": None}
    model.fit_partial(day, split.valid, epochs=args.epochs, training_data=record)
    mlflow.log_param("new_events", model.training_data_["increments"][-1]["n_events"])  # those not already held
    return model
