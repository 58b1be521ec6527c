"""Integrated gradients: this project's small implementation against Captum's, on the same function.

    pip install captum   # not a dependency: this script is the measurement that kept it out
    python benchmarks/ig_vs_captum.py --model data/models/ml-1m-loo-d01 --dataset ml-1m
    python benchmarks/ig_vs_captum.py --model data/models/taobao-loo --dataset taobao

For 40 users' top-1 item (leave-one-out test inputs), both integrate the gradient of the item's
log-probability along the straight path from zero to each token's content vector, 32 midpoint
steps in one batch; the attributions per token must agree, and the time per (user, item) is
compared with the two alternating which goes first. Captum is handed the same differentiable
scoring function the library integrates (``attribution.differentiable_item_logp``: the copy
mixture computed out of place, as autograd needs), so the comparison is of the integration
machinery only. Writes
``benchmarks/out/ig_vs_captum_<dataset>.json``.
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

OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "out"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--users", type=int, default=40)
    args = ap.parse_args(argv)
    try:
        from captum.attr import IntegratedGradients
    except ImportError:
        sys.exit("captum is not installed: pip install captum (this measurement only)")
    from behaviorlm.data.events import Events
    from behaviorlm.data.loading import load_events
    from behaviorlm.evaluation import leave_one_out
    from behaviorlm.explain import attribution
    from behaviorlm.recommender import BehaviorLM

    model = BehaviorLM.load(args.model, retrieval="exact")
    ev = load_events(None, args.dataset, model.input_schema_).events
    inputs = leave_one_out(ev).test.inputs.df.sort("user_id", "timestamp", maintain_order=True)
    users = inputs["user_id"].unique(maintain_order=True).head(args.users).to_list()
    mine = Events.trusted(inputs.filter(pl.col("user_id").is_in(users)), "benchmark users")
    recs = model.recommend(users, events=mine, k=1, exclude_seen=model.exclude_seen_).select("user_id", "item_id")
    engine = model.engine
    enc = engine.encode(mine)
    row_of = {u: i for i, u in enumerate(enc.user_ids)}
    ours_s, captum_s, diffs = [], [], []
    for i, ((user, _), col) in enumerate(
        zip(recs.iter_rows(), engine.tokenizer.item_index(recs["item_id"]), strict=True)
    ):
        row = row_of[user]
        items, actions, gaps, last = (torch.from_numpy(a) for a in enc.padded(slice(row, row + 1)))
        n = int(last[0]) + 1
        items, actions, gaps = items[:, :n], actions[:, :n], gaps[:, :n]
        with torch.no_grad():
            x = engine.network.input_vectors(items, actions, gaps)

        def score(z: torch.Tensor, items=items, actions=actions, gaps=gaps, n=n, col=int(col)) -> torch.Tensor:
            rep = len(z)
            return attribution.differentiable_item_logp(
                engine, items.expand(rep, n), actions.expand(rep, n), gaps.expand(rep, n), z, col
            )

        def ours(row=row, col=int(col)) -> np.ndarray:
            return attribution.integrated_gradients_row(engine, enc, row, col, 32)[0]

        def theirs(x=x, score=score) -> np.ndarray:
            ig = IntegratedGradients(score)
            got = ig.attribute(x, baselines=torch.zeros_like(x), n_steps=32, method="riemann_middle")
            return got.sum(-1)[0].detach().numpy()

        got = {}
        for name, fn, times in (("ours", ours, ours_s), ("captum", theirs, captum_s))[:: 1 if i % 2 == 0 else -1]:
            t0 = time.perf_counter()
            got[name] = fn()
            times.append(time.perf_counter() - t0)
        diffs.append(float(np.abs(got["ours"] - got["captum"]).max()))
    result = {
        "dataset": args.dataset,
        "pairs": len(diffs),
        "max_abs_difference": max(diffs),
        "ours_ms_median": 1000 * float(np.median(ours_s)),
        "captum_ms_median": 1000 * float(np.median(captum_s)),
    }
    print(f"{args.dataset}: {len(diffs)} (user, item) pairs; attributions agree to {result['max_abs_difference']:.1e}; "
          f"median {result['ours_ms_median']:.1f} ms ours vs {result['captum_ms_median']:.1f} ms Captum")  # fmt: skip
    write_json(OUT / f"ig_vs_captum_{args.dataset}.json", result)
    return result


if __name__ == "__main__":
    main()
