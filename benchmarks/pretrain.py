"""Pretraining benchmark: leave-one-out, full-catalog ranking, model beside baselines.

    python benchmarks/pretrain.py --dataset ml-1m                                   # the ml-1m recipe
    python benchmarks/pretrain.py --dataset taobao --recipe clickstream-small --no-exclude-seen --max-minutes 8

Prints a table and writes ``benchmarks/out/pretrain_<dataset>.json`` with metrics, bootstrap
CIs, training curve, wall times and the hardware it ran on.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from provenance import write_json

from behaviorlm.data.datasets import data_dir, load_dataset
from behaviorlm.evaluation import comparison_lines, evaluate, leave_one_out, temporal_split
from behaviorlm.recommender import BehaviorLM

OUT = Path(__file__).parent / "out"


def hardware() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="ml-1m")
    ap.add_argument("--split", choices=["loo", "temporal"], default="loo")
    ap.add_argument("--recipe", default="ml-1m", help="training recipe; the flags below override it")
    for flag, kind in (("epochs", int), ("dim", int), ("layers", int), ("heads", int), ("ffn-mult", int)):
        ap.add_argument(f"--{flag}", type=kind, default=None, help="default: the recipe's")
    for flag, kind in (("max-len", int), ("batch-size", int), ("lr", float), ("dropout", float), ("patience", int)):
        ap.add_argument(f"--{flag}", type=kind, default=None, help="default: the recipe's")
    ap.add_argument("--loss", choices=["full", "sampled", "auto"], default=None, help="default: the recipe's")
    ap.add_argument("--n-negatives", type=int, default=None, help="with --loss sampled; default: the recipe's")
    ap.add_argument("--min-item-count", type=int, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--max-minutes", type=float, default=30.0)
    ap.add_argument("--no-exclude-seen", action="store_true", help="rank already-seen items too (repeat-heavy data)")
    ap.add_argument("--side-features", default="", help="item columns added to the item token, e.g. 'category'")
    ap.add_argument(
        "--shuffle-sides", action="store_true", help="control: permute the side-feature values across items (seeded)"
    )
    ap.add_argument("--copy-head", choices=["on", "off"], default=None, help="override the recipe's copy_head")
    ap.add_argument(
        "--time-context", choices=["history", "request"], default=None,
        help="'request': the model also reads the time from the last event to the target's (the request time)",
    )  # fmt: skip
    ap.add_argument("--positions", choices=["learned", "rope"], default=None, help="default: the recipe's")
    ap.add_argument("--ffn", choices=["gelu", "swiglu"], default=None, help="default: the recipe's")
    ap.add_argument("--tag", default="", help="suffix of the output JSON (to keep A/B runs apart)")
    ap.add_argument("--save", type=Path, default=None, help="model dir (default data/models/<dataset>-<split>)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)

    t0 = time.perf_counter()
    data = load_dataset(args.dataset)
    split = leave_one_out(data.events) if args.split == "loo" else temporal_split(data.events)
    exclude_seen = not args.no_exclude_seen
    model = BehaviorLM(
        args.recipe,
        epochs=args.epochs,
        dim=args.dim,
        n_layers=args.layers,
        n_heads=args.heads,
        ffn_mult=args.ffn_mult,
        max_len=args.max_len,
        batch_size=args.batch_size,
        lr=args.lr,
        dropout=args.dropout,
        patience=args.patience,
        loss=args.loss,
        n_negatives=args.n_negatives,
        min_item_count=args.min_item_count,
        seed=args.seed,
        progress=False,
        max_time_s=args.max_minutes * 60,
        side_features=tuple(c for c in args.side_features.split(",") if c),
        copy_head={"on": True, "off": False}.get(args.copy_head or "", None),
        time_context=args.time_context,
        positions=args.positions,
        ffn=args.ffn,
    )
    provenance = {"source": args.dataset, "holdout": args.split}
    items = data.items
    if args.shuffle_sides and items is not None:  # same values, unrelated to the items: must not help
        rng = np.random.default_rng(0)
        items = items.with_columns(pl.col(c).gather(rng.permutation(items.height)) for c in model.side_features or ())
    model.fit(split.train, split.valid, exclude_seen, items=items, training_data=provenance)
    report = evaluate(model, split, k=10, exclude_seen=exclude_seen)
    save_dir = args.save or data_dir() / "models" / f"{args.dataset}-{args.split}"
    model.save(save_dir)
    epochs = model.history_.epochs
    result = {
        "dataset": args.dataset,
        "command": "python benchmarks/pretrain.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": vars(args),
        "recipe": repr(model),
        "params": model.params,
        "hardware": hardware(),
        "data": {
            "events": len(data.events),
            "users": data.events.n_users,
            "items": data.events.n_items,
            "actions": data.events.actions,
        },
        "metrics": report.to_dict(),
        "train": {
            "wall_s": model.history_.train_time_s,
            "epochs_run": len(epochs),
            "best_epoch": model.history_.best_epoch,
            "seconds_per_epoch": sum(e["seconds"] for e in epochs) / len(epochs),
            "tokens_per_s": sum(e["tokens"] for e in epochs) / sum(e["seconds"] for e in epochs),
            "curve": epochs,
            "parameters": model.model_.num_parameters(),
        },
        "total_wall_s": time.perf_counter() - t0,
        "model_dir": str(save_dir),
    }
    print(
        f"\n{args.dataset} / {args.split} / exclude_seen={exclude_seen} / {report.protocol['users']} users, "
        f"catalog {report.protocol['catalog_size']}"
    )
    print(report.table())
    for line in comparison_lines(report):
        print(line)
    tr = result["train"]
    print(
        f"train {tr['wall_s'] / 60:.1f} min, {tr['epochs_run']} epochs (best {tr['best_epoch']}), "
        f"{tr['seconds_per_epoch']:.1f} s/epoch, {tr['tokens_per_s']:,.0f} tokens/s"
    )
    OUT.mkdir(exist_ok=True)
    path = OUT / f"pretrain_{args.dataset}_{args.split}{'_' + args.tag if args.tag else ''}.json"
    write_json(path, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
