"""What the repeat-aware output costs: the plain model and the copy head, interleaved A/B on Taobao.

    python benchmarks/clickstream_cost.py                 # 3 rounds: train 2 epochs each, score all users
    python benchmarks/clickstream_cost.py --api           # then the API (known users, 50 raw events) per model

Both variants train the same windows for a fixed number of epochs (no validation, so the work is
equal), alternating A, B, A, B ... so that the shared machine's load falls on both; the table
quotes medians and the B/A ratio. Batch scoring ranks every user of the sample over the full
catalog (exact, seen items kept), also alternating. With ``--api`` each saved model is served in
turn by ``benchmarks/api_load.py`` (one uvicorn worker, wrk on loopback). Writes
``benchmarks/out/clickstream_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pretrain import hardware
from provenance import write_json

from behaviorlm.data.datasets import data_dir, load_dataset
from behaviorlm.evaluation import leave_one_out
from behaviorlm.inference.batch import ScoringOptions, score_events, set_threads
from behaviorlm.nn.training import peak_rss_mb
from behaviorlm.recommender import BehaviorLM

OUT = Path(__file__).parent / "out"
VARIANTS = {"plain": "clickstream-small@1", "copy": "clickstream-small@2"}


def train_once(recipe: str, train: Any, epochs: int) -> tuple[BehaviorLM, float]:
    model = BehaviorLM(recipe, epochs=epochs, progress=False, seed=0).fit(train, exclude_seen=False)
    return model, statistics.median(e["seconds"] for e in model.history_.epochs)


def score_once(model: BehaviorLM, events: Any) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        summary = score_events(
            model.engine, events, Path(tmp) / "s.parquet", ScoringOptions(k=10, exclude_seen=False), progress=False
        )
    return summary.n_users / summary.seconds


def api_once(model_dir: Path, seconds: float) -> list[dict[str, Any]]:
    cmd = [sys.executable, str(Path(__file__).parent / "api_load.py"), "--model", str(model_dir)]
    cmd += ["--levels", "1,8", "--kinds", "user,events", "--seconds", str(seconds), "--name", f"cost_{model_dir.name}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((OUT / f"api_load_cost_{model_dir.name}.json").read_text())["rows"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--api", action="store_true")
    ap.add_argument("--api-seconds", type=float, default=10)
    args = ap.parse_args(argv)
    set_threads()
    data = load_dataset("taobao")
    split = leave_one_out(data.events)
    times: dict[str, dict[str, list[float]]] = {v: {"s_per_epoch": [], "users_per_s": []} for v in VARIANTS}
    models: dict[str, BehaviorLM] = {}
    for r in range(args.rounds):
        for name, recipe in VARIANTS.items():
            models[name], s = train_once(recipe, split.train, args.epochs)
            times[name]["s_per_epoch"].append(s)
            print(f"round {r + 1} {name}: {s:.1f} s/epoch", flush=True)
    for r in range(args.rounds):
        for name, model in models.items():
            times[name]["users_per_s"].append(score_once(model, split.test.inputs))
            print(f"round {r + 1} {name}: {times[name]['users_per_s'][-1]:,.0f} users/s", flush=True)
    result: dict[str, Any] = {"hardware": hardware(), "rounds": args.rounds, "epochs": args.epochs, "runs": times}
    result["median"] = {v: {k: statistics.median(x) for k, x in t.items()} for v, t in times.items()}
    result["ratio_copy_over_plain"] = {
        k: result["median"]["copy"][k] / result["median"]["plain"][k] for k in ("s_per_epoch", "users_per_s")
    }
    if args.api:
        result["api"] = {}
        for _round in range(2):  # A, B, A, B
            for name, model in models.items():
                folder = data_dir() / "models" / f"cost-{name}"
                model.save(folder)
                result["api"].setdefault(name, []).append(api_once(folder, args.api_seconds))
    print(f"\n{'variant':<8}{'s/epoch':>10}{'users/s':>10}")
    for v, m in result["median"].items():
        print(f"{v:<8}{m['s_per_epoch']:>10.2f}{m['users_per_s']:>10,.0f}")
    ratio = result["ratio_copy_over_plain"]
    print(f"copy / plain: s/epoch x{ratio['s_per_epoch']:.2f}, users/s x{ratio['users_per_s']:.2f}")
    for name, runs in result.get("api", {}).items():
        for rows in runs:
            cells = ", ".join(f"{x['kind']} c={x['concurrency']} p99 {x['p99_ms']:.1f} ms" for x in rows)
            print(f"api {name}: {cells}")
    result["peak_rss_mb"] = peak_rss_mb()
    OUT.mkdir(exist_ok=True)
    write_json(OUT / "clickstream_cost.json", result)
    return result


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"wall {time.perf_counter() - start:.0f} s")
