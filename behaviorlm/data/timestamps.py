"""The one place timestamps are coerced: columns to ``Datetime(us, UTC)``, scalars to aware datetimes.

Every layer that takes a time from a user (event columns, API request events, split and
cutoff times, pipeline dates) goes through here, so "naive means UTC" and "numbers are unix
times in ``time_unit``" hold everywhere alike.
"""

from __future__ import annotations

import time
from datetime import date, datetime, timedelta, timezone
from typing import Any, cast

import numpy as np
import polars as pl

from behaviorlm.errors import InputDataError

UTC = timezone.utc  # datetime.UTC is 3.11+; the other modules import this one

TIME_UNITS = {"s": 1_000_000, "ms": 1_000, "us": 1, "ns": 0.001}  # microseconds per unit
AUTO = "auto"
#: Plausible event times: nothing before 1990 (a unit mistake or a default date), nothing past
#: tomorrow (clock skew of a day is tolerated). ``validate_events(plausible_times=False)`` lifts it.
EARLIEST = datetime(1990, 1, 1, tzinfo=UTC)
#: ISO-8601 shapes tried value by value, so a few garbage strings never spoil the valid ones.
ISO_FORMATS = (
    "%Y-%m-%dT%H:%M:%S%.f%#z",
    "%Y-%m-%d %H:%M:%S%.f%#z",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%dT%H:%M",
    "%Y-%m-%d %H:%M",
    "%Y-%m-%d",
)


def unix_micros(value: datetime) -> int:
    """An aware ``datetime`` as integer microseconds since 1970 (the physical value of a
    ``Datetime(us, UTC)`` column)."""
    return (value - _EPOCH) // _MICROSECOND


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
#: The microseconds a Python ``datetime`` can hold (years 1 to 9999): a column value outside
#: cannot be read out as one (a number in the wrong unit lands there), so it is refused by name.
PY_MIN_MICROS = unix_micros(datetime.min.replace(tzinfo=UTC))
PY_MAX_MICROS = unix_micros(datetime.max.replace(tzinfo=UTC))


def check_time_unit(time_unit: str) -> str:
    if time_unit != AUTO and time_unit not in TIME_UNITS:
        raise InputDataError(
            f"time unit must be 'auto' or one of {list(TIME_UNITS)}, got {time_unit!r}",
            cli_hint=f"--time-unit must be one of {list(TIME_UNITS)} (default: detected from the values)",
        )
    return time_unit


def latest_plausible() -> datetime:
    return datetime.fromtimestamp(time.time(), UTC) + timedelta(days=1)


def plausible_window() -> tuple[datetime, datetime]:
    """The first and the last plausible event time (1990, and tomorrow as of now): the one
    rule files, request events and the lean request path apply."""
    return EARLIEST, latest_plausible()


def implausible(times: pl.Series) -> pl.Series:
    """Per value of a ``Datetime`` column: outside :func:`plausible_window`."""
    first, last = plausible_window()
    return (times < first) | (times > last)


def plausible_micros(micros: Any) -> bool:
    """Whether every value of ``micros`` (unix microseconds; a number or a numpy array) is plausible."""
    first, last = plausible_window()
    values = np.asarray(micros)
    return bool(values.size == 0 or (values.min() >= unix_micros(first) and values.max() <= unix_micros(last)))


def last_time(column: pl.Series) -> datetime:
    """The latest value of a ``Datetime`` column as an aware datetime, typed for time arithmetic."""
    value = column.max()
    if not isinstance(value, datetime):
        raise InputDataError(f"column {column.name!r} holds no timestamps")
    return value


def plausible_range(unit: str) -> tuple[float, float]:
    """The values a plausible event time takes in ``unit`` (1990 to tomorrow)."""
    per_s = 1e6 / TIME_UNITS[unit]
    return EARLIEST.timestamp() * per_s, latest_plausible().timestamp() * per_s


def unit_of_magnitude(median: float) -> str | None:
    """The unit of unix time whose plausible range holds ``median`` (an absolute value), if any."""
    for unit in TIME_UNITS:
        lo, hi = plausible_range(unit)
        if lo <= median <= hi:
            return unit
    return None


def detect_time_unit(values: pl.Series, column: str) -> str:
    """The unit whose plausible range holds the median magnitude; the ranges of s, ms, us and ns
    are a factor of 1000 apart and never overlap, so at most one fits."""
    median = cast("float | None", values.cast(pl.Float64).abs().median())  # a Float64 median
    if median is None:
        return "s"
    unit = unit_of_magnitude(median)
    if unit is not None:
        return unit
    ranges = ", ".join(f"{u} [{lo:.2g}, {hi:.2g}]" for u in TIME_UNITS for lo, hi in [plausible_range(u)])
    raise InputDataError(
        f"column {column!r}: numeric timestamps from {values.min()!s} to {values.max()!s} (median {median:.6g}) "
        f"fit no unit of unix time between 1990 and tomorrow ({ranges})",
        hint="pass time_unit='s' (or 'ms', 'us', 'ns') and plausible_times=False for older or synthetic times",
        cli_hint="pass --time-unit s|ms|us|ns, and --any-time for times before 1990 or in the future",
    )


def parse_timestamps(col: pl.Series, time_unit: str = AUTO) -> pl.Series:
    """Any sensible timestamp column -> Datetime(us, UTC), value by value: what cannot be parsed
    becomes null (and is reported by the caller), never the whole column.

    Numbers (or numeric strings) are unix times in ``time_unit``; ``"auto"`` detects the unit from
    their magnitude. A string column that is mostly numeric is read as numbers (the rest null);
    otherwise each value is tried against the ISO-8601 shapes in :data:`ISO_FORMATS`."""
    dtype = col.dtype
    if dtype == pl.Datetime:
        tz = getattr(dtype, "time_zone", None)
        out = col.dt.replace_time_zone("UTC") if tz is None else col.dt.convert_time_zone("UTC")
        return out.dt.cast_time_unit("us")
    if dtype == pl.Date:
        return col.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    if dtype.is_numeric():
        unit = detect_time_unit(col.drop_nulls(), col.name) if check_time_unit(time_unit) == AUTO else time_unit
        micros = (col.cast(pl.Float64) * TIME_UNITS[unit]).round(0)
        micros = micros.set(micros.abs() > 9.2e18, None).cast(pl.Int64, strict=False)  # beyond Int64: unparseable
        return micros.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    if dtype == pl.String:
        stripped = col.str.strip_chars().replace("", None)
        numeric = stripped.cast(pl.Float64, strict=False)
        n_numeric, n_given = numeric.is_not_null().sum(), stripped.is_not_null().sum()
        if n_numeric and 2 * n_numeric >= n_given:  # unix times; the few non-numbers are bad values
            return parse_timestamps(numeric.rename(col.name), time_unit)
        out = pl.Series(col.name, [None] * len(stripped), dtype=pl.Datetime("us", "UTC"))
        for fmt in ISO_FORMATS:  # most files use one shape: stop as soon as every value has parsed
            out = out.fill_null(
                stripped.str.to_datetime(fmt, strict=False, exact=True, time_unit="us", time_zone="UTC")
            )
            if out.null_count() == stripped.null_count():
                break
        return out
    raise InputDataError(f"column {col.name!r}: cannot interpret dtype {dtype} as timestamps")


def to_utc(value: Any, what: str = "time", time_unit: str = AUTO) -> datetime:
    """One time value -> an aware UTC ``datetime``.

    Accepts an aware or naive ``datetime`` (naive = UTC), a ``date``, an ISO-8601 string such as
    ``'2017-12-03'`` or ``'2017-12-03T12:00:00Z'``, or a number of unix time in ``time_unit`` --
    by default detected from its magnitude, as :func:`parse_timestamps` reads a file's column,
    so ``1512259200`` and ``1512259200000`` are the same time.
    """
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    if isinstance(value, int | float) and not isinstance(value, bool):
        parsed = parse_timestamps(pl.Series(what, [float(value)]), time_unit)[0]
        if parsed is None:
            raise InputDataError(f"{what} {value!r} is not a unix time")
        return parsed
    if isinstance(value, str):
        parsed = pl.Series([value.strip()]).str.to_datetime(strict=False, time_unit="us", time_zone="UTC")
        if parsed.is_not_null().all():
            return parsed.item()
    raise InputDataError(f"{what} {value!r} is not a date/time such as '2017-12-03' or '2017-12-03T12:00:00Z'")
