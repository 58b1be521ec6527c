"""Helpers every pipeline step shares: input events, MLflow dataset logging, dates, code version."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl

from behaviorlm.data.events import Events
from behaviorlm.data.schema import InputSchema
from behaviorlm.data.timestamps import UTC
from behaviorlm.errors import ConfigurationError
from behaviorlm.shell import INPUT_OPTIONS, EventsInput, exit_status


def code_version() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_events(args: argparse.Namespace, schema: InputSchema | None = None) -> tuple[Events, pl.DataFrame | None, str]:
    """``--events`` / ``--dataset`` and the column, action-map, time-unit and invalid-row options,
    read exactly as ``behaviorlm`` reads them (one :class:`~behaviorlm.shell.EventsInput`), on top
    of a model's ``schema`` when scoring with one. Without ``--date``, the day of the last event
    becomes the run's date (and is said)."""
    loaded = EventsInput.of(args).load(schema)
    if getattr(args, "date", "") is None:
        last = loaded.events.df["timestamp"].max()
        if last is None:
            raise ConfigurationError("--date: the events are empty, so no date can be taken from them")
        args.date = last.astimezone(UTC).strftime("%Y-%m-%d")  # type: ignore[union-attr]
        print(f"--date not given: {args.date}, the day of the last event", file=sys.stderr)
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


def events_until(ev: Events, date: str) -> tuple[Events, datetime]:
    """The events before the end of ``date`` (UTC) -- all a step run as of that day may see --
    and that end: the one "as of the date" filter of every step and the scheduled job."""
    end = day_end(date)
    return ev.derive(ev.df.filter(pl.col("timestamp") < end), f"events before the end of {date}"), end


def events_on(ev: Events, date: str) -> Events:
    """The events of ``date`` itself (UTC): the daily increment's new events."""
    end = day_end(date)
    on = (pl.col("timestamp") >= end - timedelta(days=1)) & (pl.col("timestamp") < end)
    return ev.derive(ev.df.filter(on), f"events of {date}")


def cli_main(run: Callable[[argparse.Namespace], object], parse: Callable, argv: list[str] | None) -> int:
    """Run a job under the CLI's error rule (:func:`behaviorlm.shell.exit_status`), showing the
    library's progress lines (epochs, loss, validation, time left) and not MLflow's chatter."""
    show_progress()
    return exit_status(lambda: run(parse(argv)), lambda message: print(f"error: {message}", file=sys.stderr))


def show_progress() -> None:
    """behaviorlm's INFO lines on stderr, timestamped; MLflow's warnings, schema notes and
    download bars kept off the terminal (they stay in the runs)."""
    import warnings

    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    lib = logging.getLogger("behaviorlm")
    if not lib.handlers:
        lib.addHandler(handler)
        lib.setLevel(logging.INFO)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")  # read when mlflow configures its loggers
    logging.getLogger("mlflow").setLevel(logging.ERROR)  # and if it is imported already
    warnings.filterwarnings("ignore", module="mlflow")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def add_source_args(ap: argparse.ArgumentParser, date_help: str) -> None:
    """``--date``, ``--out`` and every option of how events are read -- the same table
    (:data:`behaviorlm.shell.INPUT_OPTIONS`) the ``behaviorlm`` commands are built from."""
    ap.add_argument("--date", default=None, help=f"{date_help} (default: the day of the last event)")
    ap.add_argument("--out", default="data/outputs", help="the outputs folder (model, scores, segments, ...)")
    group = ap.add_argument_group("input data")
    for opt in INPUT_OPTIONS:
        if opt.kind is bool:
            yes, no = opt.flag.split("/")
            group.add_argument(yes, dest=opt.name, action="store_true", default=None, help=opt.help)
            group.add_argument(no, dest=opt.name, action="store_false", default=None)
        else:
            group.add_argument(
                opt.flag, dest=opt.name, default="raise" if opt.name == "invalid" else None, help=opt.help
            )


class _StderrHandler(logging.StreamHandler):
    """A stream handler writing to whatever ``sys.stderr`` is at each record (a test's capture,
    a redirected terminal), not the stream it found when it was made."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201 - logging's own attribute
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # noqa: ANN001 - set once by StreamHandler.__init__
        pass
