"""The one place timestamps are coerced: columns to ``Datetime(us, UTC)``, scalars to aware datetimes.

Every layer that takes a time from a user (event columns, API request events, split and
cutoff times, pipeline dates) goes through here, so "naive means UTC" and "numbers are unix
times in ``time_unit``" hold everywhere alike.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import polars as pl

from behaviorlm.errors import InputDataError

TIME_UNITS = {"s": 1_000_000, "ms": 1_000, "us": 1, "ns": 0.001}  # microseconds per unit


def check_time_unit(time_unit: str) -> str:
    if time_unit not in TIME_UNITS:
        raise InputDataError(f"time unit must be one of {list(TIME_UNITS)}, got {time_unit!r}")
    return time_unit


def parse_timestamps(col: pl.Series, time_unit: str = "s") -> pl.Series:
    """Any sensible timestamp column -> Datetime(us, UTC); unparseable values become null."""
    dtype = col.dtype
    if dtype == pl.Datetime:
        tz = getattr(dtype, "time_zone", None)
        out = col.dt.replace_time_zone("UTC") if tz is None else col.dt.convert_time_zone("UTC")
        return out.dt.cast_time_unit("us")
    if dtype == pl.Date:
        return col.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    if dtype.is_numeric():
        scale = TIME_UNITS[check_time_unit(time_unit)]
        micros = (col.cast(pl.Float64) * scale).round(0).cast(pl.Int64, strict=False)
        return micros.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    if dtype == pl.String:
        stripped = col.str.strip_chars()
        numeric = stripped.cast(pl.Float64, strict=False)
        if numeric.null_count() == stripped.null_count():  # all-numeric strings: unix times
            return parse_timestamps(numeric, time_unit)
        return stripped.str.to_datetime(strict=False, time_unit="us", time_zone="UTC")
    raise InputDataError(f"column {col.name!r}: cannot interpret dtype {dtype} as timestamps")


def to_utc(value: Any, what: str = "time") -> datetime:
    """One time value -> an aware UTC ``datetime``.

    Accepts an aware or naive ``datetime`` (naive = UTC), a ``date``, an ISO-8601 string such as
    ``'2017-12-03'`` or ``'2017-12-03T12:00:00Z'``, or a number of unix seconds.
    """
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        parsed = pl.Series([value.strip()]).str.to_datetime(strict=False, time_unit="us", time_zone="UTC")
        if parsed.is_not_null().all():
            return parsed.item()
    raise InputDataError(f"{what} {value!r} is not a date/time such as '2017-12-03' or '2017-12-03T12:00:00Z'")
