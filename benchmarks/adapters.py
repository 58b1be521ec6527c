"""LoRA adapters per segment against the honest alternatives, on the purchase protocol.

    python benchmarks/adapters.py                      # RetailRocket, three activity tiers

For each segment (the users' training-event count in tertiles: light / medium / heavy -- the
frequency tier an RFM segmentation would give; RetailRocket ships no market or segment
column), four models are compared on the segment's test purchases (NDCG@10 of
``P(item | purchase)``, seen items kept, bootstrap CIs) and its next events:

* ``base``: the pretrained model (benchmarks/finetune.py's, shared by every segment);
* ``base + segment token``: a model pretrained from scratch with the segment as an input
  event before each user's history (the alternative that needs no adapter machinery);
* ``adapter``: a rank-8 LoRA on the base, trained on the segment's training events with the
  pretraining objective, base frozen;
* ``full copy``: every weight of a copy of the base trained on the same events, same epochs.

Also: adapter size against the model (parameters, bytes on disk), training time, and serving
latency of ``recommend`` for known users with and without the adapter, interleaved.
Prints the table and writes ``benchmarks/out/adapters[_TAG].json``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl
from clickstream import MAX_VALID_USERS, sample_users
from finetune import pretrained
from pretrain import hardware
from provenance import write_json

from behaviorlm.data.datasets import load_dataset
from behaviorlm.evaluation import bootstrap_ci, per_user_metrics, rank_targets
from behaviorlm.evaluation.metrics import ContextCatalog
from behaviorlm.evaluation.purchase import ActionScorer, next_event_holdout
from behaviorlm.evaluation.splits import Holdout, purchase_split
from behaviorlm.inference.engine import InferenceEngine
from behaviorlm.nn.training import TrainConfig, peak_rss_mb, train
from behaviorlm.recommender import BehaviorLM

OUT = Path(__file__).parent / "out"
TIERS = ("light", "medium", "heavy")


def tiers(train_df: pl.DataFrame) -> pl.DataFrame:
    """``user_id, tier``: tertiles of each user's number of training events."""
    n = train_df.group_by("user_id").len()
    lo, hi = n["len"].quantile(1 / 3), n["len"].quantile(2 / 3)
    tier = pl.when(pl.col("len") <= lo).then(pl.lit("light")).when(pl.col("len") <= hi).then(pl.lit("medium"))
    return n.select("user_id", tier.otherwise(pl.lit("heavy")).alias("tier"))


def with_segment_token(df: pl.DataFrame, seg: pl.DataFrame) -> pl.DataFrame:
    """Each user's events after one ``segment`` event naming their tier, a second before the first."""
    df = df.with_columns(pl.col("item_id").cast(pl.String))
    first = df.group_by("user_id").agg(pl.col("timestamp").min()).join(seg, on="user_id")
    token = first.select(
        "user_id",
        ("segment=" + pl.col("tier")).alias("item_id"),
        pl.lit("interaction").alias("event_type"),  # a canonical action the model has no other use of
        (pl.col("timestamp") - pl.duration(seconds=1)).alias("timestamp"),
    )
    return pl.concat([token, df]).sort("user_id", "timestamp")


def only(ho: Holdout, users: pl.Series) -> Holdout:
    keep = pl.col("user_id").is_in(users.implode())
    return Holdout(ho.inputs.derive(ho.inputs.df.filter(keep), "segment"), ho.targets.filter(keep))


def ndcg(model: Any, ho: Holdout, catalog: pl.Series, action: str | None = "purchase") -> dict[str, Any]:
    scorer = ActionScorer(model, action) if action else model
    ranks = rank_targets(scorer, ho, ContextCatalog.of(catalog, ho.inputs) if not action else catalog, 10, False).ranks
    v = per_user_metrics(ranks, 10)["ndcg@10"]
    return {"ndcg@10": float(v.mean()), "ci95": list(bootstrap_ci(v, 1000)), "users": len(v)}


def full_copy(base: BehaviorLM, events, epochs: int, lr: float) -> BehaviorLM:
    """Every weight of a copy of ``base`` trained on ``events`` with the pretraining objective."""
    other = copy.deepcopy(base)
    fixed = {"epochs": epochs, "lr": lr, "max_time_s": None, "max_steps": None, "progress": False}
    cfg = TrainConfig(**{**{k: base.params[k] for k in TrainConfig.__dataclass_fields__}, **fixed})
    t0 = time.perf_counter()
    train(other.model_, other.tokenizer_.encode(events, truncate=False), cfg)
    other.engine_ = InferenceEngine(other.model_, other.tokenizer_, "full-copy")  # same vocabulary, new weights
    other.full_copy_seconds_ = time.perf_counter() - t0
    return other


def latency(model: BehaviorLM, users: list[Any], adapter: str, rounds: int) -> dict[str, Any]:
    """Median seconds of ``recommend`` for ``users`` with and without the adapter, alternated."""
    times: dict[str, list[float]] = {"base": [], "adapter": []}
    model.recommend(users[:8], k=10, adapter=adapter)  # the merge happens once, before timing
    for r in range(rounds):
        for which in ("base", "adapter") if r % 2 == 0 else ("adapter", "base"):
            t0 = time.perf_counter()
            model.recommend(users, k=10, adapter=adapter if which == "adapter" else None)
            times[which].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {**{f"{k}_s": v for k, v in med.items()}, "ratio": med["adapter"] / med["base"], "rounds": rounds}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="retailrocket")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--latency-only", action="store_true", help="fit the heavy tier's adapter and time serving only")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    t0 = time.perf_counter()
    data = load_dataset(args.dataset)
    split = purchase_split(data.events)
    nxt = next_event_holdout(data.events, split)
    valid = sample_users(split.valid, MAX_VALID_USERS, args.seed)
    base = pretrained(args.dataset, data, split, valid, args)
    catalog = split.train.df["item_id"].unique(maintain_order=True)
    seg = tiers(split.train.df)
    if args.latency_only:
        return latency_run(base, split, seg, args)
    token_model = segment_token_model(data, seg, args)
    rows: dict[str, Any] = {}
    for tier in TIERS:
        users = seg.filter(pl.col("tier") == tier)["user_id"]
        events = split.train.derive(split.train.df.filter(pl.col("user_id").is_in(users.implode())), tier)
        t1 = time.perf_counter()
        base.fit_adapter(events, f"tier={tier}", rank=args.rank, epochs=args.epochs, lr=args.lr)
        adapter_s = time.perf_counter() - t1
        adapted = base.with_adapter(f"tier={tier}")
        full = full_copy(base, events, args.epochs, base.params["lr"])
        test, follow = only(split.test, users), only(nxt, users)
        tok_test, tok_follow = token_views(token_model, test, follow, seg)
        tok_catalog = catalog.cast(pl.String)
        models = {
            "base": (base, test, follow, catalog),
            "segment_token": (token_model, tok_test, tok_follow, tok_catalog),
            "adapter": (adapted, test, follow, catalog),
            "full_copy": (full, test, follow, catalog),
        }
        rows[tier] = {
            "users": int(len(users)),
            "train_events": len(events),
            "purchase": {k: ndcg(m, t, c) for k, (m, t, _, c) in models.items()},
            "next_event": {k: ndcg(m, f, c, None) for k, (m, _, f, c) in models.items()},
            "train_s": {"adapter": adapter_s, "full_copy": full.full_copy_seconds_},
        }
    size = adapter_size(base)
    known = base.histories_["user_id"].unique().sort().head(256).to_list()
    lat = latency(base, known, "tier=heavy", args.rounds)
    print_table(rows, size, lat)
    OUT.mkdir(exist_ok=True)
    path = OUT / f"adapters{'_' + args.tag if args.tag else ''}.json"
    write_json(path, {
        "command": "python benchmarks/adapters.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "hardware": hardware(), "segments": rows, "size": size, "latency": lat,
        "wall_s": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(),
    })  # fmt: skip
    print(f"wrote {path}")
    return rows


def latency_run(base: BehaviorLM, split, seg: pl.DataFrame, args: argparse.Namespace) -> dict[str, Any]:
    """The serving comparison alone (on a quiet machine): one adapter, alternated rounds."""
    users = seg.filter(pl.col("tier") == "heavy")["user_id"]
    base.fit_adapter(split.train.derive(split.train.df.filter(pl.col("user_id").is_in(users.implode())), "heavy"),
                     "tier=heavy", rank=args.rank, epochs=args.epochs, lr=args.lr)  # fmt: skip
    known = base.histories_["user_id"].unique().sort().head(256).to_list()
    lat = latency(base, known, "tier=heavy", args.rounds)
    print(f"recommend for 256 known users: {lat['base_s'] * 1e3:.1f} ms without, {lat['adapter_s'] * 1e3:.1f} ms "
          f"with the adapter (x{lat['ratio']:.3f}, medians of {lat['rounds']} alternated rounds)")  # fmt: skip
    OUT.mkdir(exist_ok=True)
    write_json(
        OUT / f"adapters_latency{'_' + args.tag if args.tag else ''}.json", {"latency": lat, "hardware": hardware()}
    )
    return lat


def segment_token_model(data, seg: pl.DataFrame, args: argparse.Namespace) -> BehaviorLM:
    """The alternative: pretrained from scratch with each user's segment as a first input event."""
    events = with_segment_token(data.events.df.select("user_id", "item_id", "event_type", "timestamp"), seg)
    tok_split = purchase_split(events)
    model = BehaviorLM("clickstream-small@2", progress=False, seed=args.seed)
    valid = sample_users(tok_split.valid, MAX_VALID_USERS, args.seed)
    return model.fit(tok_split.train, valid, exclude_seen=False)


def token_views(model: BehaviorLM, test: Holdout, follow: Holdout, seg: pl.DataFrame) -> tuple[Holdout, Holdout]:
    """The same holdouts with the segment event before each user's inputs (ids as the token model reads them)."""
    out = []
    for ho in (test, follow):
        df = with_segment_token(ho.inputs.df.select("user_id", "item_id", "event_type", "timestamp"), seg)
        targets = ho.targets.with_columns(pl.col("item_id").cast(pl.String))
        out.append(Holdout(model.validate_input(df), targets))
    return out[0], out[1]


def adapter_size(model: BehaviorLM) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        model.save(Path(d) / "m")
        adapter_bytes = sum(f.stat().st_size for f in (Path(d) / "m" / "adapters" / "tier=heavy").iterdir())
        weights_bytes = (Path(d) / "m" / "weights.pt").stat().st_size
    meta = model.adapters_["tier=heavy"].meta
    return {"adapter_parameters": meta["parameters"], "model_parameters": meta["base_parameters"],
            "adapter_bytes": adapter_bytes, "weights_bytes": weights_bytes}  # fmt: skip


def print_table(rows: dict[str, Any], size: dict[str, Any], lat: dict[str, Any]) -> None:
    print("\npurchase NDCG@10 per segment (next-event NDCG@10 in brackets)")
    kinds = ("base", "segment_token", "adapter", "full_copy")
    print(f"  {'segment':<10}{'users':>6}  " + "".join(f"{k:>24}" for k in kinds) + f"{'adapter s':>11}{'copy s':>9}")
    for tier, r in rows.items():
        cells = "".join(f"{r['purchase'][k]['ndcg@10']:>14.4f} ({r['next_event'][k]['ndcg@10']:.4f})" for k in kinds)
        print(f"  {tier:<10}{r['users']:>6}  {cells}{r['train_s']['adapter']:>11.1f}{r['train_s']['full_copy']:>9.1f}")
    print(f"adapter: {size['adapter_parameters']:,} parameters ({size['adapter_bytes']:,} bytes) against the model's "
          f"{size['model_parameters']:,} ({size['weights_bytes']:,} bytes)")  # fmt: skip
    print(f"recommend for 256 known users: {lat['base_s'] * 1e3:.1f} ms without, {lat['adapter_s'] * 1e3:.1f} ms "
          f"with the adapter (x{lat['ratio']:.3f}, medians of {lat['rounds']} alternated rounds)")  # fmt: skip


if __name__ == "__main__":
    main()
