"""The main job in a few minutes (``make demo``): the batch pipeline on a real clickstream, then
a summary of what it produced and the commands to look at it.

    python -m pipelines.demo                       # Taobao sample: 814 users, 84k events, 4 action types
    python -m pipelines.demo --recipe clickstream-small   # the full recipe (about 10 minutes on 2 cores)

It runs the same five steps as the scheduled job (:mod:`pipelines.steps`: train -> evaluate ->
score -> segment -> explain, each a nested MLflow run, the model registered and promoted to
``@champion`` when it is at least as good as the current one) with a short training budget, and
reads the figures back from the files the steps wrote, so the summary shows what a user will
find on disk. The budget is honest about itself: when the demo model does not beat a baseline,
the summary says so and names the command that does.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from pipelines import steps
from pipelines.common import cli_main

if TYPE_CHECKING:
    from behaviorlm.evaluation.report import EvaluationReport

#: The demo's run of the pipeline; any of these can be overridden on the command line.
DEFAULTS = {
    "--dataset": "taobao",
    "--date": "2017-12-03",  # the sample's last day
    "--out": "data/outputs",  # where `make dashboard` looks
    "--recipe": "clickstream-quick",  # clickstream-small@2 (repeat-aware) cut to 8 epochs: ~2 minutes of training
    "--explain-users": "20",
}
FULL_RECIPE_NOTE = (
    "the full clickstream-small recipe (up to 40 epochs, about 5 minutes on 2 cores) reaches NDCG@10 0.146 "
    "[0.126, 0.167] against repeat 0.128 and recent 0.118 on this sample: python -m pipelines.demo --recipe "
    "clickstream-small (benchmarks/RESULTS.md section 20)"
)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    given = list(argv or [])
    own_data = "--events" in given  # the Taobao dataset and its last day are the defaults only without it
    skip = {"--dataset", "--date"} if own_data else set()
    defaults = [x for flag, value in DEFAULTS.items() if flag not in given and flag not in skip for x in (flag, value)]
    return steps.parse(["all", "--keep-seen", *defaults, *given])


def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    results = steps.run(args)
    print("\n".join(summary(args, results, time.perf_counter() - t0)))
    return results


def summary(args: argparse.Namespace, results: dict[str, Any], wall_s: float) -> list[str]:
    """What the pipeline produced, read back from its outputs, and what to run next."""
    from behaviorlm.evaluation.report import EvaluationReport, comparison_lines

    out, date = Path(args.out), args.date
    data = results["input"]
    report = EvaluationReport.from_dict(json.loads((out / "metrics.json").read_text()))
    seen = "excluded" if report.protocol["exclude_seen"] else "kept"
    lines = [
        "",
        f"behaviorlm demo: the main job on {data['source']} ({data['users']:,} users, {data['events']:,} events, "
        f"{data['items']:,} items, actions {', '.join(data['actions'])}) in {wall_s / 60:.1f} min",
        "",
        f"{'step':<9} {'wall':>7}  produced",
        *_step_lines(out, date, results),
        "",
        f"evaluation: leave-one-out, {report.protocol['users_evaluated']:,} users, full catalog of "
        f"{report.protocol['catalog_size']:,} items, seen items {seen}, 95% bootstrap intervals",
        report.table(),
        *report.notes(),
        *comparison_lines(report),
        "",
        *_verdict(report),
        _promotion(results["evaluate"]),
        *_sample_rationale(out, date),
        "",
        "next:",
        f"  {_dashboard_command(out):<21} # the segment dashboard over {out}, http://127.0.0.1:8501",
        _serve_command(results["evaluate"], out),
        "  make mlflow-ui        # the runs, metrics and registered model, http://127.0.0.1:5000",
        f"  .venv/bin/python -m pipelines.steps segment {_source_flag(args)} --date {date} --out {out}  # a step again",
    ]
    return lines


def _promotion(evaluation: dict[str, Any]) -> str:
    """The promotion gate's decision, as the evaluate step made it, and why."""
    if evaluation.get("alias") is None:
        return f"promotion: {evaluation.get('reason', 'none')}"
    return f"promotion: behaviorlm v{evaluation['version']} -> @{evaluation['alias']}; {evaluation['reason']}"


def _serve_command(evaluation: dict[str, Any], out: Path) -> str:
    """Serve the champion -- or, when this model was not promoted, say so and serve its folder."""
    if evaluation.get("alias") == "champion":
        return "  make serve            # the API on models:/behaviorlm@champion, docs at http://127.0.0.1:8000/docs"
    return f"  .venv/bin/behaviorlm serve --model {out / 'model'}  # this model (not promoted), docs at :8000/docs"


def _dashboard_command(out: Path) -> str:
    return "make dashboard" if out == Path(DEFAULTS["--out"]) else f".venv/bin/behaviorlm dashboard --outputs {out}"


def _source_flag(args: argparse.Namespace) -> str:
    return f"--dataset {args.dataset}" if args.dataset else f"--events {args.events}"


def _step_lines(out: Path, date: str, results: dict[str, Any]) -> list[str]:
    from behaviorlm.segments import store

    train, score, seg, expl = (results[s] for s in ("train", "score", "segment", "explain"))
    segments = store.day_folder(out / "segments", date)
    tiers = _tier_sizes(segments)
    described = {
        "train": f"model registered as behaviorlm v{train['version']} -> {out / 'model'}",
        "evaluate": f"NDCG@10 {results['evaluate']['ndcg@10']:.4f} beside the baselines -> {out / 'metrics.json'}",
        "score": f"top-10 for {score['users']:,} users ({score['rows']:,} rows) -> {out / 'scores' / f'date={date}'}",
        "segment": f"{seg['users']:,} users in tiers {tiers} and {seg['clusters']} behaviour clusters -> {segments}",
        "explain": f"{expl['rationales']:,} rationales ({expl['source']}; {expl['attributed_share']:.0%} rest on the "
        f"model's attributed events, {expl['distinct_per_1000']:.0f} distinct per 1,000) "
        f"-> {out / 'rationales' / f'date={date}.parquet'}",
    }
    return [f"{name:<9} {results[name]['wall_s']:>6.0f}s  {text}" for name, text in described.items()]


def _tier_sizes(folder: Path) -> str:
    from behaviorlm.segments import store
    from behaviorlm.segments.tiers import DEFAULT_TIERS

    users = store.read_users(folder)
    if users is None or "tier" not in users.columns:
        return "(none)"
    counts = dict(users.group_by("tier").len().iter_rows())
    return " · ".join(f"{t} {counts[t]:,}" for t in DEFAULT_TIERS if t in counts)


def _verdict(report: EvaluationReport) -> list[str]:
    losing = list(report.better_baselines())
    tied = [b for b, p in report.paired.items() if not p["significant"]]
    if losing:
        return [
            f"honest reading: with this short budget the model is significantly worse than {', '.join(losing)};",
            f"  {FULL_RECIPE_NOTE}",
        ]
    if tied:
        return [f"honest reading: the model cannot be told apart from {', '.join(tied)} at this size."]
    return ["honest reading: the model beats every baseline, each difference outside the noise."]


def _sample_rationale(out: Path, date: str) -> list[str]:
    path = out / "rationales" / f"date={date}.parquet"
    if not path.exists():
        return []
    table = pl.read_parquet(path)
    if table.height == 0:
        return []
    attributed = table.filter(pl.col("attributed").list.len() > 0)
    row = (attributed if attributed.height else table).row(0, named=True)
    return [
        "",
        f"sample rationale (user {row['user_id']}, item {row['item_id']}, {row['source']}):",
        f"  {row['rationale']}",
        f"  evidence: {'; '.join((row.get('evidence_facts') or row['evidence'])[:3])}",
        f"  the model's attributed events: {', '.join(row['attributed']) or '(none)'}",
    ]


def main(argv: list[str] | None = None) -> int:
    return cli_main(run, parse, argv)


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
