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
from datetime import datetime, timedelta
from typing import Any

import numpy as np

from behaviorlm.data.events import action_aliases
from behaviorlm.data.schema import InputSchema
from behaviorlm.data.timestamps import EARLIEST, TIME_UNITS, UTC, latest_plausible, unit_of_magnitude
from behaviorlm.sequence.tokenizer import N_SPECIAL, ActionTokenizer

# ISO-8601 shapes on which datetime.fromisoformat and the file path's polars formats agree
# (checked value by value); anything else takes the full path.
_ISO = re.compile(r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?(?:Z|[+-]\d{2}(?::?\d{2})?)?)?)?")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)
# what a Python datetime holds (years 1-9999): the full path refuses other times by name
_MIN_MICROS, _MAX_MICROS = (
    (datetime.min.replace(tzinfo=UTC) - _EPOCH) // _MICRO,
    (datetime.max.replace(tzinfo=UTC) - _EPOCH) // _MICRO,
)


@dataclass
class EncodedRequest:
    """One request's events as the model sees them."""

    items: np.ndarray
    actions: np.ndarray
    gaps: np.ndarray
    seen: np.ndarray  # vocabulary indices of the known items among the events, unique


class RequestEncoder:
    """Reads ``(item_id, event_type, timestamp)`` triples by a model's schema and vocabulary."""

    def __init__(self, tokenizer: ActionTokenizer, schema: InputSchema):
        self.tok, self.schema = tokenizer, schema
        self.aliases_, self.known_ = action_aliases(schema.action_map)

    def encode(self, user_id: Any, events: list[tuple[Any, str, str | float]]) -> EncodedRequest | None:
        """The encoded events, or ``None`` where only the full validation can answer."""
        items = self._items([e[0] for e in events])
        actions = self._actions([e[1] for e in events])
        micros = self._micros([e[2] for e in events])
        if items is None or actions is None or micros is None:
            return None
        keep = [i for i, a in enumerate(actions) if a is not None]  # unknown_actions="drop"
        if not keep:
            return None
        order = sorted(keep, key=micros.__getitem__)  # stable: ties keep the request's order
        t = np.array([micros[i] for i in order], np.int64)
        seconds = np.r_[np.nan, np.diff(t) / 1e6]
        item_idx = self.tok.lookup_items([items[i] for i in order])
        action_idx = self.tok.lookup_actions([actions[i] for i in order])  # type: ignore[misc]  # None dropped
        enc = self.tok.encode_one(user_id, item_idx, action_idx, seconds)
        seen = np.unique(item_idx)
        return EncodedRequest(enc.items, enc.actions, enc.gaps, seen[seen >= N_SPECIAL])

    def _items(self, raw: list[Any]) -> list[Any] | None:
        """Ids as the file path cleans them: text stripped; blank or (with numeric ids) non-integer -> full path."""
        out = []
        for x in raw:
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

    def _actions(self, raw: list[str]) -> list[str | None] | None:
        """Canonical names; ``None`` marks an event the schema drops; a refused name -> full path."""
        out: list[str | None] = []
        policy = self.schema.unknown_actions
        for name in raw:
            key = name.strip().lower()
            mapped = self.aliases_.get(key, key)
            if policy != "keep" and mapped not in self.known_:
                if policy == "raise":
                    return None
                mapped = None
            out.append(mapped)
        return out

    def _micros(self, raw: list[str | float]) -> list[int] | None:
        """Microseconds since the epoch; numbers in the model's (or their detected) unit."""
        numbers = [float(v) for v in raw if not isinstance(v, str)]
        factor = 0.0
        if numbers:
            unit = self.schema.time_unit
            if unit == "auto":
                detected = unit_of_magnitude(float(np.median(np.abs(numbers))))
                if detected is None:
                    return None
                unit = detected
            factor = TIME_UNITS[unit]
        lo = (EARLIEST - _EPOCH) // _MICRO
        hi = (latest_plausible() - _EPOCH) // _MICRO
        out = []
        for v in raw:
            t = _iso_micros(v) if isinstance(v, str) else _number_micros(v, factor)
            if t is None or (self.schema.plausible_times and not lo <= t <= hi):
                return None
            out.append(t)
        return out


def _number_micros(value: float, factor: float) -> int | None:
    scaled = value * factor
    if not _MIN_MICROS <= scaled <= _MAX_MICROS:
        return None
    return round(scaled)  # half to even, as polars rounds the file path's column


def _iso_micros(text: str) -> int | None:
    text = text.strip()
    if not _ISO.fullmatch(text):
        return None
    dt = datetime.fromisoformat(text)
    dt = dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
    return (dt - _EPOCH) // _MICRO
