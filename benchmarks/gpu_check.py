"""The accelerator check: ML-1M trained for a fixed number of epochs on CUDA and on the CPU.

    python benchmarks/gpu_check.py                       # cuda vs cpu, 3 epochs each (make gpu-check)
    python benchmarks/gpu_check.py --devices cpu --epochs 1   # the script itself, on a machine without a GPU

Same seed, same recipe (``ml-1m``), same leave-one-out split, no early stop: each device trains
``--epochs`` epochs, then scores every test user over the full catalog. Prints per device the
epoch losses, seconds per epoch, tokens/s, NDCG@10 with its bootstrap CI and batch-scoring
users/s; then the comparison against the first device: the largest relative difference of an
epoch's loss (bf16 autocast on CUDA moves losses a little: ``--tolerance``, default 2%) and whether
the NDCG@10 intervals overlap. Exit status 1 when the losses differ beyond the tolerance.

Without a GPU it says so, writes the JSON with ``"skipped"`` and exits 0: the check is for the
accelerator machine that is sometimes lent (the ``device`` tool). Writes
``benchmarks/out/gpu_check.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from pretrain import hardware
from provenance import write_json

from behaviorlm.data.datasets import load_dataset
from behaviorlm.evaluation import evaluate, leave_one_out
from behaviorlm.nn import device as devices
from behaviorlm.recommender import BehaviorLM

OUT = Path(__file__).parent / "out"


def run_on(name: str, split, epochs: int, seed: int) -> dict:
    """Train ``epochs`` epochs on ``name``, evaluate and time batch scoring there."""
    model = BehaviorLM("ml-1m", epochs=epochs, patience=epochs + 1, seed=seed, progress=False, device=name)
    t0 = time.perf_counter()
    model.fit(split.train, split.valid, True)
    fit_s = time.perf_counter() - t0
    report = evaluate(model, split, k=10, exclude_seen=True).to_dict()
    users = split.test.inputs.df["user_id"].unique().to_list()
    t0 = time.perf_counter()
    with devices.synchronized(model.engine.device):
        n = model.recommend(events=split.test.inputs, k=10)["user_id"].n_unique()
    score_s = time.perf_counter() - t0
    epochs_ = model.history_.epochs
    return {
        "device": str(devices.resolve(name)),
        "gpu": torch.cuda.get_device_name() if devices.resolve(name).type == "cuda" else None,
        "losses": [e["loss"] for e in epochs_],
        "seconds_per_epoch": [e["seconds"] for e in epochs_],
        "tokens_per_s": sum(e["tokens"] for e in epochs_) / sum(e["seconds"] for e in epochs_),
        "fit_wall_s": fit_s,
        "ndcg@10": report["ndcg@10"],
        "ndcg@10_ci95": report["ci95"].get("ndcg@10"),
        "metrics": {k: v for k, v in report.items() if k != "by_target"},
        "score_users": n,
        "score_users_per_s": n / score_s,
        "users_in_test": len(users),
    }


def compare(runs: list[dict], tolerance: float) -> dict:
    """Each run against the first: the largest relative epoch-loss difference, NDCG intervals."""
    ref, out = runs[0], []
    for run in runs[1:]:
        rel = max(abs(a - b) / abs(b) for a, b in zip(run["losses"], ref["losses"], strict=True))
        out.append(
            {
                "device": run["device"],
                "against": ref["device"],
                "max_rel_loss_diff": rel,
                "within_tolerance": rel <= tolerance,
                "speedup_per_epoch": _mean(ref["seconds_per_epoch"]) / _mean(run["seconds_per_epoch"]),
                "ndcg_delta": run["ndcg@10"] - ref["ndcg@10"],
                "ndcg_intervals_overlap": _overlap(run["ndcg@10_ci95"], ref["ndcg@10_ci95"]),
            }
        )
    return {"tolerance": tolerance, "pairs": out, "ok": all(p["within_tolerance"] for p in out)}


def _overlap(a: list[float] | None, b: list[float] | None) -> bool | None:
    return None if a is None or b is None else a[0] <= b[1] and b[0] <= a[1]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="cuda,cpu", help="comma-separated, the first is the reference")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--tolerance", type=float, default=0.02, help="largest relative epoch-loss difference allowed")
    args = ap.parse_args(argv)
    names = [d.strip() for d in args.devices.split(",") if d.strip()]
    command = " ".join(["python benchmarks/gpu_check.py", *(argv or sys.argv[1:])])
    result: dict = {"command": command, "hardware": hardware()}
    absent = [n for n in names if n.startswith("cuda") and not torch.cuda.is_available()]
    if absent:
        result["skipped"] = f"no CUDA device on this machine (torch {torch.__version__}): {absent} not checked"
        print(result["skipped"])
        write_json(OUT / "gpu_check.json", result)
        return 0
    split = leave_one_out(load_dataset("ml-1m").events)
    runs = []
    for name in names:
        run = run_on(name, split, args.epochs, args.seed)
        runs.append(run)
        spe = ", ".join(f"{s:.1f}" for s in run["seconds_per_epoch"])
        print(
            f"{run['device']:>8} {run['gpu'] or ''}: losses {[round(x, 4) for x in run['losses']]}, s/epoch {spe}, "
            f"{run['tokens_per_s']:,.0f} tokens/s, NDCG@10 {run['ndcg@10']:.4f} {run['ndcg@10_ci95']}, "
            f"scoring {run['score_users_per_s']:,.0f} users/s",
            flush=True,
        )
    result |= {"runs": runs, "comparison": compare(runs, args.tolerance)}
    for p in result["comparison"]["pairs"]:
        print(
            f"{p['device']} vs {p['against']}: largest epoch-loss difference {p['max_rel_loss_diff']:.2%} "
            f"(tolerance {args.tolerance:.0%}: {'ok' if p['within_tolerance'] else 'FAILED'}), "
            f"{p['speedup_per_epoch']:.2f}x the reference's s/epoch; NDCG@10 {p['ndcg_delta']:+.4f} "
            f"({'inside' if p['ndcg_intervals_overlap'] else 'outside'} each other's 95% interval)"
        )
    write_json(OUT / "gpu_check.json", result)
    return 0 if result["comparison"]["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
