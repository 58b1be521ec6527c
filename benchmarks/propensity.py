"""Propensity benchmark: the pretrained transformer against LightGBM and the seeds' heuristic.

For each dataset:

* **temporal** conversion (and churn) propensity: rolling-origin split, the test window last in
  time; the transformer is pretrained only on events before the test cutoff. Every model is
  calibrated on held-out validation users; ROC-AUC, PR-AUC, Brier and ECE on test with
  bootstrap 95% intervals, and a paired bootstrap of transformer minus LightGBM (rich) AUC.
* **early prediction**: prefixes (10/25/50/75%) of the events before the first purchase,
  user-disjoint train/validation/test; the transformer is pretrained on train+validation users
  only. ROC-AUC per prefix length, as a table and a plot.

    python benchmarks/propensity.py --dataset taobao --dataset instacart --dataset rees46

Prints tables and writes ``benchmarks/out/propensity_<dataset>.json`` plus PNG figures.
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from provenance import write_json
from sklearn.linear_model import LogisticRegression

from behaviorlm import plots
from behaviorlm.data.datasets import load_dataset
from behaviorlm.data.events import ColumnMapping, Events, EventsError, validate_events
from behaviorlm.errors import ConfigurationError
from behaviorlm.inference.batch import set_threads
from behaviorlm.propensity import METHODS as ALL_METHODS
from behaviorlm.propensity import make_scorer
from behaviorlm.propensity.calibration import Calibrator, binary_metrics, paired_auc_difference, reliability_curve
from behaviorlm.propensity.labels import (
    ExampleSet,
    holdout_split,
    prefix_examples,
    propensity_split,
    sessionize,
    split_users,
)
from behaviorlm.recommender import BehaviorLM
from behaviorlm.segments.tiers import assign_tiers

OUT = Path(__file__).parent / "out"


@dataclass
class Setup:
    """Per-dataset protocol: horizons follow each dataset's time span."""

    horizon: str
    n_windows: int
    stride: str | None = None
    churn_horizon: str | None = None
    early_unit: str = "user"  # or "session"
    temporal: bool = True
    notes: list[str] = field(default_factory=list)


SETUPS = {
    "taobao": Setup("1d", 4, churn_horizon="1d"),
    "instacart": Setup(
        "7d", 6, churn_horizon=None, notes=["purchase-only data: conversion = places an order within 7 days"]
    ),
    "rees46": Setup(
        "20m", 3, stride="10m", early_unit="session", notes=["3-hour slice: temporal windows hold too few buyers"]
    ),
    "tmall": Setup("30d", 3, churn_horizon=None, notes=["61 users: intervals are very wide"]),
    "retailrocket": Setup("7d", 4, churn_horizon="7d", notes=["buyers' histories: every user buys at some point"]),
}
METHODS = tuple(m for m in ALL_METHODS if m != "auto")  # every scorer; auto picks among them


def pretrain(events: Events, args: argparse.Namespace, until: Any = None) -> tuple[BehaviorLM, float]:
    """Pretrain the language model on the given (leak-free) events only; ``until`` (the cutoff
    they end at) lets a gap head learn from each user's silence before it."""
    t0 = time.perf_counter()
    # The clickstream recipe with the overrides RESULTS.md sections 5-6 were measured with
    # (that run predates recipes: a 4x FFN, lr 1e-3, dropout 0.2, 2,048 negatives).
    lm = BehaviorLM(
        "clickstream-small",
        max_len=args.max_len,
        ffn_mult=4,
        lr=1e-3,
        dropout=0.2,
        epochs=args.pretrain_epochs,
        n_negatives=2048,
        patience=5,
        seed=args.seed,
        progress=False,
        max_time_s=args.pretrain_minutes * 60,
        value_buckets=args.value_buckets,
        gap_head=args.gap_head or None,
        n_time_buckets=args.time_buckets,
    ).fit(events, observed_until=until if args.gap_head else None)
    return lm, time.perf_counter() - t0


def fit_and_score(
    method: str, lm: BehaviorLM | None, items, train: ExampleSet, valid: ExampleSet, args, task: dict | None = None
) -> dict:
    """Fit a scorer, calibrate it on validation, return raw and calibrated test-ready pieces."""
    t0 = time.perf_counter()
    kw: dict[str, Any] = dict(task or {})
    if method in ("lightgbm", "lightgbm_seed", "lightgbm_rfm", "fusion"):
        kw["seed"] = args.seed
    if method in ("transformer", "joint", "multitask"):
        kw.update(seed=args.seed, epochs=args.ft_epochs, max_time_s=args.ft_minutes * 60)
    if method == "zero_shot":
        kw.update(n_samples=args.zero_shot_samples, seed=args.seed)
    scorer = make_scorer(method, lm, items, **kw).fit(train, valid)
    cal = Calibrator(args.calibration, args.seed).fit(scorer.decision_function(valid), valid.labels)
    return {"scorer": scorer, "calibrator": cal, "fit_s": time.perf_counter() - t0}


def blend(raws: dict[str, tuple[np.ndarray, np.ndarray]], y_valid: np.ndarray) -> np.ndarray:
    """Logistic regression on (LightGBM logit, transformer logit), fitted on validation users only."""
    lgb_v, lgb_t = (np.log(np.clip(r, 1e-6, 1 - 1e-6) / (1 - np.clip(r, 1e-6, 1 - 1e-6))) for r in raws["lightgbm"])
    tr_v, tr_t = raws["transformer"]
    stack = LogisticRegression(C=100.0).fit(np.c_[lgb_v, tr_v], y_valid)
    return stack.predict_proba(np.c_[lgb_t, tr_t])[:, 1]


def temporal(ds, target: str, setup: Setup, lm: BehaviorLM, args) -> dict:
    horizon = setup.horizon if target == "conversion" else setup.churn_horizon
    other = ("churn", setup.churn_horizon) if target == "conversion" else ("conversion", setup.horizon)
    aux = (other,) if other[1] and "multitask" in args.methods else ()
    split = propensity_split(
        ds.events, horizon, target=target, n_windows=setup.n_windows, stride=setup.stride, seed=args.seed, aux=aux
    )
    single_action = ds.events.actions == ["purchase"]
    methods = [m for m in args.methods if not (m == "zero_shot" and (target == "churn" or single_action))]
    methods = [m for m in methods if not (m == "next_gap" and target == "churn")]  # it scores a purchase, not silence
    methods = [m for m in methods if m != "multitask" or aux]
    return evaluate_split(f"{ds.name}_{target}", ds.items, split, target, horizon, lm, args, methods)


def evaluate_split(tag: str, items, split, target: str, horizon: str, lm, args, methods) -> dict:
    """Every method on one split: calibrated test metrics with CIs, paired differences, tiers."""
    y = split.test.labels
    # test users who never contributed a training example (the validation users): a user-disjoint view
    unseen = split.test.examples["user_id"].is_in(split.valid.examples["user_id"].unique().implode()).to_numpy()
    rows, preds, curves, raws = {}, {}, {}, {}
    task = {"target": target, "horizon": horizon}
    not_applicable = {}
    for method in methods:
        try:
            fitted = fit_and_score(method, lm, items, split.train, split.valid, args, task)
        except ConfigurationError as e:  # e.g. BTYD where some users have no purchase yet
            not_applicable[method] = e.message
            print(f"  {method}: not applicable: {e.message}")
            continue
        raw = fitted["scorer"].decision_function(split.test)
        raws[method] = (fitted["scorer"].decision_function(split.valid), raw)
        p = fitted["calibrator"].predict(raw)
        name = fitted["scorer"].name
        rows[name] = binary_metrics(y, p, n_boot=args.n_boot, seed=args.seed) | {
            "method": method,
            "calibration": fitted["calibrator"].method_,
            "fit_s": fitted["fit_s"],
        }
        if unseen.any() and not unseen.all():
            rows[name]["unseen_users"] = binary_metrics(y[unseen], p[unseen], n_boot=args.n_boot, seed=args.seed)
        if method in ("heuristic", "next_gap"):  # a zero-shot probability: how calibrated before any label?
            rows[name]["uncalibrated"] = binary_metrics(y, np.clip(raw, 0, 1), n_boot=0)
        rows[name]["tiers"] = tier_check(y, p)
        preds[method], curves[name] = p, reliability_curve(y, p)
    if "transformer" in raws and "lightgbm" in raws:
        name = "blend: LightGBM(rich) + transformer"
        p = blend(raws, split.valid.labels)
        rows[name] = binary_metrics(y, p, n_boot=args.n_boot, seed=args.seed) | {
            "method": "blend",
            "calibration": "logistic stack",
        }
        if unseen.any() and not unseen.all():
            rows[name]["unseen_users"] = binary_metrics(y[unseen], p[unseen], n_boot=args.n_boot, seed=args.seed)
        rows[name]["tiers"] = tier_check(y, p)
        preds["blend"], curves[name] = p, reliability_curve(y, p)
    out = {"split": split.info, "models": rows, "reliability": curves, "paired": paired(y, preds)}
    out["not_applicable"] = not_applicable
    suffix = f"_{args.tag}" if args.tag else ""
    np.savez_compressed(OUT / f"propensity_{tag}{suffix}_test_predictions.npz", y=y, **preds)  # for paired A/B later
    if "transformer" in preds and "lightgbm" in preds:
        out["transformer_minus_lightgbm_rich"] = paired_auc_difference(y, preds["transformer"], preds["lightgbm"])
    fig = OUT / f"propensity_{tag}_reliability.png"
    plots.reliability_diagram(curves, fig, f"{tag} (test)")
    out["figure"] = str(fig)
    return out


EARLY_METHODS = ("heuristic", "lightgbm_seed", "lightgbm", "transformer", "fusion", "joint")
SEQUENCE_METHODS = ("transformer", "fusion", "joint", "multitask", "blend", "zero_shot", "next_gap")


def paired(y: np.ndarray, preds: dict[str, np.ndarray]) -> dict[str, dict]:
    """Paired bootstrap ROC-AUC differences: each sequence-based model minus each anchor."""
    out = {}
    for mine in (m for m in SEQUENCE_METHODS if m in preds):
        for anchor in (a for a in ("lightgbm", "lightgbm_rfm", "bgnbd", "paretonbd") if a in preds):
            out[f"{mine} - {anchor}"] = paired_auc_difference(y, preds[mine], preds[anchor])
    return out


def tier_check(y: np.ndarray, p: np.ndarray) -> dict:
    """Observed positive rate per tier (5 equal-size tiers and the fixed 0/0.3/0.6/1 bins):
    tiers are useful only if the observed rate rises with the tier."""
    out = {}
    for kind, bins in (("quantile", "quantile"), ("fixed", [0.0, 0.3, 0.6, 1.0])):
        labels = [f"T{i + 1}" for i in range(5 if kind == "quantile" else 3)]
        tiers = assign_tiers(np.clip(p, 0, 1), bins, labels).to_numpy()
        rates = [
            (lab, int((tiers == lab).sum()), float(y[tiers == lab].mean())) for lab in labels if (tiers == lab).any()
        ]
        observed = [r for _, _, r in rates]
        out[kind] = {"tiers": rates, "ordered": bool(all(np.diff(observed) > 0))}
    return out


def early(ds, setup: Setup, args) -> dict:
    events = sessionize(ds.events) if setup.early_unit == "session" else ds.events
    ex = prefix_examples(events, negatives=args.negatives, seed=args.seed)
    train, valid, test = split_users(ex, seed=args.seed)
    seen_users = pl.concat([train.examples["user_id"], valid.examples["user_id"]]).unique()
    lm, pre_s = pretrain(
        events.derive(events.df.filter(pl.col("user_id").is_in(seen_users.implode())), "train users"), args
    )
    res: dict[str, Any] = {
        "unit": setup.early_unit,
        "info": ex.info,
        "negatives": ex.info["negatives"],
        "n_test_sequences": test.examples["user_id"].n_unique(),
        "test_positive_rate": float(test.examples.group_by("user_id").agg(pl.col("label").first())["label"].mean()),
        "pretrain_s": pre_s,
        "curves": {},
    }
    preds = {}
    for method in [m for m in args.methods if m in EARLY_METHODS]:
        fitted = fit_and_score(method, lm, ds.items, train, valid, args)
        name = fitted["scorer"].name
        curve: dict[str, list] = {"fractions": [], "roc_auc": [], "ci_low": [], "ci_high": [], "pr_auc": []}
        for f in ex.info["fractions"]:
            part = test.filter(pl.col("fraction") == f)
            p = fitted["calibrator"].predict(fitted["scorer"].decision_function(part))
            m = binary_metrics(part.labels, p, n_boot=args.n_boot, seed=args.seed)
            preds[(method, f)] = (part.labels, p)
            curve["fractions"].append(f)
            curve["roc_auc"].append(m["roc_auc"])
            curve["ci_low"].append(m["ci95"]["roc_auc"][0])
            curve["ci_high"].append(m["ci95"]["roc_auc"][1])
            curve["pr_auc"].append(m["pr_auc"])
        res["curves"][name] = curve
    if any(k[0] == "transformer" for k in preds) and any(k[0] == "lightgbm" for k in preds):
        res["transformer_minus_lightgbm_rich"] = {
            str(f): paired_auc_difference(
                preds[("transformer", f)][0], preds[("transformer", f)][1], preds[("lightgbm", f)][1]
            )
            for f in ex.info["fractions"]
        }
    suffix = f"_{args.tag}" if args.tag else ""
    flat = {f"{m}_{int(f * 100)}": p for (m, f), (_, p) in preds.items()}
    flat |= {f"y_{int(f * 100)}": y for (_, f), (y, _) in preds.items()}
    np.savez_compressed(OUT / f"propensity_{ds.name}_early{suffix}_test_predictions.npz", **flat)
    fig = OUT / f"propensity_{ds.name}_early.png"
    plots.early_prediction_curve(res["curves"], fig, f"{ds.name}: early purchase prediction ({setup.early_unit}s)")
    res["figure"] = str(fig)
    return res


def _fmt(m: dict, key: str) -> str:
    ci = m.get("ci95", {}).get(key)
    return f"{m[key]:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{m[key]:.3f}"


def print_temporal(name: str, target: str, r: dict) -> None:
    info = r["split"]
    print(f"\n## {name}: test cutoff {info['test_cutoff']}, horizon {info['horizon_s'] / 86400:g} days")
    rates = {k: round(v, 3) for k, v in info["positive_rate"].items()}
    print(f"train {info['n_train']} / valid {info['n_valid']} / test {info['n_test']} examples; positive rate {rates}")
    print("| model | ROC-AUC | PR-AUC | Brier | ECE | ECE floor (mean / p95) | tiers ordered (5 quantile / fixed) |")
    print("|---|---|---|---|---|---|---|")
    for model, m in r["models"].items():
        t = m["tiers"]
        print(
            f"| {model} | {_fmt(m, 'roc_auc')} | {_fmt(m, 'pr_auc')} | {_fmt(m, 'brier')} | {_fmt(m, 'ece')} "
            f"| {m['ece_floor']['mean']:.3f} / {m['ece_floor']['p95']:.3f} "
            f"| {'yes' if t['quantile']['ordered'] else 'no'} / {'yes' if t['fixed']['ordered'] else 'no'} |"
        )
    seen = [f"{model} {_fmt(m['unseen_users'], 'roc_auc')}" for model, m in r["models"].items() if "unseen_users" in m]
    if seen:
        print("ROC-AUC on test users never trained on (user-disjoint): " + "; ".join(seen))
    for pair, d in r.get("paired", {}).items():
        verdict = "significant" if d["significant"] else "inside the noise"
        print(f"{pair} ROC-AUC: {d['difference']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] ({verdict})")


def print_early(name: str, r: dict) -> None:
    print(
        f"\n## {name} - early prediction ({r['unit']}s, {r['negatives']} negatives; "
        f"{r['n_test_sequences']} test sequences, "
        f"positive rate {r['test_positive_rate']:.3f}; dropped {r['info']['dropped_sequences']})"
    )
    fr = next(iter(r["curves"].values()))["fractions"]
    print("| model | " + " | ".join(f"{int(f * 100)}%" for f in fr) + " |\n|---|" + "---|" * len(fr))
    for model, c in r["curves"].items():
        cells = [
            f"{a:.3f} [{lo:.3f}, {hi:.3f}]" for a, lo, hi in zip(c["roc_auc"], c["ci_low"], c["ci_high"], strict=True)
        ]
        print(f"| {model} | " + " | ".join(cells) + " |")


def event_only(ds):
    """The dataset as a product-analytics log: the item column dropped, the event name the token."""
    raw = ds.events.df.select("user_id", "event_type", "timestamp")
    events = validate_events(raw, ColumnMapping(item=None), duplicates="keep")  # same-second repeats stay events
    return replace(ds, name=f"{ds.name}-event-only", events=events, items=None)


def run_dataset(name: str, args) -> dict:
    ds, setup = load_dataset(name), SETUPS[name]
    if args.event_only:
        ds = event_only(ds)
    result: dict[str, Any] = {"dataset": ds.name, "notes": setup.notes, "temporal": {}}
    if setup.temporal and not args.skip_temporal:
        try:
            split = propensity_split(ds.events, setup.horizon, n_windows=setup.n_windows, stride=setup.stride)
            cutoff = pl.Series([split.info["test_cutoff"]]).str.to_datetime(time_zone="UTC").item()
            lm, pre_s = pretrain(
                ds.events.derive(ds.events.df.filter(pl.col("timestamp") < cutoff), "before test"), args, cutoff
            )
            result["pretrain_s"] = pre_s
            for target in ("conversion", "churn"):
                if target == "churn" and not setup.churn_horizon:
                    continue
                result["temporal"][target] = r = temporal(ds, target, setup, lm, args)
                print_temporal(name, target, r)
        except EventsError as e:
            result["temporal"] = {"not_applicable": str(e)}
            print(f"\n## {name} - temporal: not applicable: {e}")
    if not args.skip_early:
        try:
            result["early"] = early(ds, setup, args)
            print_early(name, result["early"])
        except EventsError as e:
            result["early"] = {"not_applicable": str(e)}
            print(f"\n## {name} - early prediction: not applicable: {e}")
    return result


CDNOW_CUTOFF = "1997-10-01"  # the classic calibration period: weeks 1-39 of 1997
CDNOW_TASKS = (  # (name, target, horizon): the classic holdout's three questions
    ("repeat purchase in the 39-week holdout", "conversion", "39w"),
    ("purchase within 13 weeks", "conversion", "13w"),
    ("churn: no purchase in the 39-week holdout", "churn", "39w"),
)
CDNOW_METHODS = (
    "lightgbm_rfm", "lightgbm", "bgnbd", "paretonbd", "transformer", "fusion", "joint", "multitask", "next_gap"
)  # fmt: skip
CDNOW_AUX = {"39w": (("conversion", "13w"),), "13w": (("conversion", "39w"),)}  # the other horizon


def run_cdnow(args) -> dict:
    """CDNOW: (a) the classic calibration/holdout protocol, users split three ways, and (b) the
    rolling-origin protocol for a 13-week horizon. The language model of each protocol is
    pretrained on events before its test cutoff only."""
    ds = load_dataset("cdnow")
    methods = [m for m in args.methods if m in CDNOW_METHODS] or list(CDNOW_METHODS)
    if not args.gap_head:
        methods = [m for m in methods if m != "next_gap"]
    result: dict[str, Any] = {"dataset": "cdnow", "holdout": {}, "rolling": {}}
    cutoff = pl.Series([CDNOW_CUTOFF]).str.to_datetime(time_zone="UTC").item()
    tasks = () if args.skip_holdout else CDNOW_TASKS
    if tasks:
        lm, result["pretrain_s_holdout"] = pretrain(
            ds.events.derive(ds.events.df.filter(pl.col("timestamp") < cutoff), "calibration period"), args, cutoff
        )
    for name, target, horizon in tasks:
        if args.skip_churn and target == "churn":
            continue
        split = holdout_split(ds.events, CDNOW_CUTOFF, horizon, target=target, seed=args.seed, aux=CDNOW_AUX[horizon])
        tag = f"cdnow_holdout_{target}_{horizon}"
        result["holdout"][name] = r = evaluate_split(tag, None, split, target, horizon, lm, args, methods)
        print_temporal(f"cdnow (holdout) {name}", target, r)
    if args.skip_rolling:
        return result
    split = propensity_split(ds.events, "13w", n_windows=4, stride="4w", seed=args.seed)
    t_test = pl.Series([split.info["test_cutoff"]]).str.to_datetime(time_zone="UTC").item()
    lm, result["pretrain_s_rolling"] = pretrain(
        ds.events.derive(ds.events.df.filter(pl.col("timestamp") < t_test), "before the test cutoff"), args, t_test
    )
    rolling = [m for m in methods if m != "multitask"]  # no second horizon fits before the data's end
    r = evaluate_split("cdnow_rolling_13w", None, split, "conversion", "13w", lm, args, rolling)
    result["rolling"]["purchase within 13 weeks"] = r
    print_temporal("cdnow (rolling origin) purchase within 13 weeks", "conversion", r)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", action="append", help="cdnow, taobao, instacart, rees46, tmall (repeatable)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--max-len", type=int, default=100)
    ap.add_argument("--pretrain-epochs", type=int, default=20)
    # time caps make results depend on machine load; generous defaults keep runs epoch-determined
    ap.add_argument("--pretrain-minutes", type=float, default=60.0)
    ap.add_argument("--ft-epochs", type=int, default=20)
    ap.add_argument("--ft-minutes", type=float, default=60.0)
    ap.add_argument("--calibration", default="auto")
    ap.add_argument("--value-buckets", type=int, default=0, help="amount/quantity tokens in the language model")
    ap.add_argument("--tag", default="", help="suffix of the output JSON (to keep A/B runs apart)")
    ap.add_argument("--zero-shot-samples", type=int, default=8)
    ap.add_argument("--gap-head", action="store_true", help="pretrain with a gap head (next_gap; fusion features)")
    ap.add_argument("--time-buckets", type=int, default=None, help="log2 gap buckets (27 reach two years)")
    ap.add_argument("--event-only", action="store_true", help="drop the item column: the event name is the token")
    ap.add_argument("--n-boot", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-temporal", action="store_true")
    ap.add_argument("--skip-early", action="store_true")
    ap.add_argument("--skip-rolling", action="store_true", help="cdnow: the calibration/holdout protocol only")
    ap.add_argument("--skip-churn", action="store_true", help="cdnow: churn mirrors the 39-week repeat target")
    ap.add_argument("--skip-holdout", action="store_true", help="cdnow: the rolling-origin protocol only")
    ap.add_argument(
        "--negatives", default="matched", help="early prediction: 'matched' (length-matched) or 'full' (leaks length)"
    )
    args = ap.parse_args()
    set_threads()
    OUT.mkdir(parents=True, exist_ok=True)
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    for name in args.dataset or ["cdnow", "taobao", "instacart", "rees46"]:
        t0 = time.perf_counter()
        res = (run_cdnow(args) if name == "cdnow" else run_dataset(name, args)) | {"env": env, "args": vars(args)}
        res["total_s"] = time.perf_counter() - t0
        part = "_early" if args.skip_temporal else "_temporal" if args.skip_early else ""
        path = OUT / f"propensity_{name}{part}{'_' + args.tag if args.tag else ''}.json"
        write_json(path, res)
        print(f"\n{name}: {res['total_s'] / 60:.1f} min; wrote {path}")


if __name__ == "__main__":
    main()
