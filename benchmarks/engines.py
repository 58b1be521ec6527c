"""Batch scoring on each engine: torch fp32 / torch int8 (dynamic) / onnxruntime fp32 / onnxruntime int8.

One process, the same users, the engines interleaved round by round with the order rotated
(A B C D, B C D A, ...), so the shared machine's noise falls on all of them alike; medians and
ratios against torch fp32 are reported. Quality: NDCG@10 of the leave-one-out target from the
top-10 lists each engine returns, and how many users' top-10 lists equal torch fp32's.

    python benchmarks/engines.py --model data/models/ml-1m-loo-d01 --dataset ml-1m

Writes benchmarks/out/engines_<dataset>.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import polars as pl
from provenance import write_json

from behaviorlm.data.datasets import load_dataset
from behaviorlm.evaluation import leave_one_out
from behaviorlm.evaluation.metrics import list_ranks, paired_difference, per_user_metrics
from behaviorlm.inference.batch import set_threads
from behaviorlm.inference.onnx_engine import compare, onnx_engine
from behaviorlm.recommender import BehaviorLM

OUT = Path(__file__).parent / "out"
ENGINES = ("torch", "torch-int8", "onnx", "onnx-int8")


def engine_of(model: BehaviorLM, kind: str, model_dir: Path):
    if kind == "torch-int8":
        return model.engine.quantized("int8")
    return onnx_engine(model.engine, kind, model_dir)


def ndcg(top: np.ndarray, target: np.ndarray) -> np.ndarray:
    return per_user_metrics(list_ranks(top, target), 10)["ndcg@10"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--dataset", default="ml-1m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    threads = set_threads(args.threads)
    split = leave_one_out(load_dataset(args.dataset).events)
    model = BehaviorLM.load(args.model, retrieval="exact")
    engines = {kind: engine_of(model, kind, args.model) for kind in ENGINES}
    base = engines["torch"]
    enc = base.encode(split.test.inputs)
    seen = base.seen_pairs(split.test.inputs.df.select("user_id", "item_id").unique(), enc.user_ids)
    targets = dict(split.test.targets.select("user_id", "item_id").iter_rows())
    target = base.tokenizer.item_index(pl.Series([targets[u] for u in enc.user_ids]))
    diffs = {kind: compare(base, e, enc, slice(0, 512)) for kind, e in engines.items() if kind != "torch"}
    times: dict[str, list[float]] = {k: [] for k in ENGINES}
    tops: dict[str, np.ndarray] = {}
    for r in range(args.rounds + 1):  # round 0 warms every engine up and is not counted
        order = ENGINES[r % len(ENGINES) :] + ENGINES[: r % len(ENGINES)]
        for kind in order:
            t0 = time.perf_counter()
            _, idx = engines[kind].top_k_all(enc, 10, seen, batch_size=args.batch_size)
            if r:
                times[kind].append(time.perf_counter() - t0)
            tops[kind] = idx
            print(f"round {r} {kind:<11} {time.perf_counter() - t0:6.1f} s", flush=True)
    quality = {k: ndcg(tops[k], target) for k in ENGINES}
    rows = []
    for kind in ENGINES:
        med = statistics.median(times[kind])
        same = float((tops[kind] == tops["torch"]).all(1).mean())
        rows.append(
            {
                "engine": kind,
                "seconds_median": med,
                "seconds": times[kind],
                "users_per_s": len(enc) / med,
                "speedup_vs_torch_fp32": statistics.median(times["torch"]) / med,
                "ndcg_at_10": float(quality[kind].mean()),
                "ndcg_vs_torch_fp32": paired_difference(quality[kind], quality["torch"]),
                "ndcg_relative_change": float(quality[kind].mean() / quality["torch"].mean() - 1),
                "identical_top10_share": same,
                "max_abs_diff": diffs.get(kind),
            }
        )
    print(f"\n{len(enc):,} users, {threads} threads, batch {args.batch_size}, {args.rounds} rounds interleaved")
    print(f"{'engine':<12}{'median s':>9}{'users/s':>9}{'speed-up':>9}{'NDCG@10':>9}{'rel':>8}{'same top10':>11}")
    for r in rows:
        print(
            f"{r['engine']:<12}{r['seconds_median']:>9.1f}{r['users_per_s']:>9.0f}{r['speedup_vs_torch_fp32']:>8.2f}x"
            f"{r['ndcg_at_10']:>9.4f}{r['ndcg_relative_change']:>+8.2%}{r['identical_top10_share']:>10.1%}"
        )
    OUT.mkdir(exist_ok=True)
    path = OUT / f"engines_{args.dataset}.json"
    write_json(path, {"model": str(args.model), "users": len(enc), "threads": threads, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
