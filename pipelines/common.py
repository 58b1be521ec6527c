"""Helpers every pipeline step shares: input events, MLflow dataset logging, dates, code version."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl

from behaviorlm.data.events import Events
from behaviorlm.data.loading import load_events as load_source
from behaviorlm.data.schema import InputSchema
from behaviorlm.data.timestamps import UTC
from behaviorlm.errors import BehaviorLMError, ConfigurationError


def code_version() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_events(args: argparse.Namespace, schema: InputSchema | None = None) -> tuple[Events, pl.DataFrame | None, str]:
    """``--events`` / ``--dataset`` through the same loader the CLI uses (a model's ``schema``
    when scoring with one)."""
    loaded = load_source(args.events, args.dataset, schema)
    return loaded.events, loaded.items, loaded.source


def log_input(ev: Events, source: str, context: str) -> None:
    import mlflow

    frame = ev.df.select("user_id", "item_id", "event_type", "timestamp").to_pandas()
    mlflow.log_input(mlflow.data.from_pandas(frame, source=source, name=Path(source).name), context=context)


def day_end(date: str) -> datetime:
    try:
        return datetime.strptime(date, "%Y-%m-%d").replace(tzinfo=UTC) + timedelta(days=1)
    except ValueError:
        raise ConfigurationError(f"--date must be YYYY-MM-DD, got {date!r}") from None


def cli_main(run: Callable[[argparse.Namespace], object], parse: Callable, argv: list[str] | None) -> int:
    """Run a job; the library's deliberate errors print one line and exit 2, as the CLI does.
    Anything else is a bug and keeps its traceback."""
    try:
        run(parse(argv))
    except BehaviorLMError as e:
        print(f"error: {e.cli_message()}", file=sys.stderr)
        return 2
    return 0
