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
difference "attributed minus random". The k events with the highest last-layer attention weight
(the final position's query, averaged over heads) are the attention baseline.

Over the whole ordering (``--curve-users`` users): the deletion curve (the item's probability,
relative to its probability with every event, as 0, 10%, ..., 100% of the window's events are
deleted in each strategy's order) and the insertion curve (only those events kept, nothing
else), each summarised by its area (deletion: lower is more faithful; insertion: higher).

Also: the grounded template rationales of each sampled user's top-5 (distinct rationales per
1,000 pairs, the share resting on attributed events and citing the strongest one), and the
API's latency with and without ``explain=true`` (in-process server, requests interleaved).

Prints tables; writes ``benchmarks/out/attribution_<dataset>_<keep|exclude>_seen.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

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
    att: pl.DataFrame, grad: pl.DataFrame, attention: dict[int, float], rng: np.random.Generator, repeat_aware: bool
) -> dict[str, list[int]]:
    """For one (user, item): event indices in deletion order, per strategy (window events only)."""
    window = att.filter(pl.col("event_index").is_in(list(attention)))
    in_window = grad.filter(pl.col("event_index").is_in(window["event_index"].implode()))
    order = {
        "attributed": window.sort("contribution", descending=True)["event_index"].to_list(),
        "gradient": in_window.sort("contribution", descending=True)["event_index"].to_list(),
        "random": rng.permutation(window["event_index"].to_numpy()).tolist(),
        "recent": window.sort("event_index", descending=True)["event_index"].to_list(),
        "attention": sorted(attention, key=lambda i: -attention[i]),
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


@torch.inference_mode()
def last_layer_attention(model, inputs: pl.DataFrame, users: list) -> dict:
    """Per user, {event index: attention weight} of the final position's query in the last block
    (softmax over the visible keys, averaged over heads) -- the "attention as explanation"
    baseline. Recomputed from the block's own weights (SDPA returns no weights)."""
    from behaviorlm.data.events import Events

    net, engine = model.engine.network, model.engine
    enc = engine.encode(Events.trusted(inputs.filter(pl.col("user_id").is_in(users)), "attention inputs"))
    n_events = dict(inputs.group_by("user_id").len().iter_rows())
    out = {}
    for start in range(0, len(enc), 64):
        rows = slice(start, min(start + 64, len(enc)))
        items, actions, gaps, last = (torch.from_numpy(a) for a in enc.padded(rows))
        x = net.drop(net.input_vectors(items, actions, gaps) + net.pos_emb(torch.arange(items.shape[1])))
        for block in net.blocks[:-1]:
            x = block(x)
        block = net.blocks[-1]
        z = block.ln1(x)
        b, n, d = z.shape
        q, k, _ = block.attn.qkv(z).split(d, dim=2)
        heads = block.attn.n_heads
        q = q.gather(1, last[:, None, None].expand(b, 1, d)).view(b, 1, heads, d // heads).transpose(1, 2)
        k = k.view(b, n, heads, d // heads).transpose(1, 2)
        logits = (q @ k.transpose(-1, -2)).squeeze(2) / (d // heads) ** 0.5  # (b, heads, n)
        visible = torch.arange(n)[None, :] <= last[:, None]
        weights = logits.masked_fill(~visible[:, None, :], -torch.inf).softmax(-1).mean(1)  # (b, n)
        for r in range(b):
            user = enc.user_ids[start + r]
            n_tok, n_ev = int(last[r]) + 1, n_events[user]
            has_bos = n_tok == n_ev + 1
            first = n_ev - n_tok + has_bos  # the oldest event in the input
            out[user] = {first + t - has_bos: float(weights[r, t]) for t in range(int(has_bos), n_tok)}
    return out


def curve_plans(user, item, order: list[int], window: list[int], n_events: int) -> list[tuple]:
    """Deletion and insertion variants at 0, 10%, ..., 100% of the window's events, in ``order``."""
    plans = []
    for f in np.linspace(0, 1, 11):
        k = int(round(f * len(window)))
        plans.append((user, item, "deletion", f, order[:k]))
        kept = set(order[:k])
        plans.append((user, item, "insertion", f, [i for i in range(n_events) if i not in kept]))
    return plans


def auc(points: pl.DataFrame) -> float:
    """Area under the relative-probability curve over the deleted (or kept) fraction."""
    pts = points.sort("fraction")
    y, x = pts["relative"].to_numpy(), pts["fraction"].to_numpy()
    return float(((y[1:] + y[:-1]) / 2 * np.diff(x)).sum())


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
    ap.add_argument("--curve-users", type=int, default=100, help="users whose deletion/insertion curves are drawn")
    ap.add_argument("--api-requests", type=int, default=60, help="requests per arm of the explain=true latency A/B")
    ap.add_argument(
        "--exclude-seen", dest="keep_seen", action="store_false", help="default: seen items kept (as the demo)"
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    model, inputs = model_and_inputs(args)
    fit_s = time.perf_counter() - t0
    inputs = inputs.df.sort("user_id", "timestamp", maintain_order=True)
    rng = np.random.default_rng(args.seed)
    result: dict = {"dataset": args.dataset, "keep_seen": not model.exclude_seen_, "fit_s": fit_s}
    att, grad, users = attribute(model, inputs, args, rng, result)
    attention = last_layer_attention(model, inputs, users)
    deletion_table(model, inputs, att, grad, attention, rng, result)
    curves(model, inputs, att, grad, attention, rng, args.curve_users, result)
    template_figures(model, inputs, users, result)
    api_latency(model, users, args.api_requests, result)
    write_json(OUT / f"attribution_{args.dataset}_{'keep' if not model.exclude_seen_ else 'exclude'}_seen.json", result)
    return result


def attribute(model, inputs: pl.DataFrame, args, rng: np.random.Generator, result: dict):
    """Sample users, explain each one's top-1 item by occlusion and by integrated gradients."""
    from scipy.stats import spearmanr

    from behaviorlm.explain.attribution import integrated_gradients, occlusion

    counts = inputs.group_by("user_id").len().filter(pl.col("len") >= 6).sort("user_id")
    users = counts["user_id"].to_numpy()[rng.permutation(counts.height)[: args.users]].tolist()
    recs = model.recommend(users, events=inputs, k=1, exclude_seen=model.exclude_seen_).select("user_id", "item_id")
    in_vocab = recs.filter(pl.Series(model.tokenizer_.item_index(recs["item_id"]) >= 4))  # N_SPECIAL
    result["top1_outside_vocabulary"] = recs.height - in_vocab.height  # copied new items: re-scoring needs a column
    users = in_vocab["user_id"].to_list()
    mine = inputs.filter(pl.col("user_id").is_in(users))
    t1 = time.perf_counter()
    att = occlusion(model, in_vocab, mine)
    att_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    grad = integrated_gradients(model, in_vocab, mine, steps=32)
    grad_s = time.perf_counter() - t2
    rhos = []
    for (user, item), rows in att.events.group_by("user_id", "item_id", maintain_order=True):
        g = grad.events.filter((pl.col("user_id") == user) & (pl.col("item_id") == item))
        both = rows.join(g.select("event_index", pl.col("contribution").alias("g")), on="event_index")
        both = both.filter(pl.col("contribution") != 0.0)
        if both.height >= 3:
            rhos.append(spearmanr(both["contribution"], both["g"]).statistic)
    q1, q2, q3 = (float(np.nanquantile(rhos, q)) for q in (0.25, 0.5, 0.75))
    result |= {
        "users": len(users),
        "attribution_s": att_s,
        "users_per_s": len(users) / att_s,
        "gradient_users_per_s": len(users) / grad_s,
        "spearman_gradient_vs_occlusion": {"median": q2, "quartiles": [q1, q3]},
    }
    print(f"{args.dataset}: {len(users)} users ({result['top1_outside_vocabulary']} more whose top-1 is a copied "
          f"item outside the vocabulary left out), top-1 item, occlusion {len(users) / att_s:.1f} users/s, "
          f"gradient {len(users) / grad_s:.1f} users/s; Spearman gradient vs occlusion over window events: "
          f"median {q2:.2f} [IQR {q1:.2f}, {q3:.2f}]")  # fmt: skip
    return att, grad, users


def deletion_table(model, inputs, att, grad, attention, rng, result: dict) -> None:
    """Delete the top-k events of each strategy: score drop and rank after, vs random (paired CIs)."""
    repeat_aware = model.model_.copy_head is not None
    plans = []
    for (user, item), rows in att.events.group_by("user_id", "item_id", maintain_order=True):
        g = grad.events.filter((pl.col("user_id") == user) & (pl.col("item_id") == item))
        for name, order in strategies(rows, g, attention[user], rng, repeat_aware).items():
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
    result["rows"] = []
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
        rank_ratio = float(la.mean() / lr.mean()) if lr.mean() > 0 else float("nan")
        result["vs_random"][k] = {
            "drop_diff": diff,
            "drop_ratio": ratio,
            "log10_rank_diff": rank_diff,
            "log10_rank_ratio": rank_ratio,
        }
        times = f"x{ratio:.1f}" if ratio == ratio else "random deletion raises the score: no ratio"
        print(f"k={k}: attributed - random score drop {diff[0]:+.3f} [{diff[1]:+.3f}, {diff[2]:+.3f}] nats "
              f"({times}); log10 rank {rank_diff[0]:+.2f} [{rank_diff[1]:+.2f}, {rank_diff[2]:+.2f}]")  # fmt: skip


def curves(model, inputs, att, grad, attention, rng, n_users: int, result: dict) -> None:
    """Deletion and insertion AUC per strategy over the first ``n_users`` explained users."""
    repeat_aware = model.model_.copy_head is not None
    n_events = dict(inputs.group_by("user_id").len().iter_rows())
    plans = []
    for (user, item), rows in att.events.group_by("user_id", "item_id", maintain_order=True):
        if len({p[0] for p in plans}) >= n_users:
            break
        g = grad.events.filter((pl.col("user_id") == user) & (pl.col("item_id") == item))
        for name, order in strategies(rows, g, attention[user], rng, repeat_aware).items():
            for u, i, kind, f, deleted in curve_plans(user, item, order, list(attention[user]), n_events[user]):
                plans.append((u, i, f"{name}|{kind}", f, deleted))
    scored = deletion_ranks(model, inputs, plans)
    full = dict(zip(att.totals["user_id"].to_list(), att.totals["score"].to_list(), strict=True))
    points = pl.DataFrame(  # a variant left without events (all strategies alike at 0% / 100%) has no point
        [
            {
                "user_id": u,
                "strategy": s.split("|")[0],
                "curve": s.split("|")[1],
                "fraction": f,
                "relative": float(np.exp(got[0] - full[u])),
            }
            for (u, _i, s, f, _d), got in zip(plans, scored, strict=True)
            if got is not None
        ]
    )
    areas = pl.DataFrame(
        [
            {"user_id": u, "strategy": s, "curve": c, "auc": auc(g)}
            for (u, s, c), g in points.group_by("user_id", "strategy", "curve", maintain_order=True)
        ]
    )
    result["curves"] = {"users": areas["user_id"].n_unique(), "auc": {}, "vs_random": {}}
    print(f"\n{'strategy':<15}{'deletion AUC (lower better)':>30}{'insertion AUC (higher better)':>32}")
    for name in areas["strategy"].unique(maintain_order=True):
        d = areas.filter((pl.col("strategy") == name) & (pl.col("curve") == "deletion")).sort("user_id")
        i = areas.filter((pl.col("strategy") == name) & (pl.col("curve") == "insertion")).sort("user_id")
        result["curves"]["auc"][name] = {"deletion": float(d["auc"].mean()), "insertion": float(i["auc"].mean())}
        print(f"{name:<15}{d['auc'].mean():>30.3f}{i['auc'].mean():>32.3f}")
    for curve in ("deletion", "insertion"):
        a = areas.filter((pl.col("strategy") == "attributed") & (pl.col("curve") == curve)).sort("user_id")
        r = areas.filter((pl.col("strategy") == "random") & (pl.col("curve") == curve)).sort("user_id")
        ci = paired_ci(a["auc"].to_numpy(), r["auc"].to_numpy())
        result["curves"]["vs_random"][curve] = ci
        print(f"{curve} AUC attributed - random: {ci[0]:+.3f} [{ci[1]:+.3f}, {ci[2]:+.3f}]")


def template_figures(model, inputs: pl.DataFrame, users: list, result: dict) -> None:
    """The offline rationales of each sampled user's top-5: how varied, how grounded."""
    from behaviorlm.data.events import Events
    from behaviorlm.explain import TemplateExplainer, explain_batch
    from behaviorlm.explain.grounded import grounded_contexts

    mine = Events.trusted(inputs.filter(pl.col("user_id").is_in(users)), "explained users")
    recs = model.recommend(users, events=mine, k=5, exclude_seen=model.exclude_seen_)
    figures = {}
    for name, attribute in (("grounded", True), ("statistics only", False)):
        t0 = time.perf_counter()
        table = explain_batch(grounded_contexts(model, recs, mine, attribute=attribute).contexts, TemplateExplainer())
        took = time.perf_counter() - t0
        attributed = table.filter(pl.col("attributed").list.len() > 0)
        cites = attributed.select(pl.col("evidence").list.contains(pl.col("attributed").list.first()).mean()).item()
        figures[name] = {
            "pairs": table.height,
            "distinct_per_1000": 1000 * table["rationale"].n_unique() / table.height,
            "attributed_share": attributed.height / table.height,
            "cites_strongest_attributed": float(cites) if attributed.height else None,
            "users_per_s": len(users) / took,
        }
        f = figures[name]
        print(f"templates ({name}): {f['pairs']:,} pairs, {f['distinct_per_1000']:.0f} distinct per 1,000, "
              f"{f['attributed_share']:.0%} rest on attributed events, "
              f"cite the strongest: {f['cites_strongest_attributed']}, {f['users_per_s']:.1f} users/s")  # fmt: skip
    result["templates"] = figures
    result["explained_users"] = [u if isinstance(u, int | str) else str(u) for u in users]  # for an A/B elsewhere


def api_latency(model, users: list, n: int, result: dict) -> None:
    """/v1/recommend latency with and without explain=true, in-process, interleaved by request."""
    from fastapi.testclient import TestClient

    from behaviorlm.service.api import create_app

    times: dict[bool, list[float]] = {False: [], True: []}
    with TestClient(create_app(model, api_key="")) as client:
        deadline = time.monotonic() + 300
        while client.get("/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        for r in range(n):
            user = users[r % len(users)]
            for explain in (False, True) if r % 2 == 0 else (True, False):
                t0 = time.perf_counter()
                got = client.post("/v1/recommend", json={"user_id": user, "k": 5, "explain": explain})
                times[explain].append(time.perf_counter() - t0)
                assert got.status_code == 200, got.text
    plain, explained = (float(np.median(times[x]) * 1000) for x in (False, True))
    result["api_ms"] = {"median_plain": plain, "median_explain": explained, "requests_per_arm": n}
    print(f"API /v1/recommend k=5: median {plain:.1f} ms plain, {explained:.1f} ms with explain=true "
          f"(+{explained - plain:.1f} ms; {n} requests each, interleaved)")  # fmt: skip


if __name__ == "__main__":
    main()
