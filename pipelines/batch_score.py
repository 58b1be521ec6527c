"""Scheduled batch scoring for one day: ``python -m pipelines.batch_score --date 2017-12-03``.

Loads the champion model (``models:/behaviorlm@champion`` from the MLflow registry, or a local
model directory), takes every event before the end of ``--date`` (UTC), and writes top-K
recommendations for every user active up to then to
``data/outputs/scores/date=YYYY-MM-DD/part-NNNNN.parquet`` (+ ``_PLAN.json``, ``_SUCCESS``), then
conversion and churn propensities, tiers and clusters for the same users to
``data/outputs/segments/date=YYYY-MM-DD/`` (``users.parquet``, ``profiles.parquet``, figures,
``_SUCCESS`` with the plan and the model's registry version and MLflow run).

Safe to rerun: the same date and inputs give identical files and no duplicates, and a run killed
midway resumes from its completed parts (see ``behaviorlm.inference.batch.score_partition``). Cron:

    15 2 * * *  cd /srv/behaviorlm && .venv/bin/python -m pipelines.batch_score --date $(date -u -d yesterday +\\%F)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from behaviorlm.data.events import EventsError
from behaviorlm.inference.batch import ScoringOptions, score_partition, set_threads
from behaviorlm.segments.store import day_folder
from behaviorlm.shell import OPTION_HELP
from behaviorlm.tracking import CHAMPION_URI, load_model_ref
from pipelines.common import add_source_args, cli_main, day_end, events_until, load_events
from pipelines.segment import add_segment_args, config_from, segment_day


def run(args: argparse.Namespace) -> Path:
    if args.date is not None:
        day_end(args.date)  # a bad --date is refused before the model loads
    set_threads(args.threads)
    model, provenance = load_model_ref(args.model)
    ev, items, _ = load_events(args, model.input_schema_)  # read as the model was trained
    upto, end = events_until(ev, args.date)
    if len(upto) == 0:
        raise EventsError(f"no events before the end of {args.date}: nothing to score")
    out_dir = Path(args.out) / "scores" / f"date={args.date}"
    options = ScoringOptions(k=args.k, exclude_seen=model.exclude_seen_, action=args.action)
    s = score_partition(
        model.engine,
        upto,
        out_dir,
        end,
        options,
        chunk_users=args.chunk_users,
        quantize=args.quantize,
        pause_s=args.pause_s,
        progress=sys.stderr.isatty(),
    )
    print(f"scored {s.n_users:,} users -> {s.n_rows:,} rows (model {s.model_version}) in {out_dir}")
    if not args.no_segments:
        seg_dir = day_folder(Path(args.out) / "segments", args.date)
        day = segment_day(model, upto, items, seg_dir, end, config_from(args), provenance)
        how = "reused" if day.reused else f"{day.clusters} clusters"
        print(f"segmented {day.users:,} users ({how}, mean propensity {day.mean_propensity:.3f}) in {seg_dir}")
    return out_dir


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_source_args(ap, "YYYY-MM-DD: score users active up to the end of this day (UTC)")
    ap.add_argument("--model", default=CHAMPION_URI, help="registry URI or local model directory")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--chunk-users", type=int, default=2048)
    ap.add_argument("--pause-s", type=float, default=0.0, help="sleep between chunks (shared machines)")
    ap.add_argument("--action", default=None, help=OPTION_HELP["action"])
    ap.add_argument("--quantize", default=None, choices=["int8"], help=OPTION_HELP["quantize"])
    ap.add_argument("--threads", type=int, default=None, help=OPTION_HELP["threads"])
    ap.add_argument("--no-segments", action="store_true", help="only the recommendations, no propensities/segments")
    add_segment_args(ap)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return cli_main(run, parse, argv)


if __name__ == "__main__":
    sys.exit(main())
