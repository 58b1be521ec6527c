"""Batch scoring at production size through the two-stage index (issue 30, part 3).

    python benchmarks/score_scale.py --size L --model data/models/synth-L [--users N] [--sample 2000]
        [--ab-base REV --ab-users 20000 --ab-rounds 2]

Needs the prepared folder of ``benchmarks/scale.py`` (``data/synth/<size>/prepared``: L is 3M
users over 1M items, synthetic -- a scale workload, never a quality claim). Each step is its own
process (wall time and the peak RSS of its process tree sampled every 50 ms):

1. ``train``: when ``--model`` does not exist, ``behaviorlm train --prepared`` for
   ``--train-steps`` steps (the clickstream-small shape of ``scale_train.py``);
2. ``index``: ``BehaviorLM.load(model, retrieval="auto")`` -- builds the HNSW index when the
   model has none -- then calibrates it on 256 users of the shards (a model trained from shards
   keeps no histories; ``behaviorlm score --prepared`` does the same): its search depth against
   exact ranking, and exact against two-stage cost per path, stored in the model folder
   (``retrieval/index.json``, whose routes this prints);
3. ``score``: ``score_prepared`` over the first ``--users`` users (default: all) with
   ``retrieval="auto"``, batch 128: users/s and peak RSS;
4. ``exact``: the first ``--sample`` users again with ``retrieval="exact"`` -- the reference the
   two-stage lists' recall@10 is measured against (with a bootstrap CI over users);
5. with ``--ab-base``: the same ``--ab-users`` users scored by the code at ``REV`` (a git
   worktree) and by this code, interleaved ``--ab-rounds`` times (base, head, base, head): the
   hot path against the previous commit.

Writes ``benchmarks/out/score_scale_<size>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
from provenance import ROOT, write_json
from scale import measure

OUT = Path(__file__).parent / "out"

INDEX = """
import json, sys, time
from pathlib import Path
from behaviorlm.inference.batch import set_threads
from behaviorlm.recommender import BehaviorLM
from behaviorlm.sequence.shards import PreparedShards
set_threads()
t0 = time.perf_counter()
model = BehaviorLM.load(sys.argv[1], retrieval="auto")
sample = PreparedShards.open(sys.argv[2]).sample(256, model.engine.max_len)  # trained from shards: no histories
model.use_retrieval("auto", directory=sys.argv[1], users=sample)
meta = json.loads((Path(sys.argv[1]) / "retrieval" / "index.json").read_text())
print("RESULT", json.dumps({"load_s": time.perf_counter() - t0, "tuned": meta.get("tuned"),
      "routes": meta.get("routes"), "batch": model.engine.retrieval_for("batch"),
      "online": model.engine.retrieval_for("online")}))
"""

SCORE = """
import json, sys
from datetime import datetime, timezone
from behaviorlm.inference.batch import ScoringOptions, score_prepared, set_threads
from behaviorlm.recommender import BehaviorLM
from behaviorlm.sequence.shards import PreparedShards
set_threads()
model = BehaviorLM.load(sys.argv[1], retrieval=sys.argv[5])
prepared = PreparedShards.open(sys.argv[2])
if hasattr(PreparedShards, "sample") and not len(model.histories_):  # as `behaviorlm score --prepared` does
    model.use_retrieval(sys.argv[5], directory=sys.argv[1], users=prepared.sample(256, model.engine.max_len))
s = score_prepared(model.engine, prepared, sys.argv[3], datetime(2026, 1, 1, tzinfo=timezone.utc),
                   ScoringOptions(k=10, batch_size=128), progress=False, max_users=int(sys.argv[4]))
print("RESULT", json.dumps({"users": s.n_users, "rows": s.n_rows, "seconds": s.seconds, "users_per_s": s.users_per_s,
      "process_peak_mb": s.peak_rss_mb, "n_items": model.tokenizer_.n_items, "all_users": prepared.n_users,
      "retrieval": getattr(s, "retrieval", "?")}))
"""


def run(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``cmd``: its wall time, the peak RSS of its process tree, and the JSON it printed."""
    wall, peak, stdout = measure(cmd) if env is None else _measure_env(cmd, env)
    line = next((ln for ln in stdout.splitlines() if ln.startswith("RESULT")), None)
    if line is None:
        raise SystemExit(f"{cmd[:4]} printed no RESULT:\n{stdout[-3000:]}")
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(peak / 2**20), **json.loads(line[7:])}


def _measure_env(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """:func:`scale.measure` with another environment (the A/B base's PYTHONPATH)."""
    old = dict(os.environ)
    os.environ.update(env)
    try:
        return measure(cmd)
    finally:
        os.environ.clear()
        os.environ.update(old)


def train(prepared: Path, model: Path, steps: int) -> dict:
    cmd = [sys.executable, "-m", "behaviorlm", "train", "--prepared", str(prepared), "--recipe", "clickstream-small"]
    cmd += ["--epochs", "1", "--max-steps", str(steps), "--out", str(model), "--batch-size", "128", "--max-len", "200"]
    wall, peak, _ = measure(cmd)
    return {"step": "train", "wall_s": round(wall, 1), "peak_rss_mb": round(peak / 2**20), "steps": steps}


def score(model: Path, prepared: Path, out: Path, users: int, retrieval: str, env: dict | None = None) -> dict:
    """``SCORE`` run as a file (not ``-c``, whose working directory would shadow ``PYTHONPATH``)."""
    script = out.parent / "score_worker.py"
    script.write_text(SCORE)
    return run([sys.executable, str(script), str(model), str(prepared), str(out), str(users), retrieval], env)


def recall_at_10(approx: Path, exact: Path) -> dict:
    """Per-user recall@10 of the two-stage lists against the exact ones (users of ``exact``),
    mean with a 95% bootstrap CI over users."""
    e = pl.read_parquet(exact / "part-*.parquet").select("user_id", "item_id")
    users = e["user_id"].unique()
    a = pl.read_parquet(approx / "part-*.parquet").select("user_id", "item_id")
    a = a.filter(pl.col("user_id").is_in(users.implode()))
    both = e.join(a.with_columns(found=pl.lit(True)), on=["user_id", "item_id"], how="left")
    per_user = both.group_by("user_id").agg(recall=pl.col("found").fill_null(False).sum() / pl.len())
    r = per_user["recall"].to_numpy()
    rng = np.random.default_rng(0)
    boots = [r[rng.integers(0, len(r), len(r))].mean() for _ in range(1000)]
    return {
        "users": len(r),
        "recall_at_10": float(r.mean()),
        "ci95": [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))],
        "users_below_0_9": int((r < 0.9).sum()),
    }


def worktree(rev: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), rev], check=True)
    return where


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="L", choices=["S", "M", "L"])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--users", type=int, default=0, help="users to score (0: all)")
    ap.add_argument("--sample", type=int, default=2000, help="users ranked exactly for recall@10")
    ap.add_argument("--ab-base", help="git revision to A/B the scoring hot path against")
    ap.add_argument("--ab-users", type=int, default=20_000)
    ap.add_argument("--ab-rounds", type=int, default=2)
    args = ap.parse_args()
    prepared = ROOT / "data" / "synth" / args.size / "prepared"
    if not prepared.is_dir():
        raise SystemExit(f"{prepared} is missing: run `make bench-scale-large` (L) or benchmarks/scale.py first")
    rows: list[dict] = []
    if not args.model.exists():
        rows.append(train(prepared, args.model, args.train_steps))
        print(rows[-1], flush=True)
    rows.append({"step": "index", **run([sys.executable, "-c", INDEX, str(args.model), str(prepared)])})
    print(rows[-1], flush=True)
    users = args.users or 10**9
    with tempfile.TemporaryDirectory(dir=ROOT / "data") as tmp:
        full = score(args.model, prepared, Path(tmp) / "auto", users, "auto")
        rows.append({"step": "score auto", **full})
        print(rows[-1], flush=True)
        exact = score(args.model, prepared, Path(tmp) / "exact", args.sample, "exact")
        rows.append({"step": "score exact (sample)", **exact})
        print(rows[-1], flush=True)
        recall = recall_at_10(Path(tmp) / "auto", Path(tmp) / "exact")
        print("recall@10 vs exact:", recall, flush=True)
        ab = ab_rounds(args, prepared, Path(tmp)) if args.ab_base else None
    print_table(rows, recall, ab)
    write_json(OUT / f"score_scale_{args.size}.json", {"rows": rows, "recall": recall, "ab": ab})


def base_model(model: Path, where: Path) -> Path:
    """``model`` as the code before issue 30 reads it: the same files (linked), its
    ``estimator.json`` without the keys that code does not know (``sparse_embeddings``)."""
    where.mkdir(parents=True)
    for f in model.iterdir():
        if f.name != "estimator.json":
            (where / f.name).symlink_to(f.resolve())
    est = json.loads((model / "estimator.json").read_text())
    est["history"].pop("sparse_embeddings", None)
    est["params"].pop("sparse_embeddings", None)
    (where / "estimator.json").write_text(json.dumps(est, indent=2))
    return where


def ab_rounds(args: argparse.Namespace, prepared: Path, tmp: Path) -> dict:
    """The base revision and this code scoring the same users, interleaved (base, head, ...),
    through the same stored index (the base reads its tuned depth, not the new routes or skip)."""
    base = worktree(args.ab_base, tmp / "base-src")
    models = {"base": base_model(args.model, tmp / "base-model"), "head": args.model}
    try:
        runs: dict[str, list[float]] = {"base": [], "head": []}
        for i in range(args.ab_rounds):
            for side in ("base", "head"):
                env = {"PYTHONPATH": str(base) if side == "base" else ""}
                r = score(models[side], prepared, tmp / f"ab-{side}-{i}", args.ab_users, "auto", env)
                runs[side].append(r["users_per_s"])
                print(side, i, r, flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"base": args.ab_base, "users": args.ab_users, "users_per_s": runs, "median": med,
            "ratio": med["head"] / med["base"]}  # fmt: skip


def print_table(rows: list[dict], recall: dict, ab: dict | None) -> None:
    print(f"\n{'step':<22}{'wall s':>9}{'peak RSS MB':>13}{'users':>11}{'users/s':>10}  ranking")
    for r in rows:
        users = f"{r['users']:,}" if "users" in r else "-"
        rate = f"{r['users_per_s']:,.0f}" if "users_per_s" in r else "-"
        how = r.get("retrieval") or r.get("batch") or ""
        print(f"{r['step']:<22}{r['wall_s']:>9.1f}{r['peak_rss_mb']:>13,}{users:>11}{rate:>10}  {how}")
    lo, hi = recall["ci95"]
    n, mean = recall["users"], recall["recall_at_10"]
    print(f"recall@10 against exact ranking, {n:,} users: {mean:.4f} [{lo:.4f}, {hi:.4f}]")
    if ab:
        print(f"A/B vs {ab['base']}: users/s base {ab['users_per_s']['base']} head {ab['users_per_s']['head']}, "
              f"median ratio x{ab['ratio']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
