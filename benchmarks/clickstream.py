"""Clickstream quality: the model against the rules every shop already runs, on five real logs.

    python benchmarks/clickstream.py                                  # every dataset, clickstream-small@2
    python benchmarks/clickstream.py --dataset taobao --recipe clickstream-small@1 --tag v1

Protocol (benchmarks/RESULTS.md section 1b): leave-one-out, each user's last event is the
target, seen items kept, the full training catalog ranked (and, as a second figure, the
training catalog plus each user's own context items). Every baseline of
:mod:`behaviorlm.evaluation.baselines` stands beside the model; the headline compares the model
with the *best* of them per dataset, as a paired bootstrap CI over the same users. NDCG is also
split by repeat and new-item targets, so a gain shows where it comes from.

Prints one table per dataset and a summary, and writes ``benchmarks/out/clickstream[_TAG].json``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
from pretrain import hardware
from provenance import write_json

from behaviorlm.data.datasets import data_dir, load_dataset
from behaviorlm.evaluation import Holdout, comparison_lines, evaluate, leave_one_out
from behaviorlm.nn.training import peak_rss_mb
from behaviorlm.recommender import BehaviorLM

OUT = Path(__file__).parent / "out"
DATASETS = ("taobao", "rees46", "tmall", "retailrocket", "taobao31k")
#: safety caps on training time (minutes); no run here reaches them, so figures depend on epochs only
MINUTES = {"taobao": 20.0, "rees46": 10.0, "tmall": 10.0, "retailrocket": 20.0, "taobao31k": 40.0}
#: an epoch cap where early stopping alone would take too long on 2 cores (each Taobao-31k epoch
#: validates 31,882 users at three gate shifts: ~2 minutes); deterministic, unlike a time cap
EPOCHS = {"taobao31k": 8}
#: windows per batch where the recipe's 32 (sized for Taobao's ~100-event histories, ~3,200 tokens
#: a step) would starve the optimiser on short histories: Taobao-31k's median user has 10 events
BATCH = {"taobao31k": 256}
#: early stopping and the gate calibration read at most this many validation users (a seeded
#: sample; every test user is still evaluated): 31,882 users at four gate shifts per epoch
#: would cost more than the training itself
MAX_VALID_USERS = 5000
#: item side features where the data has them (RetailRocket and Taobao-31k ship no item table);
#: on REES46 they lift validation NDCG@10 from 0.365 to 0.388 (benchmarks/RESULTS.md section 20)
SIDES = {"taobao": ("category",), "rees46": ("category", "brand"), "tmall": ("category", "brand")}


def run_dataset(name: str, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    data = load_dataset(name)
    split = leave_one_out(data.events)
    valid = sample_users(split.valid, MAX_VALID_USERS, args.seed)
    overrides = {"copy_head": {"on": True, "off": False}.get(args.copy_head)}
    sides = () if args.no_side_features else SIDES.get(name, ())
    model = BehaviorLM(
        args.recipe,
        progress=False,
        seed=args.seed,
        epochs=args.epochs or EPOCHS.get(name),
        batch_size=BATCH.get(name),
        side_features=sides,
        max_time_s=(args.max_minutes or MINUTES.get(name, 10.0)) * 60,
        **{k: v for k, v in overrides.items() if v is not None},
    )
    items = data.items if sides else None
    provenance = {"source": name, "holdout": "loo"}
    model.fit(split.train, valid, exclude_seen=False, items=items, training_data=provenance)
    report = evaluate(model, split, k=10, exclude_seen=False)
    model.save(data_dir() / "models" / f"clickstream-{name}{'-' + args.tag if args.tag else ''}")
    epochs = model.history_.epochs
    print(
        f"\n{name}: {report.protocol['users']} users, catalog {report.protocol['catalog_size']:,}, "
        f"{report.protocol['repeat_targets']} repeat targets, {report.protocol['unrankable_targets']} targets "
        f"outside the training catalog ({report.protocol['unrankable_targets_with_context']} outside it and the "
        f"user's context)"
    )
    print(report.table())
    print("\n".join(comparison_lines(report)))
    return {
        "dataset": name,
        "recipe": repr(model),
        "params": model.params,
        "data": {"events": len(data.events), "users": data.events.n_users, "items": data.events.n_items},
        "metrics": report.to_dict(),
        "best_baseline": best_baseline(report.to_dict()),
        "train": {
            "wall_s": model.history_.train_time_s,
            "epochs_run": len(epochs),
            "best_epoch": model.history_.best_epoch,
            "best_validation_ndcg": model.history_.best_score,
            "seconds_per_epoch": sum(e["seconds"] for e in epochs) / max(len(epochs), 1),
        },
        "wall_s": time.perf_counter() - t0,
    }


def sample_users(ho: Holdout, n: int, seed: int) -> Holdout:
    """At most ``n`` of a holdout's users (a seeded sample), with their inputs."""
    if ho.n_users <= n:
        return ho
    users = ho.targets["user_id"].sample(n, seed=seed).implode()
    inputs = ho.inputs.derive(ho.inputs.df.filter(pl.col("user_id").is_in(users)), f"{n} sampled validation users")
    return Holdout(inputs, ho.targets.filter(pl.col("user_id").is_in(users)))


def best_baseline(metrics: dict[str, Any], key: str = "ndcg@10") -> dict[str, Any]:
    """The strongest baseline by NDCG@10, and the model's paired difference to it, for each
    ranking (training catalog; with context items)."""
    out: dict[str, Any] = {}
    scored = {n: m for n, m in metrics["baselines"].items() if key in m}
    for ranking in ("training_catalog", "with_context_items"):

        def value(m: dict[str, Any], r: str = ranking) -> float:
            return m[key] if r == "training_catalog" else m.get("with_context_items", {}).get(key, float("nan"))

        name = max(scored, key=lambda n: value(scored[n]))
        paired = metrics["paired_vs_baselines"][name]
        paired = paired if ranking == "training_catalog" else paired.get("with_context_items", {})
        model = value(metrics)
        out[ranking] = {
            "baseline": name,
            "baseline_ndcg": value(scored[name]),
            "model_ndcg": model,
            "relative": model / value(scored[name]) - 1.0,
            **paired,
        }
    return out


def summary_lines(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        f"{'data':<13}{'users':>7}  {'ranking':<19}{'best baseline':<22}{'model':>8}{'rel':>8}  paired diff [95% CI]",
    ]
    for r in results:
        for ranking, b in r["best_baseline"].items():
            verdict = "significant" if b.get("significant") else "noise"
            base = f"{b['baseline']} {b['baseline_ndcg']:.4f}"
            lines.append(
                f"{r['dataset']:<13}{r['metrics']['protocol']['users']:>7}  {ranking:<19}"
                f"{base:<22}{b['model_ndcg']:>8.4f}{b['relative']:>+8.1%}  "
                f"{b['diff']:+.4f} [{b['ci95'][0]:+.4f}, {b['ci95'][1]:+.4f}] {verdict}"
            )
    return lines


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", action="append", choices=DATASETS, help="repeatable; default: all five")
    ap.add_argument("--recipe", default="clickstream-small@2")
    ap.add_argument("--copy-head", choices=["on", "off"], default=None, help="override the recipe's copy_head")
    ap.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--max-minutes", type=float, default=None, help="training cap per dataset (default: MINUTES)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--no-side-features", action="store_true", help="ignore item tables (SIDES)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    t0 = time.perf_counter()
    results = [run_dataset(name, args) for name in args.dataset or DATASETS]
    print("\nsummary: model NDCG@10 against the best baseline per dataset (leave-one-out, seen items kept)")
    print("\n".join(summary_lines(results)))
    OUT.mkdir(exist_ok=True)
    path = OUT / f"clickstream{'_' + args.tag if args.tag else ''}.json"
    write_json(
        path,
        {
            "command": "python benchmarks/clickstream.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "hardware": hardware(),
            "results": results,
            "wall_s": time.perf_counter() - t0,
            "peak_rss_mb": peak_rss_mb(),
        },
    )
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
