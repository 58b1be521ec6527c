"""A/B against another checkout, interleaved in one run: the way a refactor proves it changed nothing.

    git worktree add ../base <commit>          # the code to compare against
    python benchmarks/ab_compare.py train --base ../base --epochs 2          # same-seed ML-1M curves
    python benchmarks/ab_compare.py score --base ../base --model DIR --rounds 5   # batch users/s
    python benchmarks/ab_compare.py api --base ../base --model DIR --rounds 5     # API latency under load

``train`` fits the ml-1m recipe's settings for ``--epochs`` epochs with each code (same seed) and
prints both loss curves, validation and test NDCG@10: a behaviour-preserving change gives equal
numbers. ``score`` alternates the two codes process by process, each scoring all ML-1M users
(leave-one-out test inputs, top-10, seen excluded, batch 128) fp32 and int8 three times after a
warm-up, and reports medians and per-round ratios; outputs must be identical. Each worker runs
in a fresh process with ``PYTHONPATH`` set to its checkout, so it imports that checkout's code.
``api`` alternates ``behaviorlm serve`` of each checkout (one worker unless ``--serve-args`` says
otherwise; the model's known users or, with ``--kind events``, their last 50 raw events; k=10)
under ``wrk`` at 8 connections for ``--seconds`` per round, and reports median p50 / p99
latency and requests/s with per-round ratios.
Both checkouts need ``data/movielens/ml-1m`` (``make data``; a symlink will do). Writes
``benchmarks/out/ab_<command>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from provenance import write_json

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
RECIPE = {
    "dim": 64,
    "n_layers": 2,
    "n_heads": 2,
    "ffn_mult": 1,
    "max_len": 200,
    "batch_size": 128,
    "lr": 2e-3,
    "dropout": 0.1,
    "patience": 5,
    "loss": "full",
    "seed": 42,
    "progress": False,
}


def _imports() -> tuple:
    """``load_dataset`` and the batch scorer of whichever layout this checkout has."""
    import behaviorlm

    if hasattr(behaviorlm, "__version__"):  # 0.2 layout
        from behaviorlm.data.datasets import load_dataset
        from behaviorlm.inference.batch import ScoringOptions, score_events

        def score(model, events, out, quantize):
            return score_events(model.engine, events, out, ScoringOptions(k=10), quantize=quantize, progress=False)

    else:  # 0.1 layout
        from behaviorlm.datasets import load_dataset
        from behaviorlm.scoring import score_events

        def score(model, events, out, quantize):
            return score_events(model, events, out, k=10, batch_size=128, quantize=quantize, progress=False)

    return load_dataset, score


def worker_train(epochs: int, save: str) -> dict:
    import torch

    from behaviorlm.evaluation import evaluate, leave_one_out
    from behaviorlm.recommender import BehaviorLM

    torch.set_num_threads(2)
    load_dataset, _ = _imports()
    split = leave_one_out(load_dataset("ml-1m").events)
    t0 = time.perf_counter()
    model = BehaviorLM(epochs=epochs, **RECIPE).fit(split.train, validation=split.valid, exclude_seen=True)
    wall = time.perf_counter() - t0
    report = evaluate(model, split, k=10, exclude_seen=True)
    model.save(save)
    curve = [(e["epoch"], e["loss"], e.get("val_score")) for e in model.history_.epochs]
    return {"train_s": wall, "curve": curve, "test_ndcg10": report.model["ndcg@10"]}


def worker_score(model_dir: str) -> dict:
    import polars as pl
    import torch

    from behaviorlm.evaluation import leave_one_out
    from behaviorlm.recommender import BehaviorLM

    torch.set_num_threads(2)
    load_dataset, score = _imports()
    inputs = leave_one_out(load_dataset("ml-1m").events).test.inputs
    model = BehaviorLM.load(model_dir)
    out = OUT / f"ab_scores_{os.getpid()}.parquet"
    runs: dict[str, list[float]] = {"fp32": [], "int8": []}
    for mode in (None, "int8") * 4:
        runs[mode or "fp32"].append(score(model, inputs, out, mode).users_per_s)
    top = pl.read_parquet(out).sort("user_id", "rank")
    out.unlink()
    digest = int(top.select(pl.col("item_id").hash(seed=0).sum()).item())
    return {m: statistics.median(v[1:]) for m, v in runs.items()} | {"rows": top.height, "digest": digest}


def api_round(
    checkout: Path, model: str, seconds: float, tmp: Path, kind: str = "user", serve_args: list[str] | None = None
) -> dict:
    """One server of ``checkout`` under wrk at 8 connections: p50, p99 and requests/s (``kind``:
    known users or their last 50 raw events, as benchmarks/api_load.py draws them)."""
    from api_load import free_port, request_bodies, run_level_wrk, start_server

    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(checkout), OMP_NUM_THREADS="1")
    proc = start_server(model, port, serve_args or [], env, cwd=checkout)
    try:
        bodies = request_bodies(model, 500, 10, kind, seed=0)
        r = run_level_wrk(f"http://127.0.0.1:{port}/v1/recommend", bodies, 8, seconds, tmp)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {k: r[k] for k in ("p50_ms", "p99_ms", "rps", "errors")}


def _in_turn(codes: dict[str, Path], r: int) -> list[tuple[str, Path]]:
    """The two codes in alternating order (base first in even rounds, this first in odd ones), so
    that a position effect within a round (the second server starting while the first one's
    process is still being reaped, a warmer or colder page cache) cancels out in the medians."""
    pairs = list(codes.items())
    return pairs if r % 2 == 0 else pairs[::-1]


def _summarise_api(results: dict[str, list[dict]]) -> dict:
    out = {}
    for key in ("p50_ms", "p99_ms", "rps"):
        med = {n: statistics.median(x[key] for x in rs) for n, rs in results.items()}
        ratios = [t[key] / b[key] for t, b in zip(results["this"], results["base"], strict=True)]
        out[key] = {"median": med, "ratio": med["this"] / med["base"], "round_ratios": ratios}
        print(f"{key}: this {med['this']:.2f} vs base {med['base']:.2f} (x{out[key]['ratio']:.2f}; "
              f"rounds {min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip
    out["errors"] = sum(x["errors"] for rs in results.values() for x in rs)
    return out


def _run(checkout: Path, args: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    cmd = [sys.executable, str(Path(__file__).resolve()), "_worker", *args]
    res = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, check=False)
    if res.returncode:
        raise SystemExit(f"worker in {checkout} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["train", "score", "api", "_worker"])
    ap.add_argument("rest", nargs="*")
    ap.add_argument("--base", type=Path, help="the other checkout")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--model", help="model folder both codes can load (score)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=15, help="api: wrk seconds per round")
    ap.add_argument("--kind", default="user", choices=["user", "events"], help="api: known users or 50 raw events")
    ap.add_argument(
        "--serve-args", default="", help="api: `behaviorlm serve` flags both servers get, e.g. '--workers 2'"
    )
    ap.add_argument("--this-args", default="", help="api: flags only this checkout's server gets (a new option)")
    ap.add_argument("--tag", default="", help="api: output name suffix (ab_api_<tag>.json)")
    args = ap.parse_args(argv)
    if args.command == "_worker":
        kind, *params = args.rest
        result = worker_train(int(params[0]), params[1]) if kind == "train" else worker_score(params[0])
        print(json.dumps(result))
        return result
    if args.base is None:
        ap.error("--base is required")
    if args.model:  # the workers run in each checkout's folder
        args.model = str(Path(args.model).resolve())
    codes = {"base": args.base.resolve(), "this": ROOT}
    results: dict[str, list[dict]] = {name: [] for name in codes}
    rounds = 1 if args.command == "train" else args.rounds
    if args.command == "api":
        import tempfile

        tmp = Path(tempfile.mkdtemp())
        for r in range(rounds):
            for name, checkout in _in_turn(codes, r):
                flags = args.serve_args.split() + (args.this_args.split() if name == "this" else [])
                results[name].append(api_round(checkout, args.model, args.seconds, tmp, args.kind, flags))
                print(f"round {r + 1} {name}: {results[name][-1]}", flush=True)
        summary = {
            "command": "api",
            "base": str(codes["base"]),
            "kind": args.kind,
            "serve_args": args.serve_args,
            "this_args": args.this_args,
            "results": results,
            **_summarise_api(results),
        }
        OUT.mkdir(exist_ok=True)
        write_json(OUT / f"ab_api{'_' + args.tag if args.tag else ''}.json", summary)
        return summary
    for r in range(rounds):
        for name, checkout in _in_turn(codes, r):
            params = (
                ["train", str(args.epochs), str(OUT / f"ab_model_{name}")]
                if args.command == "train"
                else ["score", args.model]
            )
            results[name].append(_run(checkout, params))
            print(f"round {r + 1} {name}: {results[name][-1]}", flush=True)
    summary = {"command": args.command, "base": str(codes["base"]), "results": results}
    if args.command == "score":
        for mode in ("fp32", "int8"):
            med = {n: statistics.median(x[mode] for x in rs) for n, rs in results.items()}
            ratios = [t[mode] / b[mode] for t, b in zip(results["this"], results["base"], strict=True)]
            summary[mode] = {"median": med, "ratio": med["this"] / med["base"], "round_ratios": ratios}
            print(
                f"{mode}: this {med['this']:,.0f} vs base {med['base']:,.0f} users/s (x{summary[mode]['ratio']:.2f}; "
                f"rounds {min(ratios):.2f}-{max(ratios):.2f})"
            )
        summary["identical_output"] = len({x["digest"] for rs in results.values() for x in rs}) == 1
    else:
        summary["identical"] = results["base"][0]["curve"] == results["this"][0]["curve"] and (
            results["base"][0]["test_ndcg10"] == results["this"][0]["test_ndcg10"]
        )
    print(f"identical: {summary.get('identical', summary.get('identical_output'))}")
    OUT.mkdir(exist_ok=True)
    write_json(OUT / f"ab_{args.command}.json", summary)
    return summary


if __name__ == "__main__":
    main()
