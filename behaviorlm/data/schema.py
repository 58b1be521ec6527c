"""The input schema: how a user's raw event files map onto the canonical event contract.

A model stores the schema it was trained with (column names, action map, what to do with
unknown actions, the unit of numeric timestamps), so evaluating, scoring, serving or
explaining the same kind of file needs no option repeated; an explicit option still wins
(:meth:`InputSchema.override`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from behaviorlm.data.timestamps import check_time_unit
from behaviorlm.errors import ConfigurationError

ActionPolicy = Literal["raise", "drop", "keep"]
ACTION_POLICIES = ("raise", "drop", "keep")


@dataclass(frozen=True)
class ColumnMapping:
    """Which input column holds each canonical field.

    ``action=None``: no action column (every event is the default action). ``item=None``: an
    *event-only* log (product analytics: ``catalog``, ``cart``, ``payment_done``...) -- the event
    name is the token, so it becomes the item as well. ``amount`` and ``quantity`` name optional
    per-event value columns (a purchase's dollar value, the number of units), which the
    tokenizer can bucket and the propensity features aggregate.
    """

    user: str = "user_id"
    item: str | None = "item_id"
    action: str | None = "event_type"
    timestamp: str = "timestamp"
    session: str | None = None
    amount: str | None = None
    quantity: str | None = None


@dataclass(frozen=True)
class InputSchema:
    """Columns, action vocabulary policy and time unit of a source of raw events.

    ``action_map`` maps the source's own action names to canonical ones (on top of the
    built-in aliases such as ``pv -> view``); ``unknown_actions`` says what happens to names
    neither maps: ``raise`` (default), ``drop`` (counted) or ``keep`` (a new action type).
    ``time_unit`` of numeric timestamps is detected from their magnitude (``auto``) unless given;
    ``plausible_times`` treats times before 1990 or after tomorrow as invalid rows. Ids in text
    files are read as the strings written (``007`` and ``7`` stay two users) unless
    ``numeric_ids`` declares them integers.
    """

    columns: ColumnMapping = field(default_factory=ColumnMapping)
    action_map: Mapping[str, str] = field(default_factory=dict)
    unknown_actions: ActionPolicy = "raise"
    time_unit: str = "auto"
    default_action: str = "interaction"
    plausible_times: bool = True
    numeric_ids: bool = False

    def __post_init__(self) -> None:
        if self.unknown_actions not in ACTION_POLICIES:
            raise ConfigurationError(
                f"unknown_actions must be one of {list(ACTION_POLICIES)}, got {self.unknown_actions!r}",
                cli_hint="use --unknown-actions raise|drop|keep",
            )
        check_time_unit(self.time_unit)
        object.__setattr__(self, "action_map", dict(self.action_map))

    def override(self, **given: Any) -> InputSchema:
        """A copy with the given (non-``None``) fields replaced; column fields by their mapping names."""
        given = {k: v for k, v in given.items() if v is not None}
        col_names = {f.name for f in fields(ColumnMapping)}
        cols = {k: v for k, v in given.items() if k in col_names}
        rest = {k: v for k, v in given.items() if k not in col_names}
        return replace(self, columns=replace(self.columns, **cols), **rest)

    def without_action_column(self) -> InputSchema:
        """A copy for sources with one action type (every event gets ``default_action``)."""
        return replace(self, columns=replace(self.columns, action=None))

    def without_item_column(self) -> InputSchema:
        """A copy for event-only logs: the event name is the token (see :class:`ColumnMapping`)."""
        return replace(self, columns=replace(self.columns, item=None))

    @property
    def event_only(self) -> bool:
        return self.columns.item is None

    def canonical(self) -> InputSchema:
        """The same action policy and time unit over canonical column names (API request events);
        an event-only schema stays event-only."""
        return replace(self, columns=ColumnMapping(item=None if self.event_only else "item_id"))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["action_map"] = dict(self.action_map)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InputSchema:
        d = dict(d)
        return cls(columns=ColumnMapping(**d.pop("columns", {})), **d)
