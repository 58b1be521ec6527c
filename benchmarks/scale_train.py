"""Scale benchmark, part 2 (issue 16): training, DDP and batch scoring on prepared shards.

    python benchmarks/scale_train.py --size S --size M [--steps 150] [--ddp] [--score-users 20000]
    python benchmarks/scale_train.py --size S --size M --sparse off,on --skip-in-memory --skip-score --ddp --ddp-size M

Needs the prepared folders of ``benchmarks/scale.py`` (``data/synth/<size>/prepared``). Each run
is its own process (wall time and the peak RSS of its process tree sampled every 50 ms):

- ``train shards``: ``BehaviorLM.fit(PreparedShards)`` (memory-mapped) for a fixed number of steps;
- ``train in-memory``: the same model and steps, fitted on the raw events read into memory (the
  path ``behaviorlm train --events`` takes) -- S and M only, L does not fit in memory this way;
  the two are interleaved (shards, in-memory, shards, in-memory) and the medians are quoted;
- ``ddp 1`` / ``ddp 2``: ``behaviorlm train --prepared --nproc 1|2`` on S, interleaved, with the
  bytes DDP all-reduced per step (counted by a communication hook);
- ``score``: ``score_prepared`` over the first ``--score-users`` users with the trained model;
- ``--sparse off,on``: every training row with the dense item table (AdamW) and row-sparse
  (SparseAdam, :mod:`behaviorlm.nn.optim`), interleaved (issue 30): tokens/s, and under DDP the
  bytes all-reduced per step.

The model is the clickstream-small shape (dim 64, 2 layers, max_len 200, batch 128, sampled
softmax with the recipe's 4,096 shared negatives: the catalogs have 10^5-10^6 items). Synthetic data is for
scale figures only, never quality. Writes ``benchmarks/out/scale_train_<sizes>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from provenance import ROOT, write_json
from scale import measure

OUT = Path(__file__).parent / "out"
MODEL = {"dim": 64, "n_layers": 2, "n_heads": 2, "max_len": 200, "batch_size": 128, "loss": "sampled"}

FIT = """
import json, sys
from pathlib import Path
import polars as pl
from behaviorlm.recommender import BehaviorLM
from behaviorlm.sequence.shards import PreparedShards
mode, folder, steps, out = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
params = json.loads(sys.argv[5])
model = BehaviorLM("clickstream-small", epochs=1, max_steps=steps, progress=False, **params)
if mode == "shards":
    model.fit(PreparedShards.open(folder / "prepared"))
else:
    files = sorted((folder / "raw").glob("events-*.parquet"))
    model.fit(pl.concat([pl.read_parquet(f) for f in files]))
model.use_retrieval("exact").save(out)  # no ANN index: minutes at 1M items, and not what this measures
h = model.history_
e = h.epochs[-1]
print("RESULT", json.dumps({"tokens_per_s": e["tokens_per_s"], "steps": steps, "tokens": e["tokens"],
      "rss_start_mb": h.rss_start_mb, "rss_first_step_mb": h.rss_first_step_mb, "process_peak_mb": e["peak_rss_mb"],
      "n_items": model.tokenizer_.n_items, "parameters": model.model_.num_parameters()}))
"""

SCORE = """
import json, sys
from datetime import datetime, timezone
from behaviorlm.inference.batch import ScoringOptions, score_prepared, set_threads
from behaviorlm.recommender import BehaviorLM
from behaviorlm.sequence.shards import PreparedShards
set_threads()
model = BehaviorLM.load(sys.argv[1])
prepared = PreparedShards.open(sys.argv[2])
s = score_prepared(model.engine, prepared, sys.argv[3], datetime(2026, 1, 1, tzinfo=timezone.utc),
                   ScoringOptions(k=10, batch_size=64), progress=False, max_users=int(sys.argv[4]))
print("RESULT", json.dumps({"users": s.n_users, "rows": s.n_rows, "seconds": s.seconds, "users_per_s": s.users_per_s,
      "n_items": model.tokenizer_.n_items, "all_users": prepared.n_users}))
"""


def run(cmd: list[str]) -> dict:
    """Run ``cmd``: its wall time, the peak RSS of its process tree, and the JSON it printed."""
    wall, peak, stdout = measure(cmd)
    line = next((ln for ln in stdout.splitlines() if ln.startswith("RESULT")), "RESULT {}")
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(peak / 2**20), **json.loads(line[7:])}


def fit(mode: str, size: str, steps: int, out: Path, sparse: str = "off") -> dict:
    folder = ROOT / "data" / "synth" / size
    params = json.dumps({**MODEL, "sparse_embeddings": sparse})
    res = run([sys.executable, "-c", FIT, mode, str(folder), str(steps), str(out), params])
    return {"size": size, "path": f"train {mode}{' sparse' if sparse == 'on' else ''}", **res}


def ddp(nproc: int, size: str, steps: int, out: Path, sparse: str = "off") -> dict:
    folder = ROOT / "data" / "synth" / size / "prepared"
    cmd = [sys.executable, "-m", "behaviorlm", "train", "--prepared", str(folder), "--recipe", "clickstream-small"]
    cmd += ["--epochs", "1", "--max-steps", str(steps), "--nproc", str(nproc), "--out", str(out)]
    cmd += ["--batch-size", str(MODEL["batch_size"]), "--max-len", str(MODEL["max_len"])]
    cmd += ["--sparse-embeddings", sparse, "--retrieval", "exact"]
    res = run(cmd)
    hist = json.loads((out / "estimator.json").read_text())["history"]
    epoch = hist["epochs"][-1]
    return {
        "size": size,
        "path": f"ddp {nproc}{' sparse' if sparse == 'on' else ''}",
        **res,
        "tokens_per_s": epoch["tokens_per_s"],
        "allreduce_mb_per_step": (hist["allreduce_bytes_per_step"] or 0) / 2**20,
        "processes": hist["processes"],
    }


def score(size: str, model: Path, users: int, out: Path) -> dict:
    prepared = ROOT / "data" / "synth" / size / "prepared"
    return {
        "size": size,
        "path": "score",
        **run([sys.executable, "-c", SCORE, str(model), str(prepared), str(out), str(users)]),
    }


def median_of(rows: list[dict], keys: tuple[str, ...]) -> dict:
    """One row: the first row's labels, each numeric ``key`` the median over ``rows``."""
    out = dict(rows[0])
    for k in keys:
        out[k] = statistics.median(r[k] for r in rows if r.get(k) is not None) if rows[0].get(k) is not None else None
    out["repeats"] = len(rows)
    return out


COLUMNS = (  # (header, key, format)
    ("tokens/s", "tokens_per_s", ",.0f"),
    ("users/s", "users_per_s", ",.0f"),
    ("wall s", "wall_s", ".1f"),
    ("peak RSS MB", "peak_rss_mb", ",.0f"),
    ("start MB", "rss_start_mb", ",.0f"),
    ("1st step MB", "rss_first_step_mb", ",.0f"),
    ("allreduce MB/step", "allreduce_mb_per_step", ".1f"),
)


def print_table(rows: list[dict]) -> None:
    print("\n" + f"{'size':<5} {'path':<16} " + " ".join(f"{h:>{len(h) + 2}}" for h, _, _ in COLUMNS))
    for r in rows:
        cells = [format(r[k], fmt) if r.get(k) is not None else "-" for _, k, fmt in COLUMNS]
        print(
            f"{r['size']:<5} {r['path']:<16} "
            + " ".join(f"{c:>{len(h) + 2}}" for c, (h, _, _) in zip(cells, COLUMNS, strict=True))
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", action="append", choices=["S", "M", "L"], required=True)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ddp", action="store_true", help="also DDP 1 vs 2 processes on the first size")
    ap.add_argument("--score-users", type=int, default=20_000)
    ap.add_argument(
        "--sparse", default="off", help="item-table updates to compare, interleaved: off | on | off,on (issue 30)"
    )
    ap.add_argument("--ddp-size", choices=["S", "M", "L"], help="DDP runs on this size (default: the first)")
    ap.add_argument("--skip-in-memory", action="store_true", help="shards only (the sparse comparison)")
    ap.add_argument("--skip-score", action="store_true")
    ap.add_argument("--ddp-repeats", type=int, help="DDP runs per setting (default: --repeats)")
    ap.add_argument("--ddp-procs", default="1,2", help="process counts the DDP comparison runs")
    args = ap.parse_args()
    sparse_modes = args.sparse.split(",")
    rows: list[dict] = []
    keys = ("wall_s", "peak_rss_mb", "tokens_per_s", "rss_start_mb", "rss_first_step_mb", "allreduce_mb_per_step")
    with tempfile.TemporaryDirectory(dir=ROOT / "data") as tmp:
        for size in args.size:
            modes = ["shards"] if size == "L" or args.skip_in_memory else ["shards", "in-memory"]
            variants = [(m, sp) for m in modes for sp in sparse_modes]
            runs: dict[tuple[str, str], list[dict]] = {v: [] for v in variants}
            for rep in range(args.repeats):
                for mode, sp in variants:
                    r = fit(mode, size, args.steps, Path(tmp) / f"{size}-{mode}-{sp}-{rep}", sp)
                    print(r, flush=True)
                    runs[(mode, sp)].append(r)
            rows += [median_of(runs[v], keys) for v in variants]
            if not args.skip_score:
                trained = Path(tmp) / f"{size}-shards-{sparse_modes[0]}-0"
                r = score(size, trained, args.score_users, Path(tmp) / f"scores-{size}")
                print(r, flush=True)
                rows.append(r)
        if args.ddp:
            size = args.ddp_size or args.size[0]
            procs = [int(n) for n in args.ddp_procs.split(",")]
            ddp_runs: dict[tuple[int, str], list[dict]] = {(n, sp): [] for n in procs for sp in sparse_modes}
            for rep in range(args.ddp_repeats or args.repeats):
                for n, sp in ddp_runs:
                    r = ddp(n, size, args.steps, Path(tmp) / f"ddp{n}-{sp}-{rep}", sp)
                    print(r, flush=True)
                    ddp_runs[(n, sp)].append(r)
            rows += [median_of(v, keys) for v in ddp_runs.values()]
    print_table(rows)
    name = "_".join(args.size) + ("" if args.sparse == "off" else "_sparse")
    write_json(OUT / f"scale_train_{name}.json", {"model": MODEL, "steps": args.steps, "results": rows})


if __name__ == "__main__":
    main()
