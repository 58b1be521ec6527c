"""Evaluate step: full-catalog metrics of the saved model against baselines, logged as metrics and
JSON, then the promotion gate on the version the train step registered: ``@champion`` only when
no baseline the evaluation prints is significantly better and the validation score is at least
the current champion's (``--tolerance``), else ``@challenger``; the decision says why.

Run alone: ``python -m pipelines.steps evaluate --date YYYY-MM-DD --dataset NAME`` (reads the earlier steps' outputs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.common import events_until, log_input


def run_step(args, ev, items, source, out: Path) -> dict[str, Any]:
    import mlflow

    from behaviorlm.data.io import write_text_atomic
    from behaviorlm.evaluation import evaluate, leave_one_out
    from behaviorlm.recommender import BehaviorLM

    model = BehaviorLM.load(out / "model")
    ev, _ = events_until(ev, args.date)  # the events the train step split
    log_input(ev, source, "evaluation")
    report = evaluate(model, leave_one_out(ev), k=10, exclude_seen=model.exclude_seen_, events=ev)  # refuses leaks
    metrics = report.to_dict()
    write_text_atomic(json.dumps(metrics, indent=2), out / "metrics.json")
    for prefix, figures in report.rows():  # the model and every baseline side by side in the run
        mlflow.log_metrics({f"{prefix}.{k.replace('@', '_at_')}": v for k, v in figures.items() if _is_number(v)})
    mlflow.log_artifact(str(out / "metrics.json"))
    scored = {b: m for b, m in report.baselines.items() if "ndcg@10" in m}  # not the not-applicable ones
    result = {"ndcg@10": metrics["ndcg@10"], **{f"{b}_ndcg@10": m["ndcg@10"] for b, m in scored.items()}}
    return result | _gate(args, model, report, out)


def _gate(args, model, report, out: Path) -> dict[str, Any]:
    """Promote the registered version of this model, or say why it is not."""
    import mlflow

    from behaviorlm.tracking import promote
    from pipelines.train import registration

    reg = registration(out, model)
    if reg is None:
        return {"alias": None, "reason": "not promoted: this model folder was not registered by the train step"}
    losing = report.better_baselines()
    decision = promote(reg["version"], reg["val_ndcg_10"], reg["name"], tolerance=args.tolerance, losing_to=losing)
    mlflow.log_params(decision.as_params())
    print(f"promotion: registry version {decision.version} -> @{decision.alias}; {decision.reason}")
    return {"version": decision.version, "alias": decision.alias, "reason": decision.reason}


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)
