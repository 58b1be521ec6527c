"""Side by side with a peer: RecTools' SASRec and behaviorlm's recipe on ML-1M, one after the other.

    make bench-peer-rectools        # makes .venv-rectools (RecTools 0.19.0, the pinned CPU torch) first
    python benchmarks/peer_rectools.py [--recipe ml-1m] [--minutes 30] [--skip-rectools]
    python benchmarks/peer_rectools.py --model data/models/ml-1m-loo-v2   # behaviorlm as make bench-ml1m trained it

Both train on the same leave-one-out split (each user's last rating is the test target, the one
before it the validation target; timestamps tied within a user keep the file's row order, and
RecTools gets that order as strictly increasing times), within the same wall-clock budget
(validation included), keeping their best validation epoch (behaviorlm: NDCG@10; RecTools: its
validation loss, the criterion its own tutorials use). Each then recommends its top 100 for every
user with seen items removed, timed, and both lists are scored here by one function: NDCG@10,
HR@10 and MRR over the top 100 (a target below rank 100 counts 0), bootstrap CIs and the paired
difference on the same users. RecTools runs in its own virtual environment (``--rectools-python``):
it is measured, not depended on. Writes ``benchmarks/out/peer_rectools.json``.
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
from pretrain import hardware
from provenance import write_json

from behaviorlm.data.datasets import data_dir, load_dataset
from behaviorlm.evaluation import leave_one_out, per_user_metrics
from behaviorlm.evaluation.metrics import bootstrap_ci, list_ranks, paired_difference
from behaviorlm.nn.training import peak_rss_mb
from behaviorlm.recipes import get_recipe
from behaviorlm.recommender import BehaviorLM

OUT = Path(__file__).parent / "out"
TOP = 100


def export_split(events: pl.DataFrame, folder: Path) -> None:
    """Every event but each user's test one, with its place in behaviorlm's order."""
    folder.mkdir(parents=True, exist_ok=True)
    events.select("user_id", "item_id").with_row_index("position").write_csv(folder / "interactions.csv")


def run_rectools(python: Path, folder: Path, minutes: float) -> dict:
    """RecTools' side, in its own interpreter; its lists come back as a CSV."""
    script = Path(__file__).parent / "peer" / "rectools_sasrec.py"
    cmd = [str(python), str(script), "--data", str(folder), "--minutes", str(minutes), "--k", str(TOP)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    info = json.loads((folder / "rectools_run.json").read_text())
    info["wall_s"] = time.perf_counter() - t0
    info["lists"] = pl.read_csv(folder / "rectools_recos.csv")
    return info


def run_behaviorlm(split, recipe: str, minutes: float, saved: Path | None) -> dict:
    """Train (or, with ``saved``, load what ``make bench-ml1m`` trained on this very split, its
    training record included) and time the top-100 lists of every test user."""
    if saved is not None:
        model = BehaviorLM.load(saved, retrieval="exact")
        train_s = model.history_.train_time_s
    else:
        model = BehaviorLM(recipe, max_time_s=minutes * 60, progress=False)
        t0 = time.perf_counter()
        model.fit(split.train, split.valid, True, training_data={"source": "ml-1m", "holdout": "loo"})
        train_s = time.perf_counter() - t0
    users = split.test.targets["user_id"].to_list()
    t0 = time.perf_counter()
    lists = model.recommend(users, events=split.test.inputs, k=TOP, exclude_seen=True)
    recommend_s = time.perf_counter() - t0
    h = model.history_
    return {
        "name": f"behaviorlm {get_recipe(model.recipe).ref}",
        "recipe": repr(model),
        "train_s": train_s,
        "epochs_run": len(h.epochs),
        "best_epoch": h.best_epoch,
        "seconds_per_epoch": sum(e["seconds"] for e in h.epochs) / max(len(h.epochs), 1),
        "recommend_s": recommend_s,
        "users": len(users),
        "lists": lists.select("user_id", "item_id", "rank"),
    }


def score_lists(lists: pl.DataFrame, targets: pl.DataFrame) -> np.ndarray:
    """1-based rank of each test target in its user's list (inf when absent), in ``targets``' order."""
    lists = lists.with_columns(
        pl.col("user_id").cast(targets["user_id"].dtype), pl.col("item_id").cast(targets["item_id"].dtype)
    )
    wide = lists.sort("user_id", "rank").group_by("user_id", maintain_order=True).agg(pl.col("item_id").head(TOP))
    got = targets.select("user_id", "item_id").join(wide.rename({"item_id": "top"}), on="user_id", how="left")
    top = np.full((got.height, TOP), -1, dtype=np.int64)
    for i, row in enumerate(got["top"].to_list()):
        if row:
            top[i, : len(row)] = row
    return list_ranks(top, got["item_id"].to_numpy())


def row(per_user: dict[str, np.ndarray], run: dict) -> dict:
    out = {name: float(v.mean()) for name, v in per_user.items()}
    out["ci95"] = {name: list(bootstrap_ci(v)) for name, v in per_user.items()}
    out.update({k: v for k, v in run.items() if k != "lists"})
    out["users_per_s"] = run["users"] / run["recommend_s"]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="ml-1m", help="behaviorlm's recipe (default: the latest ml-1m)")
    ap.add_argument("--minutes", type=float, default=30.0, help="each library's training budget")
    ap.add_argument("--rectools-python", type=Path, default=Path(".venv-rectools/bin/python"))
    ap.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a behaviorlm model trained on this split (make bench-ml1m) instead of training one",
    )
    ap.add_argument("--skip-rectools", action="store_true", help="behaviorlm's row only (no RecTools environment)")
    args = ap.parse_args(argv)
    split = leave_one_out(load_dataset("ml-1m").events)
    folder = data_dir() / "peer_rectools"
    export_split(split.test.inputs.df, folder)
    runs = {}
    if not args.skip_rectools:
        runs["RecTools SASRec"] = run_rectools(args.rectools_python, folder, args.minutes)
    ours = run_behaviorlm(split, args.recipe, args.minutes, args.model)
    runs[ours.pop("name")] = ours
    targets = split.test.targets
    per_user = {name: per_user_metrics(score_lists(r["lists"], targets), 10) for name, r in runs.items()}
    for m in per_user.values():
        m["mrr@100"] = m.pop("mrr")
    rows = {name: row(per_user[name], r) for name, r in runs.items()}
    print(f"\nML-1M leave-one-out, {targets.height} users, seen items excluded, {args.minutes:g} min each")
    print(f"{'':<22}{'NDCG@10':>9}{'HR@10':>8}{'MRR@100':>9}{'epochs':>8}{'s/epoch':>9}{'train s':>9}{'users/s':>9}")
    for name, r in rows.items():
        print(f"{name:<22}{r['ndcg@10']:>9.4f}{r['hr@10']:>8.4f}{r['mrr@100']:>9.4f}{r['epochs_run']:>8}"
              f"{r['seconds_per_epoch']:>9.1f}{r['train_s']:>9.0f}{r['users_per_s']:>9.0f}")  # fmt: skip
    paired = {}
    if len(rows) == 2:
        ours, peer = list(per_user)[1], list(per_user)[0]
        paired = {k: paired_difference(per_user[ours][k], per_user[peer][k]) for k in ("ndcg@10", "hr@10", "mrr@100")}
        for k, d in paired.items():
            print(f"behaviorlm - RecTools {k}: {d['diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]")
        a, b = rows[ours], rows[peer]
        ratios = {
            k: a[k] / b[k] if b[k] else float("nan") for k in ("ndcg@10", "seconds_per_epoch", "train_s", "users_per_s")
        }
        print("ratios behaviorlm / RecTools: " + ", ".join(f"{k} x{v:.3f}" for k, v in ratios.items()))
        paired["ratios"] = ratios
    result = {
        "command": "python benchmarks/peer_rectools.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "hardware": hardware(),
        "rows": rows,
        "paired": paired,
        "peak_rss_mb": peak_rss_mb(),
    }
    OUT.mkdir(exist_ok=True)
    write_json(OUT / "peer_rectools.json", result)
    return result


if __name__ == "__main__":
    main()
