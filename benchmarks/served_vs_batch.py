"""The served model and the day's batch scores agree for every user (issue 31 item 12).

    python benchmarks/served_vs_batch.py                       # the demo's pipeline on Taobao, then the check
    python benchmarks/served_vs_batch.py --outputs data/outputs --uri models:/behaviorlm@champion   # an existing run

Runs the pipeline's train, evaluate and score steps on the Taobao sample (clickstream-quick, as
``make demo``) into a scratch data folder, then serves the registered champion in-process and asks
``POST /v1/recommend {"user_id": u}`` for every user of the day's batch scores: the top-10 lists
must be equal, item for item (the service and the batch run the same model version). Also times
what knowing the held-out events costs -- ``BehaviorLM.remember`` over every event up to the date
-- beside the train step it saves repeating (a refit on all events). Prints a table; writes
``benchmarks/out/served_vs_batch.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from provenance import write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out" / "served_vs_batch.json"
DATE = "2017-12-03"


def run_pipeline(outputs: Path) -> float:
    """The demo's train, evaluate and score steps; the train step's wall time."""
    from pipelines import steps

    base = ["--dataset", "taobao", "--date", DATE, "--out", str(outputs), "--recipe", "clickstream-quick"]
    base += ["--keep-seen", "--experiment", "served-vs-batch"]
    results = {}
    for step in ("train", "evaluate", "score"):
        results |= steps.run(steps.parse([step, *base]))
    return float(results["train"]["wall_s"])


def remember_cost(outputs: Path) -> dict:
    """Seconds to remember every event up to the date on the trained model (median of 5)."""
    from behaviorlm.data.loading import load_events
    from behaviorlm.recommender import BehaviorLM
    from pipelines.common import events_until

    model = BehaviorLM.load(outputs / "model", retrieval="exact")
    ev, _ = events_until(load_events(None, "taobao", model.input_schema_).events, DATE)
    times = []
    for _ in range(5):
        fresh = BehaviorLM.load(outputs / "model", retrieval="exact")
        fresh.context_ = fresh.context_.clear()
        t0 = time.perf_counter()
        fresh.remember(ev)
        times.append(time.perf_counter() - t0)
    return {"seconds": sorted(times)[2], "events": len(ev), "context_events": fresh.context_.height}


def agreement(outputs: Path, uri: str) -> dict:
    """Every user of the day's scores: the service's top-10 against the batch's."""
    import httpx

    from behaviorlm.service.api import create_app
    from behaviorlm.testing import UvicornThread
    from behaviorlm.tracking import load_model_ref

    scores = pl.read_parquet(outputs / "scores" / f"date={DATE}" / "part-*.parquet").sort("user_id", "rank")
    served, provenance = load_model_ref(uri)
    same, differ, t0 = 0, [], time.perf_counter()
    with UvicornThread(create_app(served, api_key="")) as url, httpx.Client(base_url=url, timeout=60) as client:
        for (user,), rows in scores.group_by("user_id", maintain_order=True):
            got = client.post("/v1/recommend", json={"user_id": user, "k": 10}).json()
            if [str(i["item_id"]) for i in got["items"]] == [str(i) for i in rows["item_id"]]:
                same += 1
            else:
                differ.append(user)
    return {
        "users": same + len(differ),
        "identical_top10": same,
        "differ": [str(u) for u in differ[:20]],
        "served_version": served.model_version,
        "batch_versions": scores["model_version"].unique().to_list(),
        "registry_version": provenance.get("registry_version"),
        "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outputs", help="an existing pipeline run's outputs (default: run the steps in a scratch folder)")
    ap.add_argument("--uri", default="models:/behaviorlm@champion")
    args = ap.parse_args(argv)
    if args.outputs:
        outputs, train_s = Path(args.outputs), None
    else:
        scratch = Path(tempfile.mkdtemp(prefix="served-vs-batch-"))
        os.environ["BEHAVIORLM_DATA_DIR"] = str(scratch)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        outputs = scratch / "outputs"
        train_s = run_pipeline(outputs)
    check = agreement(outputs, args.uri)
    cost = remember_cost(outputs)
    print(f"{'users':>6} {'identical top-10':>17} {'served version':>15} {'batch version':>14}")
    print(f"{check['users']:>6,} {check['identical_top10']:>17,} {check['served_version']:>15} "
          f"{','.join(check['batch_versions']):>14}")  # fmt: skip
    print(f"remember(): {cost['seconds'] * 1000:.1f} ms for {cost['events']:,} events "
          f"({cost['context_events']:,} kept as context)" + (f"; the train step it saves repeating: {train_s:.0f} s"
                                                              if train_s else ""))  # fmt: skip
    result = {"agreement": check, "remember": cost, "train_step_s": train_s}
    write_json(OUT, result)
    return result


if __name__ == "__main__":
    main()
