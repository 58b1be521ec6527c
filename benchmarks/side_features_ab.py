"""Paired next-item comparison of two models trained on the same leave-one-out split (e.g. with and
without item side features): per-user NDCG@10 differences with paired bootstrap intervals, on the
test holdout and on the validation one the models were early-stopped on.

    python benchmarks/side_features_ab.py --dataset taobao --a data/models/taobao-loo-category \
        --b data/models/taobao-loo-nosides --no-exclude-seen

Prints a table and writes ``benchmarks/out/side_features_ab_<dataset>.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from provenance import write_json

from behaviorlm.data.datasets import load_dataset
from behaviorlm.evaluation import leave_one_out
from behaviorlm.evaluation.metrics import paired_difference, per_user_metrics, rank_targets, seen_lists
from behaviorlm.recommender import BehaviorLM

OUT = Path(__file__).parent / "out"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--a", type=Path, required=True, help="model directory A")
    ap.add_argument("--b", type=Path, required=True, help="model directory B")
    ap.add_argument("--no-exclude-seen", action="store_true")
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()
    split = leave_one_out(load_dataset(args.dataset).events)
    catalog = split.train.df["item_id"].unique(maintain_order=True)
    exclude = not args.no_exclude_seen
    models = {"a": BehaviorLM.load(args.a, retrieval="exact"), "b": BehaviorLM.load(args.b, retrieval="exact")}
    result = {"dataset": args.dataset, "a": str(args.a), "b": str(args.b)}
    print(f"\n## {args.dataset}: {args.a.name} minus {args.b.name}, NDCG@{args.k}, full catalog ({len(catalog):,})")
    print("| holdout | A | B | A - B | 95% CI | verdict |\n|---|---|---|---|---|---|")
    for name in ("valid", "test"):
        ho = split.test if name == "test" else split.valid
        seen = seen_lists(ho.inputs, catalog) if exclude else {}
        ndcg = {
            key: per_user_metrics(rank_targets(m, ho, catalog, args.k, exclude, seen).ranks, args.k)[f"ndcg@{args.k}"]
            for key, m in models.items()
        }
        d = paired_difference(ndcg["a"], ndcg["b"])
        verdict = "significant" if d["significant"] else "inside the noise"
        a, b = float(ndcg["a"].mean()), float(ndcg["b"].mean())
        ci = f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]"
        print(f"| {name} | {a:.4f} | {b:.4f} | {d['diff']:+.4f} | {ci} | {verdict} |")
        result[name] = {"a": a, "b": b, "paired": d}
    write_json(OUT / f"side_features_ab_{args.dataset}.json", result)


if __name__ == "__main__":
    main()
