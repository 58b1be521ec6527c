"""The lean path for a request's raw events: validated and encoded in plain Python and numpy.

A live session sends its last few dozen events with every request. Building a one-user polars
frame, validating it and encoding it cost ~10 ms of CPU per request (benchmarks/RESULTS.md
section 8), ten times the model's own forward pass. For payloads this small (at most
:data:`~behaviorlm.service.api.MAX_EVENTS` events) plain Python over the model's own
vocabulary and input schema is far cheaper.

The rules are the file path's, taken from the same definitions rather than copied: action names
through :func:`~behaviorlm.data.events.action_aliases` and the schema's unknown-action policy,
numeric times through :func:`~behaviorlm.data.timestamps.unit_of_magnitude`, item ids through
:meth:`~behaviorlm.sequence.tokenizer.ActionTokenizer.lookup_items`, and the sequence through
:meth:`~behaviorlm.sequence.tokenizer.ActionTokenizer.encode_one`. Only the happy path is lean:
a request this path cannot read with certainty -- an unusual time string, times whose unit the
magnitude does not settle, an implausible time, an action the schema refuses -- returns
``None`` and the caller validates it the full way, so every answer and every error message is the
one the batch path gives (tested on the same payloads).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from behaviorlm.data.events import action_aliases
from behaviorlm.data.schema import InputSchema
from behaviorlm.data.timestamps import (
    PY_MAX_MICROS,
    PY_MIN_MICROS,
    TIME_UNITS,
    UTC,
    plausible_micros,
    unit_of_magnitude,
    unix_micros,
)
from behaviorlm.sequence.tokenizer import N_SPECIAL, UNK, ActionTokenizer

# ISO-8601 shapes on which datetime.fromisoformat and the file path's polars formats agree
# (checked value by value); anything else takes the full path.
_ISO = re.compile(r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?(?:Z|[+-]\d{2}(?::?\d{2})?)?)?)?")


@dataclass
class EncodedRequest:
    """One request's events as the model sees them."""

    items: np.ndarray
    actions: np.ndarray
    gaps: np.ndarray
    seen: np.ndarray  # vocabulary indices of the known items among the events, unique
    new_codes: np.ndarray | None = None  # per position: code of an item outside the vocabulary, else -1
    new_ids: list[Any] | None = None  # code -> original id
    last_time: float | None = None  # the newest event's time (epoch seconds): a request-time model's input


class RequestEncoder:
    """Reads ``(item_id, event_type, timestamp)`` triples by a model's schema and vocabulary."""

    def __init__(self, tokenizer: ActionTokenizer, schema: InputSchema):
        self.tok, self.schema = tokenizer, schema
        self.aliases_, self.known_ = action_aliases(schema.action_map)

    def encode(self, user_id: Any, events: list[tuple[Any, str, str | float]]) -> EncodedRequest | None:
        """The encoded events, or ``None`` where only the full validation can answer."""
        raw_items, names, stamps = zip(*events, strict=True)
        actions = self._actions(names)
        items = actions if self.schema.event_only else self._items(raw_items)  # event-only: the name is the token
        micros = self._micros(stamps)
        if items is None or actions is None or micros is None:
            return None
        keep = np.flatnonzero([a is not None for a in actions])  # unknown_actions="drop"
        if not len(keep):
            return None
        order = keep[np.argsort(micros[keep], kind="stable")]  # ties keep the request's order
        seconds = np.r_[np.nan, np.diff(micros[order]) / 1e6]
        ordered = [items[i] for i in order]
        item_idx = self.tok.lookup_items(ordered)
        action_idx = self.tok.lookup_actions([actions[i] for i in order])  # type: ignore[misc,unused-ignore]
        codes, new_ids = _new_codes(ordered, item_idx)
        enc = self.tok.encode_one(user_id, item_idx, action_idx, seconds, codes)
        seen = np.unique(item_idx)
        newest = float(micros[order[-1]]) / 1e6 if len(order) else None
        return EncodedRequest(enc.items, enc.actions, enc.gaps, seen[seen >= N_SPECIAL], enc.new_codes, new_ids, newest)

    def _items(self, raw: tuple[Any, ...]) -> tuple[Any, ...] | list[Any] | None:
        """Ids as the file path cleans them: text stripped; blank or (with numeric ids) non-integer -> full path."""
        if not any(isinstance(x, str) or x is None for x in raw):
            return raw
        out = []
        for x in raw:
            if x is None:  # a missing id: the full path names it
                return None
            if isinstance(x, str):
                x = x.strip()
                if not x:
                    return None
                if self.schema.numeric_ids:
                    try:
                        x = int(x)
                    except ValueError:
                        return None
            out.append(x)
        return out

    def _actions(self, raw: tuple[str, ...]) -> list[str | None] | None:
        """Canonical names; ``None`` marks an event the schema drops; a refused name -> full path.
        A session repeats a handful of names, so each distinct one is read once per request."""
        read = {name: self._action(name) for name in set(raw)}
        if any(v is _REFUSED for v in read.values()):
            return None
        return [read[name] for name in raw]  # type: ignore[misc]

    def _action(self, name: str) -> str | None | object:
        key = name.strip().lower()
        mapped = self.aliases_.get(key, key)
        if self.schema.unknown_actions == "keep" or self.schema.event_only or mapped in self.known_:
            return mapped
        return _REFUSED if self.schema.unknown_actions == "raise" else None

    def _micros(self, raw: tuple[str | float, ...]) -> np.ndarray | None:
        """Microseconds since the epoch; numbers in the model's (or their detected) unit."""
        is_text = np.fromiter((isinstance(v, str) for v in raw), bool, len(raw))
        numbers = np.array([v for v, t in zip(raw, is_text, strict=True) if not t], np.float64)
        micros = np.zeros(len(raw), np.int64)
        if len(numbers):
            unit = self.schema.time_unit
            if unit == "auto":
                unit = unit_of_magnitude(float(np.median(np.abs(numbers))))  # type: ignore[assignment]
                if unit is None:
                    return None
            scaled = numbers * TIME_UNITS[unit]
            if not ((scaled >= PY_MIN_MICROS) & (scaled <= PY_MAX_MICROS)).all():
                return None
            micros[~is_text] = np.rint(scaled)  # half to even, as polars rounds the file path's column
        for i in np.flatnonzero(is_text):
            t = _iso_micros(raw[i])  # type: ignore[arg-type]
            if t is None:
                return None
            micros[i] = t
        if self.schema.plausible_times and not plausible_micros(micros):
            return None
        return micros


_REFUSED = object()  # an action name the schema's "raise" policy refuses


def _new_codes(items: list[Any], item_idx: np.ndarray) -> tuple[np.ndarray, list[Any]]:
    """Codes of the items outside the vocabulary (-1 for the rest) and the code -> id table."""
    table: dict[Any, int] = {}
    codes = [table.setdefault(i, len(table)) if x == UNK else -1 for i, x in zip(items, item_idx.tolist(), strict=True)]
    return np.asarray(codes, np.int64), list(table)


def _iso_micros(text: str) -> int | None:
    text = text.strip()
    if not _ISO.fullmatch(text):
        return None
    dt = datetime.fromisoformat(text)
    dt = dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
    return unix_micros(dt)
