"""Score step: resumable top-K for every user active up to the date (see ``pipelines.batch_score``).

Run alone: ``python -m pipelines.steps score --date YYYY-MM-DD --dataset NAME`` (reads the earlier steps' outputs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.common import events_until, log_input


def run_step(args, ev, items, source, out: Path) -> dict[str, Any]:
    import mlflow

    from behaviorlm.inference.batch import ScoringOptions, score_partition
    from behaviorlm.recommender import BehaviorLM

    upto, end = events_until(ev, args.date)
    log_input(upto, source, "scoring")
    model = BehaviorLM.load(out / "model")
    options = ScoringOptions(k=10, exclude_seen=model.exclude_seen_)
    s = score_partition(model.engine, upto, out / "scores" / f"date={args.date}", end, options, progress=False)
    mlflow.log_metrics({"users": s.n_users, "rows": s.n_rows, "users_per_s": s.users_per_s})
    return {"users": s.n_users, "rows": s.n_rows}
