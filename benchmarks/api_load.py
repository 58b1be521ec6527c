"""Load test of the recommendation service over loopback: throughput and latency percentiles.

Starts ``behaviorlm serve`` in its own process on 127.0.0.1 (one uvicorn worker, the production
shape on a 2-core box), waits for ``/ready``, then drives it closed-loop: ``concurrency``
connections, each sending its next request as soon as the previous answer arrived, for
``--seconds`` per level. Requests draw known users uniformly at random (seeded). Latency is
measured by the client (send -> full response received), so it includes HTTP, JSON and queueing,
not only the model.

The client is ``wrk`` (Debian package ``wrk``; ``make setup`` installs it) with one thread: it
costs a few microseconds per request, while a Python client (the fallback, ``httpx`` asyncio,
used when ``wrk`` is missing and named in the report) spends ~2 ms of the same two cores per
request and roughly halves what the server can show.

    python benchmarks/api_load.py --model data/models/ml-1m-loo             # levels 1, 8, 32, 30 s each
    python benchmarks/api_load.py --model data/outputs/taobao/model --seconds 10

Prints a table and writes ``benchmarks/out/api_load_<model>.json``. Targets (issue 8): p99 <=
20 ms for k=10 without explanations, >= 300 requests/s, zero errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import polars as pl
from provenance import write_json

OUT = Path(__file__).parent / "out"
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model: str, port: int, extra: list[str], env: dict | None = None, cwd: Path = ROOT
) -> subprocess.Popen:
    """``behaviorlm serve`` from the checkout at ``cwd`` (its code: ``python -m`` puts it first)."""
    cmd = [sys.executable, "-m", "behaviorlm.cli", "serve", "--model", model, "--port", str(port)]
    cmd += ["--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env or dict(os.environ))
    deadline = time.monotonic() + 900  # a 1M-item model builds or loads its index first
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become ready in 900 s")


async def run_level(url: str, bodies: list[dict], concurrency: int, seconds: float) -> dict:
    """Closed loop: ``concurrency`` workers, each with its next request as soon as one returns."""
    lat: list[float] = []
    errors: dict[str, int] = {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as client:
        await asyncio.gather(*(client.post("/v1/recommend", json=bodies[i]) for i in range(concurrency)))  # warm
        stop = time.perf_counter() + seconds

        async def worker(w: int) -> None:
            i = w
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/recommend", json=bodies[i % len(bodies)])
                    r.json()
                    ok = r.status_code == 200
                    key = str(r.status_code)
                except httpx.HTTPError as e:
                    ok, key = False, type(e).__name__
                if ok:
                    lat.append(time.perf_counter() - t0)
                else:
                    errors[key] = errors.get(key, 0) + 1
                i += concurrency

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        wall = time.perf_counter() - t0
    ms = np.array(lat) * 1000
    q = np.percentile(ms, [50, 95, 99]) if len(ms) else [float("nan")] * 3
    return {
        "concurrency": concurrency,
        "requests": len(lat) + sum(errors.values()),
        "rps": len(lat) / wall,
        "p50_ms": float(q[0]),
        "p95_ms": float(q[1]),
        "p99_ms": float(q[2]),
        "max_ms": float(ms.max()) if len(ms) else float("nan"),
        "errors": sum(errors.values()),
        "error_kinds": errors,
    }


WRK_SCRIPT = """
local bodies = {%s}
local i = 0
request = function()
  i = i + 1
  return wrk.format("POST", "/v1/recommend", {["Content-Type"] = "application/json"}, bodies[(i %% #bodies) + 1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('\\nRESULT {"requests": %%d, "duration_us": %%d, "errors": %%d, "non2xx": %%d, ' ..
    '"p50": %%d, "p95": %%d, "p99": %%d, "max": %%d}\\n', summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status, latency:percentile(50), latency:percentile(95),
    latency:percentile(99), latency.max))
end
"""


def run_level_wrk(url: str, bodies: list[dict], concurrency: int, seconds: float, tmp: Path) -> dict:
    """The same closed loop with wrk (one client thread, ``concurrency`` keep-alive connections);
    with the share of rank-cache hits among the measured requests (``None``: no cache counted)."""
    quoted = ",".join("[[" + json.dumps(b) + "]]" for b in bodies)
    script = tmp / "recommend.lua"
    script.write_text(WRK_SCRIPT % quoted)
    subprocess.run(["wrk", "-t1", f"-c{concurrency}", "-d2s", "-s", str(script), url], capture_output=True)  # warm
    before = rank_cache_counts(url)
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--timeout", "5s", "-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    after = rank_cache_counts(url)
    hits, misses = (a - b for a, b in zip(after, before, strict=True))
    r = json.loads(out.split("RESULT ", 1)[1])
    n_ok = r["requests"] - r["non2xx"]
    return {
        "concurrency": concurrency,
        "requests": r["requests"],
        "rps": n_ok / (r["duration_us"] / 1e6),
        "p50_ms": r["p50"] / 1000,
        "p95_ms": r["p95"] / 1000,
        "p99_ms": r["p99"] / 1000,
        "max_ms": r["max"] / 1000,
        "errors": r["errors"] + r["non2xx"],
        "error_kinds": {"socket": r["errors"], "non2xx": r["non2xx"]},
        "rank_cache_hit_share": hits / (hits + misses) if hits + misses else None,
    }


def rank_cache_counts(url: str) -> tuple[float, float]:
    """The service's rank-cache (hits, misses) so far, from ``/metrics`` (all workers pooled; zeros
    for a server without the counter)."""
    base = url.split("/v1/")[0]
    try:
        text = httpx.get(base + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return 0.0, 0.0
    found = dict.fromkeys(("hit", "miss"), 0.0)
    for line in text.splitlines():
        if line.startswith("behaviorlm_rank_cache_lookups_total{"):
            result = line.split('result="', 1)[1].split('"', 1)[0]
            found[result] += float(line.rsplit(" ", 1)[1])
    return found["hit"], found["miss"]


def request_bodies(model_dir: str, n: int, k: int, kind: str, seed: int) -> list[dict]:
    hist = pl.read_parquet(Path(model_dir) / "histories.parquet")
    users = hist["user_id"].unique().sort().to_list()
    rng = random.Random(seed)
    picked = [rng.choice(users) for _ in range(n)]
    if kind == "user":
        return [{"user_id": u, "k": k} for u in picked]
    if kind == "explain":
        return [{"user_id": u, "k": k, "explain": True} for u in picked]
    if kind == "unknown":  # the bad-input bound: 1,000 events of items the model never saw
        return [
            {
                "events": [
                    {"item_id": f"never-seen-{i}-{j}", "event_type": "view", "timestamp": 1.7e9 + j}
                    for j in range(1000)
                ],
                "k": k,
            }
            for i in range(20)
        ]
    by_user = {u: g for (u,), g in hist.filter(pl.col("user_id").is_in(picked)).group_by("user_id")}
    return [{"events": _events(by_user[u].sort("timestamp").tail(50)), "k": k} for u in picked]


def _events(df: pl.DataFrame) -> list[dict]:
    return [
        {"item_id": r["item_id"], "event_type": r["event_type"], "timestamp": r["timestamp"].timestamp()}
        for r in df.iter_rows(named=True)
    ]


def tree_rss_mb(proc: subprocess.Popen) -> float:
    """Resident memory of the server and its worker processes."""
    import psutil

    root = psutil.Process(proc.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 1e6


def reload_under_load(model: str, bodies: list[dict], seconds: float, tmp: Path, extra: list[str]) -> dict:
    """wrk at c=8 against a service following models:/behaviorlm@champion while the alias moves
    from version 1 to version 2 a third of the way in: failed requests and the swap time."""
    import mlflow

    from behaviorlm import tracking
    from behaviorlm.recommender import BehaviorLM

    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}")
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment("reload-bench")
    loaded = BehaviorLM.load(model, retrieval="exact")
    versions = []
    for _ in range(2):
        with mlflow.start_run():
            versions.append(
                tracking.log_model(loaded, model, registered_model_name="behaviorlm").registered_model_version
            )
    client = mlflow.MlflowClient()
    client.set_registered_model_alias("behaviorlm", "champion", versions[0])
    port = free_port()
    proc = start_server("models:/behaviorlm@champion", port, ["--reload-interval", "1", *extra], env)
    url = f"http://127.0.0.1:{port}"
    try:
        mover = threading.Timer(seconds / 3, client.set_registered_model_alias, ("behaviorlm", "champion", versions[1]))
        mover.start()
        res = run_level_wrk(url, bodies, 8, seconds, tmp)
        ready = httpx.get(url + "/ready").json()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"kind": "reload", **res, "swapped_to": ready["registry_version"], "reload": ready["reload"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="model directory (histories.parquet is read for user ids)")
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument(
        "--kinds",
        default="user,events,explain",
        help="user: known user_id; events: 50 raw events; explain: user_id + explain; unknown: 1,000 unknown items",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--python-client", action="store_true", help="use the httpx client even if wrk is installed")
    ap.add_argument("--serve-args", default="", help="extra `behaviorlm serve` flags, e.g. '--retrieval ann'")
    ap.add_argument("--name", default=None, help="report name (default: the model folder's)")
    ap.add_argument("--reload", action="store_true", help="also measure a hot reload under c=8 load")
    args = ap.parse_args()

    client = "wrk" if shutil.which("wrk") and not args.python_client else "httpx"
    print(f"client: {client}")
    port = free_port()
    extra = args.serve_args.split()
    t_start = time.perf_counter()
    proc = start_server(args.model, port, extra)
    ready_s = time.perf_counter() - t_start
    rss_ready = tree_rss_mb(proc)
    print(f"server ready in {ready_s:.1f} s, RSS {rss_ready:,.0f} MB ({args.serve_args or 'defaults'})")
    rows = []
    try:
        url = f"http://127.0.0.1:{port}"
        with tempfile.TemporaryDirectory() as tmp:
            for kind in args.kinds.split(","):
                bodies = request_bodies(args.model, 2000 if kind == "user" else 300, args.k, kind, args.seed)
                levels = [int(c) for c in args.levels.split(",")] if kind == "user" else [8]
                for c in levels:
                    if client == "wrk":
                        res = run_level_wrk(url, bodies, c, args.seconds, Path(tmp))
                    else:
                        res = asyncio.run(run_level(url, bodies, c, args.seconds))
                    rows.append({"kind": kind, **res})
                    print(_fmt(rows[-1]), flush=True)
        rss_end = tree_rss_mb(proc)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    if args.reload:
        with tempfile.TemporaryDirectory() as tmp:
            bodies = request_bodies(args.model, 2000, args.k, "user", args.seed)
            rows.append(reload_under_load(args.model, bodies, args.seconds, Path(tmp), extra))
            print(_fmt(rows[-1]), "swap", rows[-1]["reload"], flush=True)
    report = {
        "serve_args": args.serve_args,
        "server_ready_s": ready_s,
        "server_rss_mb": {"ready": rss_ready, "end": rss_end},
        "model": args.model,
        "k": args.k,
        "seconds_per_level": args.seconds,
        "client": client,
        "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "rows": rows,
        "targets": {"p99_ms": 20, "rps": 300, "errors": 0},
    }
    OUT.mkdir(exist_ok=True)
    m = Path(args.model)
    name = args.name or (m.parent.name if m.name == "model" else m.name)  # outputs/taobao/model -> taobao
    path = OUT / f"api_load_{name}.json"
    write_json(path, report)
    print(f"wrote {path}")


def _fmt(r: dict) -> str:
    return (
        f"{r['kind']:<8} c={r['concurrency']:<3} {r['requests']:>7} req  {r['rps']:>7.1f} req/s  "
        f"p50 {r['p50_ms']:6.2f}  p95 {r['p95_ms']:6.2f}  p99 {r['p99_ms']:6.2f}  max {r['max_ms']:7.2f} ms  "
        f"errors {r['errors']}"
        + (f"  rank-cache hits {r['rank_cache_hit_share']:.0%}" if r.get("rank_cache_hit_share") is not None else "")
    )


if __name__ == "__main__":
    main()
