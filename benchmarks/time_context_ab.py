"""History-only against request-time-aware on ML-1M, paired on the same test users.

    python benchmarks/time_context_ab.py [--history DIR] [--request DIR]

Loads the two models `make bench-ml1m` and `make bench-ml1m-time` saved, ranks every user's
leave-one-out test target with each (the request-time model asked at the target's own time, the
other without it), and prints both rows and their paired-bootstrap NDCG@10 / HR@10 difference.
The two rows answer different questions -- the second model knows *when* it is asked -- so the
difference measures what the request time is worth, not which model is better at one task.
Writes ``benchmarks/out/time_context_ab.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from provenance import write_json

from behaviorlm.data.datasets import load_dataset
from behaviorlm.evaluation import leave_one_out, per_user_metrics, rank_targets
from behaviorlm.evaluation.metrics import paired_difference
from behaviorlm.recommender import BehaviorLM

OUT = Path(__file__).parent / "out"
MODELS = Path("data/models")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--history", type=Path, default=MODELS / "ml-1m-loo-tc-history")
    ap.add_argument("--request", type=Path, default=MODELS / "ml-1m-loo-tc-request")
    ap.add_argument("--n-boot", type=int, default=1000)
    args = ap.parse_args(argv)
    split = leave_one_out(load_dataset("ml-1m").events)
    rows, per_user = {}, {}
    for label, folder in (("history only", args.history), ("request-time aware", args.request)):
        model = BehaviorLM.load(folder, retrieval="exact")
        catalog = split.train.df["item_id"].unique(maintain_order=True)  # as evaluate() ranks
        ranks = rank_targets(model, split.test, catalog, 10, exclude_seen=True).ranks
        m = per_user_metrics(ranks, 10)
        per_user[label] = m
        rows[label] = {"time_context": model.time_context_, "ndcg@10": float(m["ndcg@10"].mean()),
                       "hr@10": float(m["hr@10"].mean()), "users": len(ranks)}  # fmt: skip
    a, b = per_user["request-time aware"], per_user["history only"]
    diff = {k: paired_difference(a[k], b[k], args.n_boot) for k in ("ndcg@10", "hr@10")}
    for label, r in rows.items():
        print(f"{label:<20} ndcg@10 {r['ndcg@10']:.4f}  hr@10 {r['hr@10']:.4f}  ({r['time_context']})")
    for k, d in diff.items():
        print(f"request - history {k}: {d['diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]")
    result = {"command": "python benchmarks/time_context_ab.py " + " ".join(sys.argv[1:]), "rows": rows,
              "paired": diff}  # fmt: skip
    OUT.mkdir(exist_ok=True)
    write_json(OUT / "time_context_ab.json", result)
    return result


if __name__ == "__main__":
    main()
