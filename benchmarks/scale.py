"""Scale benchmark (issue 16): streaming prepare against the in-memory path on synthetic shops.

    python benchmarks/scale.py --size S [--size M] [--skip-in-memory]

Generates ``../shared/tools/synth_clickstream.py`` data into ``data/synth/<size>/`` (once), then
runs each path in its own process, sampling the wall time and the peak RSS of its process tree:

- ``prepare``: ``behaviorlm.sequence.prepare.prepare`` (per-file validation, user buckets, shards);
- ``in-memory``: read every file, ``validate_events``, ``ActionTokenizer.fit`` + ``encode``.

Synthetic data is for scale figures only, never quality. Writes ``benchmarks/out/scale_<sizes>.json``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from provenance import ROOT, write_json

OUT = Path(__file__).parent / "out"
SYNTH = ROOT.parent / "shared" / "tools" / "synth_clickstream.py"
SIZES = {"S": (30_000, 100_000), "M": (300_000, 1_000_000), "L": (3_000_000, 1_000_000)}

PREPARE = """
import sys
from behaviorlm.sequence.prepare import PrepareConfig, prepare
p = prepare(sys.argv[1], sys.argv[2], config=PrepareConfig(rows_per_shard=int(sys.argv[3])))
print("RESULT", p.report["rows_kept"], p.n_users, p.n_tokens, len(p.shards))
"""
IN_MEMORY = """
import sys
from pathlib import Path
import polars as pl
from behaviorlm.data.events import validate_events
from behaviorlm.sequence.tokenizer import ActionTokenizer
files = sorted(Path(sys.argv[1]).glob("events-*.parquet"))
ev = validate_events(pl.concat([pl.read_parquet(f) for f in files]))
enc = ActionTokenizer().fit(ev).encode(ev, truncate=False)
print("RESULT", len(ev), len(enc), int(enc.offsets[-1]), 1)
"""


def generate(size: str) -> Path:
    users, items = SIZES[size]
    folder = ROOT / "data" / "synth" / size
    if not (folder / "raw" / "MANIFEST.json").exists():
        shutil.rmtree(folder, ignore_errors=True)
        cmd = [sys.executable, str(SYNTH), "--out", str(folder / "raw"), "--users", str(users), "--items", str(items)]
        subprocess.run(cmd, check=True)
    return folder


def measure(cmd: list[str]) -> tuple[float, int, str]:
    """Run ``cmd``: wall seconds, the peak RSS of its whole process tree in bytes (sampled every
    50 ms, so worker processes count) and its stdout; raises with its stderr when it fails."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    stdout, stderr = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{cmd[:4]} failed:\n{stderr[-3000:]}")
    return time.perf_counter() - t0, peak, stdout


def timed(code: str, *args: str) -> dict[str, float]:
    """Run ``code`` in a fresh interpreter (see :func:`measure`) and parse what it printed."""
    wall, peak, stdout = measure([sys.executable, "-c", code, *args])
    result = next(line for line in stdout.splitlines() if line.startswith("RESULT")).split()[1:]
    rows, users, tokens, n_shards = (int(x) for x in result)
    return {
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(peak / 2**20),
        "rows": rows,
        "users": users,
        "tokens": tokens,
        "shards": n_shards,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", action="append", choices=list(SIZES), required=True)
    ap.add_argument("--rows-per-shard", type=int, default=2_000_000)
    ap.add_argument("--skip-in-memory", action="store_true", help="L does not fit in memory this way")
    args = ap.parse_args()
    rows = []
    for size in args.size:
        folder = generate(size)
        out = folder / "prepared"
        shutil.rmtree(out, ignore_errors=True)
        res = {
            "size": size,
            "path": "prepare",
            **timed(PREPARE, str(folder / "raw" / "events-*.parquet"), str(out), str(args.rows_per_shard)),
        }
        rows.append(res)
        print(res, flush=True)
        if not args.skip_in_memory:
            res = {"size": size, "path": "in-memory", **timed(IN_MEMORY, str(folder / "raw"))}
            rows.append(res)
            print(res, flush=True)
    print(f"\n{'size':<5} {'path':<10} {'events':>12} {'users':>10} {'wall s':>8} {'peak RSS MB':>12}")
    for r in rows:
        cells = f"{r['rows']:>12,} {r['users']:>10,} {r['wall_s']:>8} {r['peak_rss_mb']:>12,}"
        print(f"{r['size']:<5} {r['path']:<10} {cells}")
    write_json(OUT / f"scale_{'_'.join(args.size)}.json", {"rows_per_shard": args.rows_per_shard, "results": rows})


if __name__ == "__main__":
    main()
