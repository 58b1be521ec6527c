"""Purchase-target fine-tuning: does a preference or reward stage make the model better at what people *buy*?

    python benchmarks/finetune.py                                     # RetailRocket and Taobao-31k, every stage
    python benchmarks/finetune.py --dataset retailrocket --variant dpo --variant sft

Protocol (:mod:`behaviorlm.evaluation.purchase`, benchmarks/RESULTS.md section 25): each buyer's
last purchase is the test target, the one before validates, inputs are the events strictly
before each target, seen items kept, the full training catalog ranked by ``P(item | next action =
purchase)``. The base is the repeat-aware pretrained model (``clickstream-small@2``, trained on
the split's training events, early-stopped on the validation purchases); every stage starts
from it, mines its contexts from the same training events and keeps the epoch (or the base
itself) with the best validation purchase NDCG@10. Beside each row: the shop's rules ("in
your cart", recent, repeat, purchase popularity and co-occurrence), paired CIs against the base
and the best rule, the split by repeat / new-item targets, and the usual next-event NDCG@10
(the first event after the training cut), which a stage must not break.

Prints one table per dataset and writes ``benchmarks/out/finetune[_TAG].json``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from clickstream import BATCH, EPOCHS, MAX_VALID_USERS, SIDES, sample_users
from pretrain import hardware
from provenance import write_json

from behaviorlm.data.datasets import data_dir, load_dataset
from behaviorlm.errors import InputDataError
from behaviorlm.evaluation import evaluate, paired_difference, per_user_metrics, rank_targets
from behaviorlm.evaluation.metrics import ContextCatalog
from behaviorlm.evaluation.purchase import PURCHASE_BASELINES, ActionScorer, next_event_holdout
from behaviorlm.evaluation.splits import purchase_split
from behaviorlm.nn.training import peak_rss_mb
from behaviorlm.recommender import BehaviorLM

OUT = Path(__file__).parent / "out"
DATASETS = ("retailrocket", "taobao31k", "taobao", "rees46")
#: the stages compared, each a ``BehaviorLM.finetune`` call; the SFT control uses the same contexts and steps
VARIANTS: dict[str, dict[str, Any]] = {
    "sft": {"method": "sft"},
    "dpo-window": {"method": "dpo", "negatives": "window"},
    "dpo-topk": {"method": "dpo", "negatives": "topk"},
    "dpo": {"method": "dpo"},  # the default: negatives "mixed" (the window's, topped up from the top-K)
    "sdpo": {"method": "sdpo"},
    "grpo": {"method": "grpo"},
}
#: stage epochs where the default's 6 would take long: Taobao-31k has ~40x RetailRocket's contexts
STAGE_EPOCHS = {"taobao31k": 2}


def run_dataset(name: str, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    data = load_dataset(name)
    split = purchase_split(data.events)
    valid = sample_users(split.valid, MAX_VALID_USERS, args.seed)
    nxt = next_event_holdout(data.events, split)
    base = pretrained(name, data, split, valid, args)
    catalog = split.train.df["item_id"].unique(maintain_order=True)
    rows = {"base": measure(base, split, nxt, catalog, args, baselines=PURCHASE_BASELINES)}
    base_ndcg = rows["base"]["per_user"]
    skipped: dict[str, str] = {}
    for variant in args.variant or list(VARIANTS):
        t1 = time.perf_counter()
        given = {"epochs": STAGE_EPOCHS.get(name), **stage_overrides(args)}
        try:
            tuned = base.finetune(
                split.train, validation=valid, **VARIANTS[variant], **{k: v for k, v in given.items() if v is not None}
            )
        except InputDataError as e:  # too few purchases for this stage (REES46's head): said, not hidden
            print(f"  {variant}: not run -- {e}")
            skipped[variant] = str(e)
            continue
        stage = tuned.stages_[-1]
        row = measure(tuned, split, nxt, catalog, args, baselines=())
        row["vs_base"] = paired_difference(row["per_user"], base_ndcg, args.n_boot)
        row["vs_base_next_event"] = paired_difference(row["next_event_per_user"], rows["base"]["next_event_per_user"])
        row["stage"] = {
            k: stage[k] for k in ("contexts", "pairs", "reference_score", "best_score", "best_epoch", "epochs")
        }
        row["stage_wall_s"] = time.perf_counter() - t1
        rows[variant] = row
    best_rule = max(rows["base"]["baselines"], key=lambda b: rows["base"]["baselines"][b]["ndcg@10"])
    for row in rows.values():
        row["vs_best_rule"] = paired_difference(
            row["per_user"], rows["base"]["baseline_per_user"][best_rule], args.n_boot
        )
    print_table(name, split, rows, best_rule)
    return {
        "dataset": name,
        "protocol": {**split.info, "test_users": split.test.n_users, "valid_users_used": valid.n_users,
                     "next_event_users": nxt.n_users, "catalog": len(catalog)},
        "best_rule": best_rule,
        "not_run": skipped,
        "rows": {k: {kk: vv for kk, vv in v.items() if not kk.endswith("per_user")} for k, v in rows.items()},
        "wall_s": time.perf_counter() - t0,
    }  # fmt: skip


def pretrained(name: str, data, split, valid, args: argparse.Namespace) -> BehaviorLM:
    """The base model for this split, trained once and kept in data/models (``--retrain`` redoes it)."""
    recipe = getattr(args, "recipe", "clickstream-small@2")
    folder = data_dir() / "models" / f"finetune-base-{name}-s{args.seed}{'' if recipe.endswith('@2') else '-' + recipe}"
    if folder.exists() and not args.retrain:
        return BehaviorLM.load(folder, retrieval="exact")
    sides = SIDES.get(name, ())
    model = BehaviorLM(
        recipe, progress=False, seed=args.seed, epochs=EPOCHS.get(name), batch_size=BATCH.get(name),
        side_features=sides,
    )  # fmt: skip
    model.fit(split.train, valid, exclude_seen=False, items=data.items if sides else None,
              training_data={"source": name, "holdout": "purchase"})  # fmt: skip
    model.save(folder, force=True)
    return BehaviorLM.load(folder, retrieval="exact")


def stage_overrides(args: argparse.Namespace) -> dict[str, Any]:
    given = {"epochs": args.epochs, "lr": args.lr, "beta": args.beta, "progress": False}
    return {k: v for k, v in given.items() if v is not None}


def measure(model: BehaviorLM, split, nxt, catalog, args, baselines: tuple[str, ...]) -> dict[str, Any]:
    """Purchase-target metrics (and the rules', when asked) plus the next-event NDCG@10."""
    report = evaluate(ActionScorer(model), split, k=10, exclude_seen=False, baselines=baselines, n_boot=args.n_boot)
    m = report.model
    ranks = rank_targets(ActionScorer(model), split.test, catalog, 10, False).ranks
    next_ranks = rank_targets(model, nxt, ContextCatalog.of(catalog, nxt.inputs), 10, False).ranks
    out = {
        "ndcg@10": m["ndcg@10"], "hr@10": m["hr@10"], "ci95": m["ci95"],
        "by_target": m.get("by_target"),
        "per_user": per_user_metrics(ranks, 10)["ndcg@10"],
        "next_event_ndcg@10": float(per_user_metrics(next_ranks, 10)["ndcg@10"].mean()),
        "next_event_per_user": per_user_metrics(next_ranks, 10)["ndcg@10"],
    }  # fmt: skip
    if baselines:
        out["baselines"] = {b: {k: v for k, v in r.items() if k in ("ndcg@10", "hr@10", "ci95", "by_target")}
                            for b, r in report.baselines.items()}  # fmt: skip
        out["baseline_per_user"] = {}
        for b in baselines:
            from behaviorlm.evaluation.baselines import FACTORIES

            br = rank_targets(FACTORIES[b]().fit(split.train, catalog), split.test, catalog, 10, False).ranks
            out["baseline_per_user"][b] = per_user_metrics(br, 10)["ndcg@10"]
    return out


def print_table(name: str, split, rows: dict[str, dict[str, Any]], best_rule: str) -> None:
    print(f"\n{name}: {split.test.n_users} test purchases; NDCG@10 / HR@10 of P(item | purchase), seen items kept")
    base = rows["base"]
    for rule, r in base["baselines"].items():
        bt = r.get("by_target") or {}
        print(f"  rule {rule:<24}{r['ndcg@10']:.4f} / {r['hr@10']:.4f}   repeat {_split(bt, 'repeat'):.4f}"
              f"  new {_split(bt, 'new'):.4f}")  # fmt: skip
    print(f"  {'row':<29}{'NDCG@10':>8}{'HR@10':>8}{'repeat':>8}{'new':>8}  {'vs base [95% CI]':<30}"
          f"{'vs ' + best_rule:<30}{'next-event':>10}")  # fmt: skip
    for label, r in rows.items():
        bt = r.get("by_target") or {}
        vb = r.get("vs_base")
        vs_base = _diff(vb) if vb else "-"
        ndcg = f"{r['ndcg@10']:>8.4f}{r['hr@10']:>8.4f}{_split(bt, 'repeat'):>8.4f}{_split(bt, 'new'):>8.4f}"
        print(f"  {label:<29}{ndcg}  {vs_base:<30}{_diff(r['vs_best_rule']):<30}{r['next_event_ndcg@10']:>10.4f}")


def _diff(p: dict[str, Any]) -> str:
    return f"{p['diff']:+.4f} [{p['ci95'][0]:+.4f},{p['ci95'][1]:+.4f}]"


def _split(by_target: dict[str, Any], kind: str) -> float:
    """NDCG@10 of the repeat or new-item targets (nan where the split is absent)."""
    return float(by_target.get(kind, {}).get("ndcg@10", np.nan))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", action="append", choices=DATASETS, help="repeatable; default: retailrocket, taobao31k")
    ap.add_argument("--variant", action="append", choices=list(VARIANTS), help="repeatable; default: all")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--beta", type=float, default=None)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--recipe", default="clickstream-small@2", help="the base model's recipe")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--retrain", action="store_true", help="pretrain the base again even if data/models has it")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    t0 = time.perf_counter()
    results = [run_dataset(name, args) for name in args.dataset or ("retailrocket", "taobao31k")]
    OUT.mkdir(exist_ok=True)
    path = OUT / f"finetune{'_' + args.tag if args.tag else ''}.json"
    write_json(path, {
        "command": "python benchmarks/finetune.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "hardware": hardware(), "results": results, "wall_s": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(),
    })  # fmt: skip
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
