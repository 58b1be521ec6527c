"""Train step: fit on a leave-one-out split, log and register the model (the evaluate step then
applies the promotion gate: it needs the comparison with the baselines).

The weights are fitted on the events up to the end of ``--date`` without each user's last two
(validation and the evaluation's targets); the model then *remembers* every event up to the
date without training on them (:meth:`BehaviorLM.remember`), so the registered and served model
answers a known user from the same history the batch scores of that day are computed from
(the API and the batch agree), while the evaluation's leak check still sees the targets held out.

Run alone: ``python -m pipelines.steps train --date YYYY-MM-DD --dataset NAME`` (reads the earlier steps' outputs).
With ``--init-from REF`` (``models:/behaviorlm@champion`` or a model directory) the step is the
daily increment: the previous model continues on the training events of ``--date``'s day
(``BehaviorLM.fit_partial``) instead of being retrained; validation and the promotion gate are
the same, so a worse increment is not promoted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from behaviorlm.errors import ConfigurationError
from pipelines.common import events_until, log_input

#: The registry version the train step registered, beside the model folder it was logged from.
REGISTRATION = "registration.json"


def run_step(args, ev, items, source, out: Path) -> dict[str, Any]:
    import mlflow

    from behaviorlm.data.io import write_text_atomic
    from behaviorlm.data.loading import LoadedEvents
    from behaviorlm.evaluation import leave_one_out
    from behaviorlm.fitting import fit_from_source
    from behaviorlm.tracking import MODEL_NAME, log_model

    ev, _ = events_until(ev, args.date)  # as of the date: nothing later reaches the model
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
    model.remember(ev, source=f"{source} up to {args.date}")  # the held-out events: known, not trained on
    model.save(out / "model")
    score = float(model.history_.best_score or 0.0)
    mlflow.log_metric("val_ndcg_10", score)
    info = log_model(model, out / "model", registered_model_name=MODEL_NAME)
    version = str(info.registered_model_version)
    registration = {"name": MODEL_NAME, "version": version, "model_version": model.model_version, "val_ndcg_10": score}
    write_text_atomic(json.dumps(registration), out / REGISTRATION)  # what the evaluate step promotes
    return {"val_ndcg_10": score, "version": version}


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


def registration(out: Path, model: Any) -> dict[str, Any] | None:
    """What the train step registered from ``out/model`` (name, version, validation score), if
    ``model`` is that model; None when the folder was written otherwise."""
    path = out / REGISTRATION
    reg = json.loads(path.read_text()) if path.is_file() else None
    return reg if reg is not None and reg["model_version"] == model.model_version else None


def registered_as(out: Path, model: Any) -> dict[str, Any]:
    """How the model folder under ``out`` is known in the registry now -- name, version and
    aliases, as the gate left them -- or nothing when it is not registered."""
    from behaviorlm.tracking import version_aliases

    reg = registration(out, model)
    if reg is None:
        return {}
    aliases = version_aliases(reg["name"], reg["version"])
    return {"model_name": reg["name"], "registry_version": reg["version"], "aliases": aliases}
