"""Raw interaction events -> one validated, canonical polars frame.

Everything downstream (tokenizer, evaluation, scoring) trusts this contract, so all the
checking happens here, once:

* canonical columns ``user_id, item_id, event_type, timestamp`` (+ optional ``session_id`` and
  the per-event values ``amount, quantity``, finite numbers >= 0 or null when unknown); ids keep
  their original values and dtype, ``timestamp`` is ``Datetime(us, UTC)``; an *event-only* log
  (no item column) has ``item_id`` = its event name, and keeps event names outside the canonical
  set (``catalog``, ``payment_done``): there the names are the whole vocabulary;
* rows sorted by ``(user_id, timestamp)`` with the input order kept for ties (ratings given
  in the same second stay in file order), so "the last event" is well defined;
* every problem either raises :class:`EventsError` naming the column and an example row, or
  -- when the caller asked for ``invalid="drop"`` -- is counted in :class:`ValidationReport`.
  Nothing is ever dropped silently.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import polars as pl

from behaviorlm.data.schema import ActionPolicy, ColumnMapping, InputSchema
from behaviorlm.data.timestamps import implausible, last_time, parse_timestamps, plausible_window
from behaviorlm.errors import InputDataError

log = logging.getLogger(__name__)

CANONICAL_ACTIONS: tuple[str, ...] = (
    "view",
    "add_to_cart",
    "remove_from_cart",
    "add_to_favorites",
    "purchase",
    "rate",
    "interaction",
)

#: Vocabulary of the bundled datasets (and common trackers) mapped to canonical names.
DEFAULT_ACTION_ALIASES: dict[str, str] = {
    "pv": "view",
    "click": "view",
    "clicks": "view",
    "view_product": "view",
    "product_view": "view",
    "page_view": "view",
    "cart": "add_to_cart",
    "carts": "add_to_cart",
    "addtocart": "add_to_cart",
    "add_to_basket": "add_to_cart",
    "fav": "add_to_favorites",
    "favorite": "add_to_favorites",
    "favourite": "add_to_favorites",
    "wishlist": "add_to_favorites",
    "buy": "purchase",
    "order": "purchase",
    "orders": "purchase",
    "transaction": "purchase",
    "checkout": "purchase",
    "rating": "rate",
}

CANONICAL_COLUMNS = ("user_id", "item_id", "event_type", "timestamp")
VALUE_COLUMNS = ("amount", "quantity")  # optional per-event numbers, after the canonical columns

Policy = Literal["raise", "drop"]
__all__ = ["ColumnMapping", "Events", "EventsError", "InputSchema", "ValidationReport", "validate_events"]


class EventsError(InputDataError):
    """Bad event input. The message names the column and shows an example row."""


@dataclass
class ValidationReport:
    """What validation did to the input: rows in, rows out, and why each dropped row went."""

    n_input_rows: int
    n_output_rows: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def drop(self, reason: str, count: int) -> None:
        if count:
            self.dropped[reason] = self.dropped.get(reason, 0) + count

    def summary(self) -> str:
        parts = [f"{self.n_input_rows:,} rows in, {self.n_output_rows:,} kept"]
        parts += [f"dropped {n:,} ({why})" for why, n in self.dropped.items()]
        parts += self.notes
        return "; ".join(parts)


@dataclass
class Events:
    """A validated event log: the canonical frame, the report of how it was made, and the schema
    that mapped the source onto the contract (``None`` for frames the library made itself)."""

    df: pl.DataFrame
    report: ValidationReport
    schema: InputSchema | None = None

    def __len__(self) -> int:
        return self.df.height

    @property
    def n_users(self) -> int:
        return self.df["user_id"].n_unique()

    @property
    def n_items(self) -> int:
        return self.df["item_id"].n_unique()

    @property
    def actions(self) -> list[str]:
        return sorted(self.df["event_type"].unique().to_list())

    @property
    def end(self) -> datetime:
        """The last event's time (validated logs are never empty, so this is always a datetime)."""
        return last_time(self.df["timestamp"])

    def derive(self, df: pl.DataFrame, note: str) -> Events:
        """Wrap a subset of these (already validated) events without validating them again."""
        return Events(df=df, report=ValidationReport(self.df.height, df.height, notes=[note]), schema=self.schema)

    @classmethod
    def trusted(cls, df: pl.DataFrame, note: str) -> Events:
        """Wrap a frame this library produced in canonical form (e.g. a saved model's histories)."""
        return cls(df=df, report=ValidationReport(df.height, df.height, notes=[note]))


# --------------------------------------------------------------------------- reading


#: The file names read as tables (case-insensitive), and the format each means.
TABLE_FORMATS = {
    ".parquet": "parquet", ".pq": "parquet",
    ".csv": "csv", ".csv.gz": "csv", ".txt": "csv", ".txt.gz": "csv",
    ".tsv": "tsv", ".tsv.gz": "tsv",
}  # fmt: skip


def table_format(path: str | Path) -> str | None:
    """``parquet``, ``csv`` or ``tsv`` for a file name behaviorlm reads (any letter case), else None."""
    name = Path(path).name.lower()
    return next((fmt for suffix, fmt in TABLE_FORMATS.items() if name.endswith(suffix)), None)


def read_table(source: Any, what: str = "events") -> pl.DataFrame:
    """Read CSV/TSV (optionally gzipped), Parquet, a polars or a pandas frame into polars."""
    if isinstance(source, pl.DataFrame):
        return source
    if isinstance(source, pl.LazyFrame):
        return source.collect()
    if type(source).__module__.startswith("pandas"):
        return pl.from_pandas(source)
    if not isinstance(source, str | Path):
        raise EventsError(f"{what}: expected a path, a polars or a pandas DataFrame, got {type(source).__name__}")
    path = Path(source)
    if not path.exists():
        raise EventsError(f"{what}: file not found: {path}")
    fmt = table_format(path)
    if fmt is not None and path.is_file() and path.stat().st_size == 0:
        raise EventsError(f"{what}: {path} is empty (0 bytes)")
    try:
        if fmt == "parquet":
            return pl.read_parquet(path)
        if fmt is not None:
            # every column as the text written: ids are identifiers ("007" is not 7), and no type
            # guess depends on where in the file a value first appears; validation parses the rest
            return pl.read_csv(path, separator="\t" if fmt == "tsv" else ",", infer_schema=False)
    except (pl.exceptions.PolarsError, OSError) as exc:  # corrupt file, mixed types, ...
        raise EventsError(f"{what}: could not read {path}: {exc}") from exc
    raise EventsError(f"{what}: unsupported file type {path.name!r} (use .csv[.gz], .tsv or .parquet)")


def _example_row(df: pl.DataFrame, mask: pl.Series) -> str:
    """The first bad row, numbered as in the input (0-based, header excluded)."""
    idx = int(mask.arg_true()[0])
    row = df.row(idx, named=True)
    original = row.pop("__row", idx)
    return f"row {original} (0-based, header excluded): {row}"


def _fail_or_drop(
    df: pl.DataFrame, bad: pl.Series, message: str, policy: Policy, report: ValidationReport, reason: str
) -> pl.DataFrame:
    """Raise with an example row, or drop the bad rows and count them."""
    n_bad = int(bad.sum())
    if n_bad == 0:
        return df
    if policy == "raise":
        raise EventsError(f"{message}: {n_bad:,} row(s); first at {_example_row(df, bad)}")
    report.drop(reason, n_bad)
    return df.filter(~bad)


# --------------------------------------------------------------------------- parsing


def _require_columns(df: pl.DataFrame, needed: Mapping[str, str | None], what: str) -> None:
    missing = [f"{field_}={col!r}" for field_, col in needed.items() if col and col not in df.columns]
    if missing:
        raise EventsError(
            f"{what}: missing column(s) {', '.join(missing)}; available columns: {df.columns}",
            hint="pass the right names with ColumnMapping(user=..., item=..., action=..., timestamp=...)",
            cli_hint="pass the right names with --user-col/--item-col/--action-col/--time-col",
        )


def action_aliases(action_map: Mapping[str, str] | None) -> tuple[dict[str, str], frozenset[str]]:
    """(alias -> canonical name, every known canonical name) for a schema's ``action_map``.

    The one definition of how action names are read: files (below) and the service's lean
    request path (``behaviorlm.service.request_events``) both use it, each value stripped and
    lower-cased first.
    """
    aliases = {**DEFAULT_ACTION_ALIASES, **{k.strip().lower(): v for k, v in (action_map or {}).items()}}
    return aliases, frozenset(CANONICAL_ACTIONS) | frozenset(aliases.values())


#: Word parts that say which canonical action an unknown name most likely means (the remedy
#: an unknown-action error suggests: ``basket`` -> ``add_to_cart``).
_ACTION_HINTS = (
    (("cart", "basket", "bag"), "add_to_cart"),
    (("remove", "delete"), "remove_from_cart"),
    (("fav", "wish", "like", "save", "bookmark"), "add_to_favorites"),
    (("buy", "order", "purchase", "checkout", "pay", "transaction", "sale"), "purchase"),
    (("rate", "rating", "review", "star"), "rate"),
    (("view", "click", "visit", "pv", "detail", "impression", "open"), "view"),
)


def suggested_action(name: str) -> str:
    """The canonical action an unknown action name most likely means (``interaction`` if none)."""
    low = name.lower()
    return next((action for parts, action in _ACTION_HINTS if any(p in low for p in parts)), "interaction")


def _normalise_actions(
    df: pl.DataFrame,
    action_map: Mapping[str, str] | None,
    unknown_actions: ActionPolicy,
    report: ValidationReport,
    column: str = "event_type",
) -> pl.DataFrame:
    aliases, known = action_aliases(action_map)
    raw = df["event_type"].cast(pl.String).str.strip_chars().str.to_lowercase()
    mapped = raw.replace(aliases)
    if unknown_actions == "keep":
        return df.with_columns(event_type=mapped)
    bad = mapped.is_not_null() & ~mapped.is_in(sorted(known))
    if bad.any():
        names = sorted(set(raw.filter(bad).unique().to_list()))[:10]
        msg = f"column {column!r}: unknown action name(s) {names}; known: {sorted(known)}"
        if unknown_actions == "raise":
            n_bad = int(bad.sum())
            guess = ",".join(f"{n}={suggested_action(n)}" for n in names[:3])
            raise EventsError(
                f"{msg}: {n_bad:,} row(s); first at {_example_row(df, bad)}",
                hint=f"map them with action_map={{{names[0]!r}: {suggested_action(names[0])!r}, ...}} or keep "
                "them as their own action type with unknown_actions='keep'",
                cli_hint=f"map them with --action-map '{guess}' or keep them as their own action type with "
                "--unknown-actions keep",
            )
        df = _fail_or_drop(df, bad, msg, "drop", report, "unknown action")
        mapped = mapped.filter(~bad)
    return df.with_columns(event_type=mapped)


def validate_events(
    source: Any,
    mapping: ColumnMapping | None = None,
    *,
    action_map: Mapping[str, str] | None = None,
    unknown_actions: ActionPolicy = "raise",
    invalid: Policy = "raise",
    duplicates: Literal["drop", "keep", "raise"] = "drop",
    time_unit: str = "auto",
    default_action: str = "interaction",
    plausible_times: bool = True,
    numeric_ids: bool = False,
) -> Events:
    """Validate and normalise raw events; see the module docstring for the contract.

    ``invalid`` governs null ids, null actions and unparseable timestamps; ``duplicates``
    governs rows identical in (user, item, action, timestamp). See :class:`InputSchema` for
    ``time_unit``, ``plausible_times`` and ``numeric_ids``. The returned events remember the
    schema applied, so a model trained on them applies it again by default.
    """
    m = mapping or ColumnMapping()
    schema = InputSchema(
        m, dict(action_map or {}), unknown_actions, time_unit, default_action, plausible_times, numeric_ids
    )
    raw = read_table(source, "events")
    _require_columns(
        raw,
        {
            "user": m.user,
            "item": m.item,
            "action": m.action,
            "timestamp": m.timestamp,
            "session": m.session,
            "amount": m.amount,
            "quantity": m.quantity,
        },
        "events",
    )
    report = ValidationReport(n_input_rows=raw.height)
    if raw.height == 0:
        raise EventsError("events: the input has no rows")

    cols = {"user_id": pl.col(m.user), "timestamp_raw": pl.col(m.timestamp)}
    if m.item:
        cols["item_id"] = pl.col(m.item)
    cols["event_type"] = pl.col(m.action).cast(pl.String) if m.action else pl.lit(default_action)
    for name, src in (("session_id", m.session), ("amount", m.amount), ("quantity", m.quantity)):
        if src:
            cols[name] = pl.col(src)
    df = raw.select(**cols).with_row_index("__row")

    df = _clean_ids(df, m, numeric_ids)
    for name, src in (("user_id", m.user), ("item_id", m.item), ("event_type", m.action)):
        if src:
            bad = df[name].is_null()
            df = _fail_or_drop(df, bad, f"column {src!r}: null {name}", invalid, report, f"null {name}")

    df = df.with_columns(timestamp=parse_timestamps(df["timestamp_raw"].rename(m.timestamp), time_unit))
    bad = df["timestamp"].is_null()
    df = _fail_or_drop(
        df, bad, f"column {m.timestamp!r}: null or unparseable timestamp", invalid, report, "unparseable timestamp"
    )
    if plausible_times:
        first, last = plausible_window()
        bad = implausible(df["timestamp"])
        message = f"column {m.timestamp!r}: implausible timestamp (before {first:%Y-%m-%d} or after {last:%Y-%m-%d})"
        df = _fail_or_drop(df, bad, message, invalid, report, "implausible timestamp")
    df = df.drop("timestamp_raw")
    df = _values(df, m, invalid, report)

    if m.item is None:  # event-only: the names are the vocabulary, and each is its own token
        df = _normalise_actions(df, action_map, "keep", report)
        df = df.with_columns(item_id=pl.col("event_type"))
    else:
        df = _normalise_actions(df, action_map, unknown_actions, report, m.action or "event_type")
    df = _dedupe(df, duplicates, report)
    df = _sort(df, report)
    report.n_output_rows = df.height
    if df.height == 0:
        raise EventsError(f"events: no valid rows left ({report.summary()})")
    order = [c for c in (*CANONICAL_COLUMNS, "session_id", *VALUE_COLUMNS) if c in df.columns]
    out = Events(df=df.select(order), report=report, schema=schema)
    if report.n_dropped:
        log.warning("events: %s", report.summary())
    return out


def _values(df: pl.DataFrame, m: ColumnMapping, invalid: Policy, report: ValidationReport) -> pl.DataFrame:
    """Amount and quantity as Float64: blank or null means unknown; text that is not a number,
    infinities and negative values are bad rows (a refund is an event type of its own)."""
    for name, src in (("amount", m.amount), ("quantity", m.quantity)):
        if not src:
            continue
        col = df[name]
        if col.dtype == pl.String:
            col = col.str.strip_chars().replace("", None)
        value = col.cast(pl.Float64, strict=False)
        bad = (value.is_null() & col.is_not_null()) | ~value.is_finite().fill_null(True) | (value < 0).fill_null(False)
        message = f"column {src!r}: {name} must be a finite number >= 0 (blank when unknown)"
        df = _fail_or_drop(df, bad, message, invalid, report, f"bad {name}")  # the row as written
        df = df.with_columns(value.filter(~bad).alias(name))
    return df


def _clean_ids(df: pl.DataFrame, m: ColumnMapping, numeric_ids: bool) -> pl.DataFrame:
    """Text ids keep their characters but lose surrounding spaces, and blank ids are null ids;
    with ``numeric_ids`` they must be integers (the first one that is not names its row)."""
    for name, src in (("user_id", m.user), ("item_id", m.item)):
        if not src:
            continue
        col = df[name]
        if col.dtype == pl.String:
            col = col.str.strip_chars().replace("", None)
        if numeric_ids and not col.dtype.is_integer():
            as_int = col.cast(pl.Int64, strict=False)
            bad = as_int.is_null() & col.is_not_null()
            if bad.any():
                raise EventsError(
                    f"column {src!r}: ids were declared numeric but {int(bad.sum()):,} are not integers; "
                    f"first at {_example_row(df, bad)}",
                    cli_hint="drop --numeric-ids to read ids as the text written",
                )
            col = as_int
        df = df.with_columns(col.alias(name))
    return df


def _dedupe(df: pl.DataFrame, policy: str, report: ValidationReport) -> pl.DataFrame:
    if policy == "keep":
        return df
    key = ["user_id", "item_id", "event_type", "timestamp", *(c for c in VALUE_COLUMNS if c in df.columns)]
    dup = df.select(pl.struct(key).is_duplicated() & ~pl.struct(key).is_first_distinct()).to_series()
    if policy == "raise":
        return _fail_or_drop(df, dup, "columns (user, item, action, timestamp): duplicate event", "raise", report, "")
    report.drop("exact duplicate", int(dup.sum()))
    return df.filter(~dup)


def _sort(df: pl.DataFrame, report: ValidationReport) -> pl.DataFrame:
    """Sort by (user, time), keeping input order for ties; note if the input was unsorted."""
    sorted_df = df.sort(["user_id", "timestamp", "__row"], maintain_order=True)
    within_user = df.with_columns(
        (pl.col("timestamp").diff().over("user_id") < pl.duration(microseconds=0)).alias("__back")
    )["__back"].sum()
    if within_user:
        report.notes.append(f"{within_user:,} event(s) were out of time order within their user; sorted")
    return sorted_df.drop("__row")


def as_events(data: Any, schema: InputSchema | None = None, **kwargs: Any) -> Events:
    """The public boundary: an :class:`Events` passes as is; anything else is validated once
    (with ``schema`` when given, e.g. the one a model was trained with)."""
    if isinstance(data, Events):
        return data
    if schema is not None:
        return validate_schema(data, schema, **kwargs)
    return validate_events(data, **kwargs)


def validate_schema(source: Any, schema: InputSchema, **kwargs: Any) -> Events:
    """:func:`validate_events` with everything an :class:`InputSchema` fixes taken from it."""
    return validate_events(
        source,
        schema.columns,
        action_map=schema.action_map,
        unknown_actions=schema.unknown_actions,
        time_unit=schema.time_unit,
        default_action=schema.default_action,
        plausible_times=schema.plausible_times,
        numeric_ids=schema.numeric_ids,
        **kwargs,
    )


def require_events(data: Any, what: str = "events") -> Events:
    """Inner layers take validated :class:`Events` only; anything else is a programming error."""
    if not isinstance(data, Events):
        raise TypeError(f"{what}: expected validated Events (see behaviorlm.data.events.as_events), got {type(data)}")
    return data


# --------------------------------------------------------------------------- items


def validate_items(
    source: Any,
    *,
    item_col: str = "item_id",
    title_col: str | None = "title",
    category_col: str | None = "category",
    brand_col: str | None = "brand",
    price_col: str | None = "price",
) -> pl.DataFrame:
    """Item metadata -> ``item_id`` plus whichever of title/category/brand/price exist.

    Optional columns that are absent are simply left out; ``item_id`` must be present,
    non-null and unique (a duplicated id would make explanations ambiguous).
    """
    raw = read_table(source, "items")
    _require_columns(raw, {"item": item_col}, "items")
    wanted = {"item_id": item_col, "title": title_col, "category": category_col, "brand": brand_col, "price": price_col}
    df = raw.select([pl.col(src).alias(dst) for dst, src in wanted.items() if src and src in raw.columns])
    bad = df["item_id"].is_null()
    _fail_or_drop(df, bad, f"items: column {item_col!r}: null item id", "raise", ValidationReport(df.height), "")
    dup = df["item_id"].is_duplicated()
    _fail_or_drop(df, dup, f"items: column {item_col!r}: duplicated item id", "raise", ValidationReport(df.height), "")
    if "price" in df.columns:
        price = df["price"].cast(pl.Float64, strict=False)
        bad = price.is_null() & df["price"].is_not_null()
        _fail_or_drop(df, bad, "items: column 'price': not a number", "raise", ValidationReport(df.height), "")
        df = df.with_columns(price=price)
    return df


def events_digest(ev: Events) -> str:
    """Order-independent fingerprint of an event log (to tie a model to its split).

    Row hashes are polars's, stable within a polars version; a mismatch only warns.
    """
    h = ev.df.select("user_id", "item_id", "event_type", "timestamp").hash_rows(seed=0)
    return f"{int(h.sum()) % (1 << 64):016x}-{ev.df.height}"
