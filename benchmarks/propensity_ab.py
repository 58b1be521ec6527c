"""Paired A/B of two propensity runs on the same test examples (e.g. with and without amount
tokens): ROC-AUC differences per method with paired bootstrap intervals.

    python benchmarks/propensity_ab.py --a vb8 --b vb0 --task cdnow_holdout_conversion_13w

Reads ``benchmarks/out/propensity_<task>_<tag>_test_predictions.npz`` written by
``benchmarks/propensity.py --tag``; prints a table and writes ``propensity_ab_<task>.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from provenance import write_json

from behaviorlm.propensity.calibration import paired_auc_difference

OUT = Path(__file__).parent / "out"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a", required=True, help="tag of run A")
    ap.add_argument("--b", required=True, help="tag of run B")
    ap.add_argument("--task", action="append", required=True, help="e.g. cdnow_holdout_conversion_13w (repeatable)")
    ap.add_argument("--n-boot", type=int, default=1000)
    args = ap.parse_args()
    result = {}
    for task in args.task:
        a = np.load(OUT / f"propensity_{task}_{args.a}_test_predictions.npz")
        b = np.load(OUT / f"propensity_{task}_{args.b}_test_predictions.npz")
        print(f"\n## {task}: {args.a} minus {args.b}, paired bootstrap ({args.n_boot} resamples)")
        print("| method | ROC-AUC difference | 95% CI | verdict |\n|---|---|---|---|")
        result[task] = {}
        for m in sorted(k for k in set(a.files) & set(b.files) if not k.startswith("y")):
            y_key = "y" if "y" in a.files else f"y_{m.rsplit('_', 1)[1]}"  # early prediction: one y per prefix
            if not np.array_equal(a[y_key], b[y_key]):
                raise SystemExit(f"{task}: the runs have different test examples; a paired comparison needs the same")
            d = paired_auc_difference(a[y_key], a[m], b[m], n_boot=args.n_boot)
            verdict = "significant" if d["significant"] else "inside the noise"
            print(f"| {m} | {d['difference']:+.4f} | [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] | {verdict} |")
            result[task][m] = d
    write_json(OUT / f"propensity_ab_{args.a}_vs_{args.b}.json", {"a": args.a, "b": args.b, "tasks": result})


if __name__ == "__main__":
    main()
