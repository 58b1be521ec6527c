"""Batch scoring benchmark: users/s, peak RSS and NDCG@10 for fp32 and int8, vs a naive loop.

    python benchmarks/scoring.py --model data/models/ml-1m-loo --dataset ml-1m

Scores every user of the leave-one-out *test inputs* (each user's events minus the last one) over
the full catalog, then computes NDCG@10 of the top-10 against the held-out last events. Each
precision runs in a fresh subprocess so peak RSS is that mode's alone. The naive baseline calls
``recommend(events=one_user)`` user by user (on a sample, extrapolated); single-user latency is
measured the same way, as the API will call it. Writes benchmarks/out/scoring_<dataset>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
from provenance import write_json

OUT = Path(__file__).parent / "out"


def _split(dataset: str):
    from behaviorlm.data.datasets import load_dataset
    from behaviorlm.evaluation import leave_one_out

    return leave_one_out(load_dataset(dataset).events)


def ndcg_at_10(scores: pl.DataFrame, targets: pl.DataFrame) -> float:
    """Exact NDCG@10 from top-10 lists: a target outside the list contributes 0."""
    hit = targets.select("user_id", "item_id").join(
        scores.select("user_id", "item_id", "rank"), on=["user_id", "item_id"]
    )
    return float((1 / np.log2(hit["rank"].to_numpy() + 1.0)).sum() / targets.height)


def worker(args: argparse.Namespace) -> dict:
    """One precision in this process: score all users, report speed, memory and quality."""
    from behaviorlm.inference.batch import ScoringOptions, score_events, set_threads
    from behaviorlm.recommender import BehaviorLM

    threads = set_threads(args.threads)
    split = _split(args.dataset)
    model = BehaviorLM.load(args.model)
    quant = None if args.mode == "fp32" else "int8"
    out = OUT / f"scores_{args.dataset}_{args.mode}.parquet"
    options = ScoringOptions(k=10, batch_size=args.batch_size)
    score_events(model.engine, split.test.inputs, out, options, quantize=quant, progress=False)  # warm-up
    res = score_events(model.engine, split.test.inputs, out, options, quantize=quant, progress=False)
    scores = pl.read_parquet(out)
    return {
        "mode": args.mode,
        "users": res.n_users,
        "seconds": res.seconds,
        "users_per_s": res.users_per_s,
        "peak_rss_mb": res.peak_rss_mb,
        "ndcg@10": ndcg_at_10(scores, split.test.targets),
        "threads": threads,
    }


def naive_and_latency(args: argparse.Namespace) -> dict:
    """Per-user recommend() from raw events: the naive loop and the API's single-user latency."""
    from behaviorlm.inference.batch import set_threads
    from behaviorlm.recommender import BehaviorLM

    set_threads(args.threads)
    split = _split(args.dataset)
    model = BehaviorLM.load(args.model)
    df = split.test.inputs.df
    users = df["user_id"].unique().sample(args.naive_users, seed=0).to_list()
    per_user = {u: g for (u,), g in df.filter(pl.col("user_id").is_in(users)).group_by("user_id")}
    model.recommend(events=per_user[users[0]], k=10)  # warm-up
    lat = []
    for u in users:
        t = time.perf_counter()
        model.recommend(events=per_user[u], k=10)
        lat.append(time.perf_counter() - t)
    lat_ms = np.array(lat) * 1000
    return {
        "naive_users": len(users),
        "naive_users_per_s": len(users) / sum(lat),
        "latency_ms_p50": float(np.percentile(lat_ms, 50)),
        "latency_ms_p99": float(np.percentile(lat_ms, 99)),
        "latency_ms_mean": float(lat_ms.mean()),
    }


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="data/models/ml-1m-loo")
    ap.add_argument("--dataset", default="ml-1m")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--naive-users", type=int, default=300)
    ap.add_argument("--mode", choices=["fp32", "int8", "naive"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    if args.mode:  # subprocess worker
        result = naive_and_latency(args) if args.mode == "naive" else worker(args)
        print(json.dumps(result))
        return result
    runs = {}
    for mode in ("fp32", "int8", "naive"):
        cmd = [
            sys.executable,
            __file__,
            "--model",
            args.model,
            "--dataset",
            args.dataset,
            "--mode",
            mode,
            "--batch-size",
            str(args.batch_size),
            "--naive-users",
            str(args.naive_users),
        ]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        runs[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    fp, i8, nv = runs["fp32"], runs["int8"], runs["naive"]
    summary = {
        "command": "python benchmarks/scoring.py " + " ".join(sys.argv[1:]),
        "fp32": fp,
        "int8": i8,
        "naive": nv,
        "int8_speedup": i8["users_per_s"] / fp["users_per_s"],
        "int8_ndcg_rel_change": (i8["ndcg@10"] - fp["ndcg@10"]) / fp["ndcg@10"],
        "batch_vs_naive": fp["users_per_s"] / nv["naive_users_per_s"],
    }
    print(f"{'mode':<8}{'users':>8}{'users/s':>12}{'peak RSS MB':>14}{'NDCG@10':>10}")
    for r in (fp, i8):
        print(
            f"{r['mode']:<8}{r['users']:>8,}{r['users_per_s']:>12,.0f}{r['peak_rss_mb']:>14,.0f}{r['ndcg@10']:>10.4f}"
        )
    print(f"{'naive':<8}{nv['naive_users']:>8,}{nv['naive_users_per_s']:>12,.0f}")
    print(
        f"int8 speed-up {summary['int8_speedup']:.2f}x, "
        f"NDCG@10 relative change {summary['int8_ndcg_rel_change']:+.2%}; "
        f"batch fp32 vs naive loop {summary['batch_vs_naive']:.0f}x"
    )
    print(
        f"single-user recommend-from-raw-events latency: p50 {nv['latency_ms_p50']:.1f} ms, "
        f"p99 {nv['latency_ms_p99']:.1f} ms"
    )
    path = OUT / f"scoring_{args.dataset}.json"
    write_json(path, summary)
    print(f"wrote {path}")
    return summary


if __name__ == "__main__":
    main()
