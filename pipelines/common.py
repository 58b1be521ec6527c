"""Helpers every pipeline step shares: input events, MLflow dataset logging, dates, code version."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl

from behaviorlm.events import Events, EventsError, read_table, validate_events


def code_version() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_events(args: argparse.Namespace) -> tuple[Events, pl.DataFrame | None, str]:
    if (args.events is None) == (args.dataset is None):
        raise EventsError("give exactly one of --events PATH or --dataset NAME")
    if args.dataset:
        from behaviorlm.datasets import load_dataset

        ds = load_dataset(args.dataset)
        return ds.events, ds.items, args.dataset
    return validate_events(read_table(args.events)), None, str(args.events)


def log_input(ev: Events, source: str, context: str) -> None:
    import mlflow

    frame = ev.df.select("user_id", "item_id", "event_type", "timestamp").to_pandas()
    mlflow.log_input(mlflow.data.from_pandas(frame, source=source, name=Path(source).name), context=context)


def day_end(date: str) -> datetime:
    try:
        return datetime.strptime(date, "%Y-%m-%d").replace(tzinfo=UTC) + timedelta(days=1)
    except ValueError:
        raise EventsError(f"--date must be YYYY-MM-DD, got {date!r}") from None


def cli_main(run: Callable[[argparse.Namespace], object], parse: Callable, argv: list[str] | None) -> int:
    """Run a job; expected failures print one line and exit 2, as the library's CLI does."""
    try:
        run(parse(argv))
    except (EventsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
