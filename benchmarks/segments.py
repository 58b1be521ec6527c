"""Segmentation check: do the tiers mean what they say on the *next* day's behaviour?

Pretrain on events before the test cutoff, fit the propensity model (transformer, calibrated)
and a churn model on windows before it, score every user as of the cutoff, segment, and compare
each tier's mean propensity with the conversion actually observed in ``[T, T+H)``.

    python benchmarks/segments.py --dataset taobao

Prints the profile tables, writes ``benchmarks/out/segments_<dataset>/`` (Parquet + PNG) and a JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import timedelta
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).parent))
from propensity import SETUPS, pretrain  # noqa: E402  (the sibling benchmark script)
from provenance import write_json

from behaviorlm.data.datasets import load_dataset  # noqa: E402
from behaviorlm.inference.batch import set_threads  # noqa: E402
from behaviorlm.propensity import user_propensities  # noqa: E402
from behaviorlm.propensity.labels import parse_duration  # noqa: E402
from behaviorlm.segments import parse_bins, run_segmentation, segment_profiles  # noqa: E402

OUT = Path(__file__).parent / "out"
SHOW = ["segment", "size", "share", "mean_propensity", "observed_conversion", "mean_churn_propensity"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="taobao")
    ap.add_argument("--method", default="transformer")
    ap.add_argument("--bins", default="0,0.3,0.6,1")
    ap.add_argument("--max-len", type=int, default=100)
    ap.add_argument("--pretrain-epochs", type=int, default=20)
    ap.add_argument("--pretrain-minutes", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    set_threads()
    t0 = time.perf_counter()
    ds, setup = load_dataset(args.dataset), SETUPS[args.dataset]
    h = parse_duration(setup.horizon)
    end = ds.events.df["timestamp"].max()
    cutoff = end - h + timedelta(microseconds=1)
    before = ds.events.derive(ds.events.df.filter(pl.col("timestamp") < cutoff), "before cutoff")
    window = ds.events.derive(ds.events.df.filter(pl.col("timestamp") >= cutoff), "outcome window")
    lm, _ = pretrain(before, args)
    scores, _ = user_propensities(
        before, lm, ds.items, args.method, setup.horizon, setup.n_windows, at=cutoff, seed=args.seed
    )
    bins = parse_bins(args.bins)
    out_dir = OUT / f"segments_{args.dataset}"
    res = run_segmentation(lm, before, scores, out_dir, bins=bins, items=ds.items, seed=args.seed)
    report = {"dataset": args.dataset, "cutoff": str(cutoff), "horizon": setup.horizon, "k": res.clustering.k}
    report["silhouette"] = res.clustering.silhouette
    for by in ("tier", "cluster"):
        users = res.users.with_columns(pl.col(by).cast(pl.String))
        prof = segment_profiles(users, before, by, ds.items, outcome=window)
        print(
            f"\n## {args.dataset}: {by} profiles, observed conversion = purchase in "
            f"[{cutoff:%Y-%m-%d %H:%M}, +{setup.horizon})"
        )
        with pl.Config(tbl_rows=20, tbl_cols=12, fmt_str_lengths=40, tbl_hide_dataframe_shape=True):
            print(prof.select([c for c in SHOW if c in prof.columns]))
        report[by] = prof.to_dicts()
    report["figures"] = {k: str(v) for k, v in res.files.items()}
    report["n_users"] = res.users.height
    report["total_s"] = time.perf_counter() - t0
    write_json(OUT / f"segments_{args.dataset}.json", report)
    print(f"\nwrote {out_dir} and segments_{args.dataset}.json in {report['total_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
