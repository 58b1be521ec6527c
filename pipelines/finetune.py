"""Finetune step (optional, ``--finetune dpo|sdpo|grpo|sft``): the trained model fine-tuned toward
purchases, kept only when it earns it.

The stage learns from the train step's own training period (its leave-one-out holdout is applied
again) and picks its epoch on the held-out validation purchases. The gate: the fine-tuned copy
replaces ``model/`` -- and is registered, so the evaluate step's promotion gate judges it -- only
when its validation purchase NDCG@10 beats the pretrained model's and its validation next-event
NDCG@10 drops by at most ``--max-next-event-drop`` (relative; default 5%); otherwise the
pretrained model stays and the run says why.

Run alone: ``python -m pipelines.steps finetune --finetune dpo --date YYYY-MM-DD --dataset NAME``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.common import events_until


def run_step(args, ev, items, source, out: Path) -> dict[str, Any]:
    if not getattr(args, "finetune", None):
        return {"skipped": "no --finetune method given"}
    import mlflow

    from behaviorlm.data.io import write_text_atomic
    from behaviorlm.data.loading import LoadedEvents
    from behaviorlm.evaluation import leave_one_out
    from behaviorlm.fitting import finetune_from_source
    from behaviorlm.recommender import BehaviorLM
    from behaviorlm.tracking import MODEL_NAME, log_model
    from pipelines.train import REGISTRATION

    model = BehaviorLM.load(out / "model")
    ev, _ = events_until(ev, args.date)
    tuned = finetune_from_source(model, LoadedEvents(ev, source, items), args.finetune, progress=False)
    stage = tuned.stages_[-1]
    split = leave_one_out(ev)
    catalog = split.train.df["item_id"].unique(maintain_order=True)
    before, after = _next_event_ndcg(model, split.valid, catalog), _next_event_ndcg(tuned, split.valid, catalog)
    figures = {
        "val_purchase_ndcg_10_before": stage["reference_score"] or 0.0,
        "val_purchase_ndcg_10_after": stage["best_score"] or 0.0,
        "val_ndcg_10_before": before,
        "val_ndcg_10_after": after,
        "contexts": stage["contexts"],
        "pairs": stage["pairs"],
    }
    mlflow.log_params({"finetune_method": args.finetune, "parent_version": model.model_version})
    mlflow.log_metrics(figures)
    keep, reason = _gate(stage, before, after, args.max_next_event_drop)
    mlflow.log_param("finetune_kept", keep)
    mlflow.set_tag("finetune_decision", reason)
    print(f"finetune: {reason}")
    if not keep:
        return {**figures, "kept": False, "reason": reason}
    tuned.save(out / "model")
    info = log_model(tuned, out / "model", registered_model_name=MODEL_NAME)
    version = str(info.registered_model_version)
    registration = {"name": MODEL_NAME, "version": version, "model_version": tuned.model_version, "val_ndcg_10": after}
    write_text_atomic(json.dumps(registration), out / REGISTRATION)  # the evaluate step gates this version now
    return {**figures, "kept": True, "reason": reason, "version": version}


def _gate(stage: dict[str, Any], before: float, after: float, max_drop: float) -> tuple[bool, str]:
    if stage["best_score"] is None:
        return False, "kept the pretrained model: no validation purchases to judge the stage by"
    if stage["best_epoch"] == 0:
        return False, (
            f"kept the pretrained model: no epoch beat its validation purchase NDCG@10 ({stage['reference_score']:.4f})"
        )
    if after < before * (1 - max_drop):
        return False, (
            f"kept the pretrained model: validation next-event NDCG@10 fell {before:.4f} -> {after:.4f}, "
            f"more than {max_drop:.0%}"
        )
    return True, (
        f"fine-tuned model kept: validation purchase NDCG@10 {stage['reference_score']:.4f} -> "
        f"{stage['best_score']:.4f}, next-event {before:.4f} -> {after:.4f}"
    )


def _next_event_ndcg(model: Any, valid: Any, catalog: Any) -> float:
    from behaviorlm.evaluation.metrics import mean_ndcg

    return mean_ndcg(model, valid, catalog, 10, model.exclude_seen_)


def add_finetune_args(ap: Any) -> None:
    ap.add_argument(
        "--finetune",
        default=None,
        choices=["dpo", "sdpo", "grpo", "sft"],
        help="fine-tune toward purchases after train",
    )
    ap.add_argument(
        "--max-next-event-drop", type=float, default=0.05, help="finetune gate: allowed relative next-event NDCG drop"
    )
