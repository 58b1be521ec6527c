"""Two saved ML-1M models ranked on the same leave-one-out test users, and their paired difference.

    python benchmarks/paired_models.py A_DIR B_DIR [--labels A B]

Each model ranks every user's test target over the training catalog, rated items excluded (a
request-time model is asked at the target's own time); prints both rows and the paired-bootstrap
difference B - A of NDCG@10, HR@10 and MRR. Writes ``benchmarks/out/paired_<A>_<B>.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from provenance import write_json

from behaviorlm.data.datasets import load_dataset
from behaviorlm.evaluation import Split, leave_one_out, per_user_metrics, rank_targets
from behaviorlm.evaluation.metrics import paired_difference
from behaviorlm.recipes import get_recipe
from behaviorlm.recommender import BehaviorLM

OUT = Path(__file__).parent / "out"
METRICS = ("ndcg@10", "hr@10", "mrr")


def per_user(split: Split, folder: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Per-user metrics of the model saved in ``folder`` on ``split``'s test users, and its summary row."""
    model = BehaviorLM.load(folder, retrieval="exact")
    catalog = split.train.df["item_id"].unique(maintain_order=True)  # as evaluate() ranks
    m = per_user_metrics(rank_targets(model, split.test, catalog, 10, exclude_seen=True).ranks, 10)
    row = {"model": str(folder), "recipe": get_recipe(model.recipe).ref, "time_context": model.time_context_,
           **{k: float(m[k].mean()) for k in METRICS}, "users": len(m["mrr"])}  # fmt: skip
    return m, row


def compare(folders: dict[str, Path], n_boot: int = 1000) -> dict:
    """Both rows and the paired difference (second minus first) on the ML-1M leave-one-out split."""
    split = leave_one_out(load_dataset("ml-1m").events)
    (a, fa), (b, fb) = folders.items()
    ma, ra = per_user(split, fa)
    mb, rb = per_user(split, fb)
    diff = {k: paired_difference(mb[k], ma[k], n_boot) for k in METRICS}
    for label, r in ((a, ra), (b, rb)):
        print(
            f"{label:<24} ndcg@10 {r['ndcg@10']:.4f}  hr@10 {r['hr@10']:.4f}  mrr {r['mrr']:.4f}  ({r['time_context']})"
        )
    for k, d in diff.items():
        print(f"{b} - {a} {k}: {d['diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]")
    return {"rows": {a: ra, b: rb}, "paired": diff}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--labels", nargs=2, default=None)
    ap.add_argument("--n-boot", type=int, default=1000)
    args = ap.parse_args(argv)
    labels = args.labels or [args.a.name, args.b.name]
    result = compare(dict(zip(labels, (args.a, args.b), strict=True)), args.n_boot)
    result["command"] = "python benchmarks/paired_models.py " + " ".join(sys.argv[1:] if argv is None else argv)
    OUT.mkdir(exist_ok=True)
    write_json(OUT / f"paired_{labels[0]}_{labels[1]}.json", result)
    return result


if __name__ == "__main__":
    main()
