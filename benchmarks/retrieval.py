"""Two-stage retrieval: which ANN library, and what the approximation costs in quality and buys in time.

Part A -- the library choice, on the item embeddings of a 1M-item model (and Taobao's 55k):
hnswlib, faiss-cpu (IndexHNSWFlat) and usearch with the same HNSW settings; build time, index
memory, ANN-only recall@10 against exact maximum inner product, and per-query latency (one
thread, batches of 32 queries: what one service batch sends), for two search beams.

Part B -- the shipped two-stage path (``BehaviorLM.use_retrieval('ann')``) against exact
full-catalog ranking on leave-one-out models: recall@10 of the final top-10 against the exact
top-10, NDCG@10 of the held-out item both ways with a paired bootstrap CI of the difference,
and the ranking cost per user (hidden states precomputed, batches of 8 as in the service).

    python benchmarks/retrieval.py --model data/models/taobao-loo --dataset taobao
    python benchmarks/retrieval.py --synthetic data/synth/1M/raw --model data/models/synth-1m-loo

The synthetic model is trained here on the first use (LOO split, sampled softmax, a fixed step
budget): it is a scale workload for latency and for recall against its own exact ranking; its
NDCG says nothing about quality. Writes benchmarks/out/retrieval_<name>.json.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import torch
from provenance import write_json

from behaviorlm.data.datasets import load_dataset
from behaviorlm.data.events import validate_events
from behaviorlm.evaluation.metrics import bootstrap_ci, list_ranks, paired_difference, per_user_metrics
from behaviorlm.evaluation.splits import leave_one_out
from behaviorlm.inference.retrieval import BACKENDS, IndexParams, ItemIndex, top_k_recall
from behaviorlm.recommender import BehaviorLM
from behaviorlm.sequence.tokenizer import N_SPECIAL

OUT = Path(__file__).parent / "out"
log = logging.getLogger("retrieval")


@contextmanager
def timed() -> Iterator[dict]:
    out: dict = {}
    t0 = time.perf_counter()
    yield out
    out["wall_s"] = time.perf_counter() - t0


def split_of(args):
    if args.synthetic:
        raw = pl.read_parquet(Path(args.synthetic) / "events-*.parquet")
        return leave_one_out(validate_events(raw))
    return leave_one_out(load_dataset(args.dataset).events)


def train_synthetic(split, save: Path, max_steps: int) -> BehaviorLM:
    """The 1M-item scale model: sampled softmax, no per-epoch validation (a full-catalog pass)."""
    model = BehaviorLM(
        "clickstream-small",
        max_len=50,
        dim=64,
        n_layers=2,
        n_heads=2,
        loss="sampled",
        n_negatives=1024,
        batch_size=256,
        epochs=1,
        max_steps=max_steps,
        seed=0,
        progress=True,
    )
    t0 = time.perf_counter()
    model.fit(split.train)
    log.info("trained the synthetic model in %.0f s", time.perf_counter() - t0)
    model.use_retrieval("exact")  # save without an index: part A builds and times them
    model.save(save)
    return model


# ---------------------------------------------------------------- part A: libraries
def queries_of(model: BehaviorLM, n_users: int) -> np.ndarray:
    """Real next-action queries ``h + E_next[a]`` of the first users."""
    eng = model.engine
    enc = eng.encode(model.history_events())
    sub = enc.subset(np.arange(min(n_users, len(enc))))
    h, _ = eng.heads(sub, slice(0, len(sub)))
    with torch.inference_mode():
        q = h[:, None, :] + eng.network.next_action_emb.weight[eng.real_actions][None]
    return q.reshape(-1, q.shape[-1]).numpy()


def exact_neighbours(emb: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    out = []
    for s in range(0, len(q), 64):
        part = q[s : s + 64] @ emb.T
        top = np.argpartition(-part, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(part, top, 1), axis=1)
        out.append(np.take_along_axis(top, order, 1))
    return np.concatenate(out)


def library_rows(model: BehaviorLM, q: np.ndarray, efs: list[int], m: int, ef_c: int) -> list[dict]:
    emb = model.engine.network.item_emb.weight.detach()[N_SPECIAL:].numpy()
    truth = exact_neighbours(emb, q, 10)
    rows = []
    for backend in BACKENDS:
        params = IndexParams(backend=backend, m=m, ef_construction=ef_c)
        with timed() as cost:
            index = ItemIndex.build(model.engine.network, model.model_version, params)
        for ef in efs:
            index.backend.p = replace(params, ef_search=ef)
            found = index.backend.search(q, 10)
            recall = float(top_k_recall(truth, found).mean())
            lat = []
            for s in range(0, len(q), 32):
                t0 = time.perf_counter()
                index.backend.search(q[s : s + 32], 10)
                lat.append((time.perf_counter() - t0) / len(q[s : s + 32]))
            rows.append(
                {
                    "backend": backend,
                    "m": m,
                    "ef_construction": ef_c,
                    "ef_search": ef,
                    "build_s": cost["wall_s"],
                    "index_mb": index.memory_bytes() / 1e6,
                    "recall_at_10": recall,
                    "ms_per_query_median": float(np.median(lat) * 1000),
                }
            )
            print(_fmt_lib(rows[-1]), flush=True)
    return rows


def _fmt_lib(r: dict) -> str:
    return (
        f"{r['backend']:<8} M={r['m']} efC={r['ef_construction']} ef={r['ef_search']:<4} build {r['build_s']:6.1f} s  "
        f"{r['index_mb']:7.1f} MB  recall@10 {r['recall_at_10']:.4f}  {r['ms_per_query_median']:.3f} ms/query"
    )


# ---------------------------------------------------------------- part B: two-stage vs exact
def two_stage(model: BehaviorLM, split, n_users: int, params: IndexParams, model_dir: Path) -> dict:
    eng = model.engine
    users = split.test.targets["user_id"].unique().sort()
    users = users.sample(min(n_users, len(users)), seed=0).sort().to_list()
    exclude = model.exclude_seen_
    target = dict(split.test.targets.select("user_id", "item_id").iter_rows())
    with timed() as build:
        model.use_retrieval("ann", params, directory=model_dir)
    ann_engine = model.engine
    model.use_retrieval("exact")
    exact_engine = model.engine
    inputs = split.test.inputs  # every event before the held-out one, as the evaluation protocol
    enc = exact_engine.encode(inputs)
    pos = {u: i for i, u in enumerate(enc.user_ids)}
    sub = enc.subset([pos[u] for u in users])
    seen_df = inputs.df.select("user_id", "item_id").unique()
    seen = exact_engine.seen_pairs(seen_df, sub.user_ids) if exclude else (np.zeros(0, np.int64),) * 2
    h, a_logp = exact_engine.heads(sub, slice(0, len(sub)))
    results = {}
    for name, e in (("exact", exact_engine), ("ann", ann_engine), ("exact ", exact_engine), ("ann ", ann_engine)):
        idx, times = [], []
        for s in range(0, len(sub), 8):
            rows = slice(s, min(s + 8, len(sub)))
            t0 = time.perf_counter()
            _, i = e.rank(h[rows], a_logp[rows], rows, 10, seen)
            times.append((time.perf_counter() - t0) / (rows.stop - rows.start))
            idx.append(i.numpy())
        results.setdefault(name.strip(), []).append((np.concatenate(idx), float(np.median(times) * 1000)))
    top_exact, top_ann = results["exact"][0][0], results["ann"][0][0]
    recall = top_k_recall(top_exact, top_ann)
    tgt = eng.tokenizer.item_index(pl.Series([target[u] for u in users]))
    ndcg = {name: _ndcg(results[name][0][0], tgt) for name in ("exact", "ann")}
    diff = paired_difference(ndcg["ann"], ndcg["exact"])
    out = {
        "users": len(users),
        "catalog": eng.n_items - N_SPECIAL,
        "actions": len(eng.action_names),
        "exclude_seen": exclude,
        "params": params.__dict__,
        "index_build_s": build["wall_s"],
        "recall_at_10": float(recall.mean()),
        "recall_at_10_ci": bootstrap_ci(recall),
        "ndcg_at_10_exact": float(ndcg["exact"].mean()),
        "ndcg_at_10_ann": float(ndcg["ann"].mean()),
        "ndcg_diff": diff,
        "ndcg_relative_change": float(ndcg["ann"].mean() / max(ndcg["exact"].mean(), 1e-12) - 1),
        "ms_per_user_exact": [t for _, t in results["exact"]],
        "ms_per_user_ann": [t for _, t in results["ann"]],
    }
    print(
        f"two-stage over {out['catalog']:,} items x {out['actions']} actions, {len(users)} users: "
        f"recall@10 {out['recall_at_10']:.4f}; NDCG@10 exact {out['ndcg_at_10_exact']:.4f} ann "
        f"{out['ndcg_at_10_ann']:.4f} (diff {diff['diff']:+.5f} [{diff['ci95'][0]:+.5f}, {diff['ci95'][1]:+.5f}], "
        f"{out['ndcg_relative_change']:+.2%}); ms/user exact {out['ms_per_user_exact']} ann {out['ms_per_user_ann']}",
        flush=True,
    )
    return out


def _ndcg(top: np.ndarray, target: np.ndarray) -> np.ndarray:
    return per_user_metrics(list_ranks(top, target), 10)["ndcg@10"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="a leave-one-out model directory")
    ap.add_argument("--dataset", default="taobao", help="the model's dataset (for its LOO targets)")
    ap.add_argument("--synthetic", type=Path, help="synthetic raw folder; the model is trained if missing")
    ap.add_argument("--max-steps", type=int, default=600, help="synthetic model's training budget")
    ap.add_argument("--users", type=int, default=2000, help="users in part B")
    ap.add_argument("--query-users", type=int, default=500, help="users whose queries part A searches")
    ap.add_argument("--ef", default="64,128")
    ap.add_argument("--m", type=int, default=16, help="part A's graph (the shipped default is in IndexParams)")
    ap.add_argument("--ef-construction", type=int, default=100)
    ap.add_argument("--skip-libraries", action="store_true")
    ap.add_argument("--train-only", action="store_true", help="train the synthetic model and stop")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    torch.set_num_threads(1)  # the service's budget: one inference thread

    split = split_of(args)
    if args.synthetic and not args.model.exists():
        train_synthetic(split, args.model, args.max_steps)
    if args.train_only:
        return
    model = BehaviorLM.load(args.model, retrieval="exact")
    report = {"model": str(args.model), "dataset": str(args.synthetic or args.dataset)}
    OUT.mkdir(exist_ok=True)
    path = OUT / f"retrieval_{args.model.name}.json"
    if not args.skip_libraries:
        q = queries_of(model, args.query_users)
        report["libraries"] = library_rows(model, q, [int(e) for e in args.ef.split(",")], args.m, args.ef_construction)
        write_json(path, report)  # part A costs minutes at 1M items: keep it whatever part B does
    report["two_stage"] = two_stage(model, split, args.users, IndexParams(), args.model)
    write_json(path, report)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
