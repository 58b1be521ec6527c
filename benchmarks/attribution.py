"""Faithfulness of event attributions (issue 28): delete the events an attribution ranks highest
and see how far the recommended item falls, against deleting random or the most recent events.

    python benchmarks/attribution.py                          # Taobao sample, clickstream-quick trained here
    python benchmarks/attribution.py --model DIR --users 300  # an existing model of the same data

For each sampled user (leave-one-out test inputs: every event but the held-out last one) the
model's top-1 item is explained by occlusion (``behaviorlm.explain.attribution.occlusion``); then
for k = 1, 3, 5 the k events with the largest contribution, k random events (seeded) and the k
most recent events are deleted -- and, for a repeat-aware model, the k events the copy path
weighs most -- and the item is re-scored over the full catalog: its log-probability drop and
its rank after deletion (rank 1 before, checked). Paired bootstrap CIs over users for the
difference "attributed minus random". Prints a table; writes
``benchmarks/out/attribution_<dataset>_<keep|exclude>_seen.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from provenance import write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
KS = (1, 3, 5)


def model_and_inputs(args: argparse.Namespace):
    from behaviorlm.data.loading import load_events
    from behaviorlm.evaluation import leave_one_out
    from behaviorlm.recommender import BehaviorLM

    if args.model:
        model = BehaviorLM.load(args.model, retrieval="exact")
        ev = load_events(None, args.dataset, model.input_schema_).events
        split = leave_one_out(ev)
    else:
        ev = load_events(None, args.dataset).events
        split = leave_one_out(ev)
        model = BehaviorLM(args.recipe, progress=False).fit(
            split.train, validation=split.valid, exclude_seen=not args.keep_seen
        )
    return model, split.test.inputs


def strategies(
    att: pl.DataFrame, grad: pl.DataFrame, rng: np.random.Generator, repeat_aware: bool
) -> dict[str, list[int]]:
    """For one (user, item): event indices in deletion order, per strategy (window events only)."""
    window = att.filter(pl.col("contribution") != 0.0) if att["contribution"].abs().sum() else att
    in_window = grad.filter(pl.col("event_index").is_in(window["event_index"].implode()))
    order = {
        "attributed": window.sort("contribution", descending=True)["event_index"].to_list(),
        "gradient": in_window.sort("contribution", descending=True)["event_index"].to_list(),
        "random": rng.permutation(window["event_index"].to_numpy()).tolist(),
        "recent": window.sort("event_index", descending=True)["event_index"].to_list(),
    }
    if repeat_aware:
        order["copy_attention"] = window.sort("copy_weight", descending=True, nulls_last=True)["event_index"].to_list()
    return order


def deletion_ranks(model, inputs: pl.DataFrame, plans: list[tuple], batch: int = 128) -> list[tuple]:
    """Score every (user, item, strategy, k, deleted indices) variant at once: (logp, rank); the
    rank among the items the model may recommend to that user (its seen items left out when the
    model excludes them, as the recommendation did)."""
    from behaviorlm.data.events import Events

    rows = []
    for v, (user, _item, _s, _k, deleted) in enumerate(plans):
        mine = inputs.filter(pl.col("user_id") == user).with_row_index("__i")
        rows.append(mine.filter(~pl.col("__i").is_in(deleted)).drop("__i").with_columns(pl.lit(v).alias("user_id")))
    frame = pl.concat(rows)
    enc = model.engine.encode(Events.trusted(frame, "deletion variants"))
    cols = model.tokenizer_.item_index(pl.Series([p[1] for p in plans]))
    seen = {}
    if model.exclude_seen_:
        for (user,), g in inputs.group_by("user_id"):
            idx = model.tokenizer_.item_index(g["item_id"].unique())
            seen[user] = idx[idx >= 0]
    out = [None] * len(plans)
    for start in range(0, len(enc), batch):
        sl = slice(start, min(start + batch, len(enc)))
        h, a = model.engine.heads(enc, sl)
        logp = model.engine.item_logp(h, a).numpy()
        for r in range(logp.shape[0]):
            v = enc.user_ids[start + r]
            target = logp[r, cols[v]]
            if model.exclude_seen_:
                logp[r, seen[plans[v][0]]] = -np.inf
            out[v] = (float(target), int((logp[r] > target).sum()) + 1)
    return out


def paired_ci(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    d = a - b
    idx = np.random.default_rng(seed).integers(0, len(d), (n_boot, len(d)))
    means = d[idx].mean(1)
    return float(d.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="taobao")
    ap.add_argument("--recipe", default="clickstream-quick")
    ap.add_argument("--model", help="a model of --dataset trained on its leave-one-out train part")
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument(
        "--exclude-seen", dest="keep_seen", action="store_false", help="default: seen items kept (as the demo)"
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from scipy.stats import spearmanr

    from behaviorlm.explain.attribution import integrated_gradients, occlusion

    t0 = time.perf_counter()
    model, inputs = model_and_inputs(args)
    fit_s = time.perf_counter() - t0
    inputs = inputs.df.sort("user_id", "timestamp", maintain_order=True)
    counts = inputs.group_by("user_id").len().filter(pl.col("len") >= 6).sort("user_id")
    rng = np.random.default_rng(args.seed)
    users = counts["user_id"].to_numpy()[rng.permutation(counts.height)[: args.users]].tolist()
    recs = model.recommend(users, events=inputs, k=1, exclude_seen=model.exclude_seen_).select("user_id", "item_id")
    t1 = time.perf_counter()
    att = occlusion(model, recs, inputs.filter(pl.col("user_id").is_in(users)))
    att_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    grad = integrated_gradients(model, recs, inputs.filter(pl.col("user_id").is_in(users)), steps=32)
    grad_s = time.perf_counter() - t2
    repeat_aware = model.model_.copy_head is not None
    plans, rhos = [], []
    for (user, item), rows in att.events.group_by("user_id", "item_id", maintain_order=True):
        g = grad.events.filter((pl.col("user_id") == user) & (pl.col("item_id") == item))
        both = rows.join(g.select("event_index", pl.col("contribution").alias("g")), on="event_index")
        both = both.filter(pl.col("contribution") != 0.0)
        if both.height >= 3:
            rhos.append(spearmanr(both["contribution"], both["g"]).statistic)
        for name, order in strategies(rows, g, rng, repeat_aware).items():
            for k in KS:
                plans.append((user, item, name, k, order[:k]))
        plans.append((user, item, "none", 0, []))  # the check: rank 1 before any deletion
    scored = deletion_ranks(model, inputs, plans)
    full = dict(zip(att.totals["user_id"].to_list(), att.totals["score"].to_list(), strict=True))
    table = pl.DataFrame(
        [
            {"user_id": u, "strategy": s, "k": k, "drop": full[u] - lp, "rank": rk}
            for (u, _i, s, k, _d), (lp, rk) in zip(plans, scored, strict=True)
        ]
    )
    before = table.filter(pl.col("strategy") == "none")
    assert (before["rank"] == 1).all() and before["drop"].abs().max() < 1e-4, "scoring differs from recommend()"
    table = table.filter(pl.col("strategy") != "none")
    result = {
        "users": len(users),
        "keep_seen": not model.exclude_seen_,
        "fit_s": fit_s,
        "attribution_s": att_s,
        "users_per_s": len(users) / att_s,
        "gradient_users_per_s": len(users) / grad_s,
        "spearman_gradient_vs_occlusion": {
            "median": float(np.nanmedian(rhos)),
            "quartiles": [float(np.nanquantile(rhos, 0.25)), float(np.nanquantile(rhos, 0.75))],
        },
        "rows": [],
    }
    q1, q2, q3 = (float(np.nanquantile(rhos, q)) for q in (0.25, 0.5, 0.75))
    print(f"{args.dataset}: {len(users)} users, top-1 item, occlusion {len(users) / att_s:.1f} users/s, "
          f"gradient {len(users) / grad_s:.1f} users/s; Spearman gradient vs occlusion over window events: "
          f"median {q2:.2f} [IQR {q1:.2f}, {q3:.2f}]")  # fmt: skip
    print(f"{'strategy':<15}{'k':>3}{'score drop (nats)':>20}{'median rank after':>20}{'mean log10 rank':>18}")
    for (name, k), g in table.group_by("strategy", "k", maintain_order=True):
        row = {
            "strategy": name,
            "k": k,
            "mean_drop": float(g["drop"].mean()),
            "median_rank": float(g["rank"].median()),
            "mean_log10_rank": float(np.log10(g["rank"].to_numpy()).mean()),
        }
        result["rows"].append(row)
        print(f"{name:<15}{k:>3}{row['mean_drop']:>20.3f}{row['median_rank']:>20.0f}{row['mean_log10_rank']:>18.2f}")
    result["vs_random"] = {}
    for k in KS:
        a = table.filter((pl.col("strategy") == "attributed") & (pl.col("k") == k)).sort("user_id")
        r = table.filter((pl.col("strategy") == "random") & (pl.col("k") == k)).sort("user_id")
        diff = paired_ci(a["drop"].to_numpy(), r["drop"].to_numpy())
        ratio = float(a["drop"].mean() / r["drop"].mean()) if r["drop"].mean() > 0 else float("nan")
        la, lr = np.log10(a["rank"].to_numpy()), np.log10(r["rank"].to_numpy())
        rank_diff = paired_ci(la, lr)
        result["vs_random"][k] = {"drop_diff": diff, "drop_ratio": ratio, "log10_rank_diff": rank_diff}
        times = f"x{ratio:.1f}" if ratio == ratio else "random deletion raises the score: no ratio"
        print(f"k={k}: attributed - random score drop {diff[0]:+.3f} [{diff[1]:+.3f}, {diff[2]:+.3f}] nats "
              f"({times}); log10 rank {rank_diff[0]:+.2f} [{rank_diff[1]:+.2f}, {rank_diff[2]:+.2f}]")  # fmt: skip
    write_json(OUT / f"attribution_{args.dataset}_{'keep' if not model.exclude_seen_ else 'exclude'}_seen.json", result)
    return result


if __name__ == "__main__":
    main()
