"""Evaluate step: full-catalog metrics of the saved model against baselines, logged as metrics and JSON.

Run alone: ``python -m pipelines.steps evaluate --date YYYY-MM-DD --dataset NAME`` (reads the earlier steps' outputs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.common import log_input


def run_step(args, ev, items, source, out: Path) -> dict[str, Any]:
    import mlflow

    from behaviorlm.data.io import write_text_atomic
    from behaviorlm.evaluation import evaluate, leave_one_out
    from behaviorlm.recommender import BehaviorLM

    model = BehaviorLM.load(out / "model")
    log_input(ev, source, "evaluation")
    report = evaluate(model, leave_one_out(ev), k=10, exclude_seen=model.exclude_seen_, events=ev)  # refuses leaks
    metrics = report.to_dict()
    write_text_atomic(json.dumps(metrics, indent=2), out / "metrics.json")
    for prefix, figures in report.rows():  # the model and every baseline side by side in the run
        mlflow.log_metrics({f"{prefix}.{k.replace('@', '_at_')}": v for k, v in figures.items() if _is_number(v)})
    mlflow.log_artifact(str(out / "metrics.json"))
    scored = {b: m for b, m in report.baselines.items() if "ndcg@10" in m}  # not the not-applicable ones
    return {"ndcg@10": metrics["ndcg@10"], **{f"{b}_ndcg@10": m["ndcg@10"] for b, m in scored.items()}}


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)
