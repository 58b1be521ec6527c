"""Leak-free splits: leave-one-out and global-time temporal splits into train / validation / test."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import polars as pl

from behaviorlm.data.events import Events, as_events
from behaviorlm.data.timestamps import to_utc
from behaviorlm.errors import ConfigurationError, InputDataError


@dataclass
class Holdout:
    """Per-user prediction tasks: the model sees ``inputs`` and must rank ``targets`` (one per user)."""

    inputs: Events
    targets: pl.DataFrame  # user_id, item_id, event_type, timestamp

    @property
    def n_users(self) -> int:
        return self.targets.height


@dataclass
class Split:
    name: str
    train: Events
    valid: Holdout
    test: Holdout
    info: dict[str, Any] = field(default_factory=dict)


def leave_one_out(events: Events | Any, min_events: int = 3) -> Split:
    """Last event of each user = test, second-to-last = validation, the rest = train.

    Users with fewer than ``min_events`` (>= 3) events are kept in training but not evaluated.
    """
    if min_events < 3:
        raise ConfigurationError("leave-one-out needs min_events >= 3 (train, validation, test)")
    ev = as_events(events)
    df = ev.df.with_columns(
        pl.int_range(pl.len()).over("user_id").alias("__pos"), pl.len().over("user_id").cast(pl.Int64).alias("__n")
    )
    evaluated = pl.col("__n") >= min_events
    cols = ev.df.columns
    train = df.filter(~evaluated | (pl.col("__pos") < pl.col("__n") - 2)).select(cols)
    val_t = df.filter(evaluated & (pl.col("__pos") == pl.col("__n") - 2)).select(cols)
    test_in = df.filter(evaluated & (pl.col("__pos") < pl.col("__n") - 1)).select(cols)
    test_t = df.filter(evaluated & (pl.col("__pos") == pl.col("__n") - 1)).select(cols)
    val_in = train.filter(pl.col("user_id").is_in(val_t["user_id"].implode()))
    n_skipped = ev.n_users - val_t.height
    info = {"split": "loo", "min_events": min_events, "users_evaluated": val_t.height, "users_too_short": n_skipped}
    return Split(
        "loo",
        train=ev.derive(train, "loo train: all but each user's last two events"),
        valid=Holdout(ev.derive(val_in, "loo validation inputs"), val_t),
        test=Holdout(ev.derive(test_in, "loo test inputs"), test_t),
        info=info,
    )


def temporal_split(events: Events | Any, test_start: Any = None, val_start: Any = None) -> Split:
    """Global time cut: train < val_start <= validation < test_start <= test.

    Targets are each user's *first* event after the cut (next-action prediction at that time),
    for users with at least one event before it; defaults cut at the 80% / 90% time quantiles.
    """
    ev = as_events(events)
    ts = ev.df["timestamp"]
    test_start = to_utc(test_start if test_start is not None else ts.quantile(0.9, "nearest"), "test_start")
    val_start = to_utc(val_start if val_start is not None else ts.quantile(0.8, "nearest"), "val_start")
    if not val_start < test_start:
        raise ConfigurationError(f"val_start ({val_start}) must be before test_start ({test_start})")
    train = ev.df.filter(pl.col("timestamp") < val_start)
    if train.height == 0:
        raise InputDataError(f"temporal split: no events before val_start={val_start}")
    val_in, val_t = _next_event_targets(ev.df, val_start, test_start)
    test_in, test_t = _next_event_targets(ev.df, test_start, None)
    info = {
        "split": "temporal",
        "val_start": str(val_start),
        "test_start": str(test_start),
        "users_evaluated": test_t.height,
        "valid_users": val_t.height,
    }
    return Split(
        "temporal",
        train=ev.derive(train, f"temporal train: events before {val_start}"),
        valid=Holdout(ev.derive(val_in, "temporal validation inputs"), val_t),
        test=Holdout(ev.derive(test_in, "temporal test inputs"), test_t),
        info=info,
    )


def purchase_split(events: Events | Any, action: str = "purchase") -> Split:
    """Each buyer's last ``action`` event is the test target, the one before it validates (the
    purchase protocol: :mod:`behaviorlm.evaluation.purchase`);
    inputs are the events strictly before each target's time; training is every user's
    events strictly before their first target (all events of users who never bought)."""
    ev = as_events(events)
    df = ev.df.with_columns(pl.int_range(pl.len()).over("user_id").alias("__pos"))
    buys = df.filter(pl.col("event_type") == action)
    if buys.height == 0:
        raise InputDataError(f"no {action!r} events: the purchase protocol needs buyers (column event_type)")
    last_two = (
        buys.group_by("user_id", maintain_order=True)
        .tail(2)
        .with_columns(pl.int_range(pl.len()).over("user_id").alias("__k"), pl.len().over("user_id").alias("__n"))
    )
    test_t = last_two.filter(pl.col("__k") == pl.col("__n") - 1)
    val_t = last_two.filter((pl.col("__n") == 2) & (pl.col("__k") == 0))
    test_in, test_t = inputs_before(df, test_t)
    val_in, val_t = inputs_before(df, val_t)
    first_cut = pl.concat([val_t, test_t.join(val_t.select("user_id"), on="user_id", how="anti")])
    cut = first_cut.select("user_id", pl.col("timestamp").alias("__cut"))
    train = df.join(cut, on="user_id", how="left", maintain_order="left").filter(
        pl.col("__cut").is_null() | (pl.col("timestamp") < pl.col("__cut"))
    )
    cols = ev.df.columns
    info = {
        "split": "purchase",
        "action": action,
        "users_evaluated": test_t.height,
        "users_validated": val_t.height,
        "inputs": "events strictly before the target's timestamp; seen items kept",
    }
    return Split(
        "purchase",
        train=ev.derive(train.select(cols), f"purchase split train: events before each buyer's first {action} target"),
        valid=Holdout(ev.derive(val_in.select(cols), "purchase validation inputs"), val_t.select(cols)),
        test=Holdout(ev.derive(test_in.select(cols), "purchase test inputs"), test_t.select(cols)),
        info=info,
    )


def inputs_before(df: pl.DataFrame, targets: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Each target user's events strictly before the target's time, and the targets with at
    least one such event (a purchase with nothing before it has no input to rank from)."""
    cut = targets.select("user_id", pl.col("timestamp").alias("__cut"))
    inputs = df.join(cut, on="user_id", maintain_order="left").filter(pl.col("timestamp") < pl.col("__cut"))
    kept = targets.join(inputs.select("user_id").unique(), on="user_id", how="semi")
    return inputs, kept


def _next_event_targets(df: pl.DataFrame, start: Any, end: Any) -> tuple[pl.DataFrame, pl.DataFrame]:
    before = df.filter(pl.col("timestamp") < start)
    window = df.filter(pl.col("timestamp") >= start)
    if end is not None:
        window = window.filter(pl.col("timestamp") < end)
    targets = window.group_by("user_id", maintain_order=True).first()
    targets = targets.filter(pl.col("user_id").is_in(before["user_id"].unique().implode()))
    inputs = before.filter(pl.col("user_id").is_in(targets["user_id"].implode()))
    return inputs, targets.select(df.columns)


SPLITS = ("loo", "temporal", "purchase")


def make_split(events: Events | Any, name: str) -> Split:
    """The split called ``name`` (``loo``, ``temporal`` or ``purchase``) with its default settings: what
    ``--holdout`` and ``--split`` mean in the CLI and the pipelines."""
    if name == "loo":
        return leave_one_out(events)
    if name == "temporal":
        return temporal_split(events)
    if name == "purchase":
        return purchase_split(events)
    raise ConfigurationError(
        f"split must be one of {list(SPLITS)}, got {name!r}",
        cli_hint=f"--split must be one of {', '.join(SPLITS)}; got {name!r}",
    )
