"""History-only against request-time-aware on ML-1M, paired on the same test users.

    python benchmarks/time_context_ab.py [--history DIR] [--request DIR]

Loads the two models `make bench-ml1m` and `make bench-ml1m-time` saved, ranks every user's
leave-one-out test target with each (the request-time model asked at the target's own time, the
other without it), and prints both rows and their paired-bootstrap NDCG@10 / HR@10 / MRR
difference (:mod:`paired_models`). The two rows answer different questions -- the second model
knows *when* it is asked -- so the difference measures what the request time is worth, not which
model is better at one task. Writes ``benchmarks/out/time_context_ab.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from paired_models import compare
from provenance import write_json

OUT = Path(__file__).parent / "out"
MODELS = Path("data/models")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--history", type=Path, default=MODELS / "ml-1m-loo-v2")
    ap.add_argument("--request", type=Path, default=MODELS / "ml-1m-loo-tc-request-v2")
    ap.add_argument("--n-boot", type=int, default=1000)
    args = ap.parse_args(argv)
    result = compare({"history only": args.history, "request-time aware": args.request}, args.n_boot)
    result["command"] = "python benchmarks/time_context_ab.py " + " ".join(sys.argv[1:] if argv is None else argv)
    OUT.mkdir(exist_ok=True)
    write_json(OUT / "time_context_ab.json", result)
    return result


if __name__ == "__main__":
    main()
