"""Section 9 of RESULTS.md: the analyst notebooks top to bottom at their full budgets.

    python benchmarks/notebooks.py [--fast]

Executes each notebook in ``notebooks/`` with nbclient (``python3`` kernel) in a scratch data
folder, prints the wall time per notebook and writes ``benchmarks/out/notebooks.json``. The test
suite runs the same notebooks with ``BEHAVIORLM_NB_FAST=1`` (one epoch each); this script runs
the budgets an analyst gets.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from provenance import ROOT, write_json

OUT = Path(__file__).parent / "out"


def run_notebook(path: Path, scratch: Path, fast: bool) -> dict[str, object]:
    os.environ["BEHAVIORLM_NB_OUT"] = str(scratch / path.stem)
    os.environ["BEHAVIORLM_DATA_DIR"] = str(scratch / "data")
    os.environ.pop("BEHAVIORLM_NB_FAST", None)
    if fast:
        os.environ["BEHAVIORLM_NB_FAST"] = "1"
    book = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    NotebookClient(book, timeout=3600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    return {"notebook": path.name, "wall_s": round(time.perf_counter() - t0, 1), "errors": len(errors)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fast", action="store_true", help="the test suite's one-epoch budgets")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
            rows.append(run_notebook(path, Path(tmp), args.fast))
            print(f"{rows[-1]['notebook']:<32} {rows[-1]['wall_s']:>8.1f} s  errors {rows[-1]['errors']}", flush=True)
    write_json(OUT / "notebooks.json", {"fast": args.fast, "notebooks": rows})


if __name__ == "__main__":
    main()
