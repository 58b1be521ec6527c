"""Incremental day vs full retrain (issue 16) on the real Taobao clickstream sample.

    python benchmarks/incremental.py [--epochs 25] [--warm-epochs 3] [--warm-lr 1e-3]

The daily pipeline's question: yesterday's model plus one new day of events, continued with
``fit_partial``, against a model retrained from scratch on everything. Protocol (leak-free, a
global time cut like ``temporal_split``):

- base model: trained on events before day D-1 (yesterday's model; its time is not counted);
- new day: every event of day D-1;
- warm start: ``base.fit_partial(day D-1)`` -- vocabulary grown, weights kept, each active
  user's remembered history followed by the new day, ``--warm-epochs`` at ``--warm-lr``;
- full retrain: the same recipe from scratch on all events before day D;
- test: each user's first event on day D, with every earlier event as input, ranked against
  the full catalog of items seen before day D, already-seen items kept (as in RESULTS 1b: on
  Taobao a next event is often a return to a seen item, and most others are items never seen
  before, which no model can rank).

Beside them: the base model without the new day, popularity and co-occurrence on the same
users; bootstrap CIs and the paired difference warm - retrain. Writes
``benchmarks/out/incremental.json``.
"""

from __future__ import annotations

import argparse
import time
from datetime import timedelta
from pathlib import Path

import polars as pl
from provenance import write_json

from behaviorlm.data.loading import load_events
from behaviorlm.evaluation import (
    CooccurrenceBaseline,
    PopularityBaseline,
    paired_difference,
    per_user_metrics,
    rank_targets,
    summarise,
    temporal_split,
)
from behaviorlm.recommender import BehaviorLM

OUT = Path(__file__).parent / "out"
K = 10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="taobao")
    ap.add_argument("--recipe", default="clickstream-small")
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--warm-epochs", type=int, default=3)
    ap.add_argument("--warm-lr", type=float, default=1e-3)
    args = ap.parse_args()
    ev = load_events(None, args.dataset, None, "raise", None).events
    last_day = ev.df["timestamp"].max().replace(hour=0, minute=0, second=0, microsecond=0)  # type: ignore[union-attr]
    day_start = last_day - timedelta(days=1)
    split = temporal_split(ev, test_start=last_day, val_start=day_start)
    before_test = ev.derive(ev.df.filter(pl.col("timestamp") < last_day), "events before the test day")
    new_day = ev.derive(
        ev.df.filter((pl.col("timestamp") >= day_start) & (pl.col("timestamp") < last_day)), "the new day"
    )
    catalog = before_test.df["item_id"].unique(maintain_order=True)
    test = split.test
    seen: dict = {}  # seen items are kept in the ranking
    print(f"base events {len(split.train):,}, new day {len(new_day):,}, test users {test.n_users:,}", flush=True)

    def fresh() -> BehaviorLM:
        return BehaviorLM(args.recipe, epochs=args.epochs, progress=False)

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    base = fresh().fit(split.train)
    timings["base (yesterday, not counted)"] = time.perf_counter() - t0
    rows = {"base, no update": _ranks(base, test, catalog, seen)}
    t0 = time.perf_counter()
    warm = base.fit_partial(new_day, epochs=args.warm_epochs, lr=args.warm_lr)
    timings["warm start"] = time.perf_counter() - t0
    rows["warm start (fit_partial)"] = _ranks(warm, test, catalog, seen)
    t0 = time.perf_counter()
    retrain = fresh().fit(before_test)
    timings["full retrain"] = time.perf_counter() - t0
    rows["full retrain"] = _ranks(retrain, test, catalog, seen)
    rows["popularity"] = _ranks(PopularityBaseline().fit(before_test, catalog), test, catalog, seen)
    rows["co-occurrence"] = _ranks(CooccurrenceBaseline().fit(before_test, catalog), test, catalog, seen)
    report = _report(rows, len(catalog), timings)
    write_json(OUT / "incremental.json", {"dataset": args.dataset, "args": vars(args), **report})


def _ranks(model, test, catalog, seen):
    return rank_targets(model, test, catalog, K, False, seen)


def _report(rows: dict, n_catalog: int, timings: dict[str, float]) -> dict:
    summary = {name: summarise(ur, K, n_catalog) for name, ur in rows.items()}
    print(f"\n{'model':<28} {'NDCG@10':>8} {'95% CI':>18} {'HR@10':>7}")
    for name, s in summary.items():
        lo, hi = s["ci95"][f"ndcg@{K}"]
        print(f"{name:<28} {s[f'ndcg@{K}']:>8.4f} [{lo:.4f}, {hi:.4f}] {s[f'hr@{K}']:>7.4f}")
    warm, full = (per_user_metrics(rows[n].ranks, K)[f"ndcg@{K}"] for n in ("warm start (fit_partial)", "full retrain"))
    diff = paired_difference(warm, full)
    share = timings["warm start"] / timings["full retrain"]
    print(f"\nwarm - retrain NDCG@10: {diff}")
    for name, sec in timings.items():
        print(f"{name:<32} {sec:7.1f} s")
    print(f"warm start / retrain time: {share:.1%}")
    return {"summary": summary, "warm_minus_retrain": diff, "timings_s": timings, "warm_time_share": share}


if __name__ == "__main__":
    main()
