"""What the command line and the pipelines' entry points share: the words of their common
options and the one rule for errors.

The rule: a deliberate error (:class:`~behaviorlm.errors.BehaviorLMError`) is one line phrased
in the shell's own flags and exit status 2; anything else is a bug and keeps its traceback.
Kept free of heavy imports: ``behaviorlm --help`` loads it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from behaviorlm.errors import BehaviorLMError, ConfigurationError

if TYPE_CHECKING:
    from behaviorlm.data.loading import LoadedEvents
    from behaviorlm.data.schema import InputSchema

#: The help of the options ``behaviorlm`` and the pipeline entry points both declare.
OPTION_HELP = {
    "action": "rank by P(item | next action = ACTION)",
    "quantize": "int8: torch dynamic quantisation of Linear layers",
    "threads": "torch threads (default: $OMP_NUM_THREADS, else all cores)",
    "events": "events file (.csv[.gz], .tsv, .parquet)",
    "dataset": "bundled dataset name instead of --events",
}


_FROM_MODEL = "default: as the model was trained"


@dataclass(frozen=True)
class InputOption:
    """One option of how events are read, declared once for ``behaviorlm`` and the pipelines.

    ``flag`` is the shell spelling; a ``--yes/--no`` pair is a tri-state switch (unset: the
    model's or the default setting)."""

    name: str
    flag: str
    help: str
    kind: type = str  # str | Path | bool
    default: Any = None  # None: unset, the model's or the schema's default applies


#: How every data command and every pipeline entry point reads events: one table, two parsers.
INPUT_OPTIONS = (
    InputOption("events", "--events", OPTION_HELP["events"], Path),
    InputOption("dataset", "--dataset", OPTION_HELP["dataset"]),
    InputOption("user_col", "--user-col", f"default user_id; {_FROM_MODEL}"),
    InputOption(
        "item_col",
        "--item-col",
        f"default item_id; 'none' for an event-only log (the event name is the token); {_FROM_MODEL}",
    ),
    InputOption("action_col", "--action-col", "default event_type; 'none' if the data has one action type"),
    InputOption("time_col", "--time-col", f"default timestamp; {_FROM_MODEL}"),
    InputOption("amount_col", "--amount-col", f"optional per-event value (e.g. dollars); {_FROM_MODEL}"),
    InputOption("quantity_col", "--quantity-col", f"optional per-event number of units; {_FROM_MODEL}"),
    InputOption(
        "time_unit",
        "--time-unit",
        f"unit of numeric timestamps: s, ms, us, ns (default: detected from their magnitude); {_FROM_MODEL}",
    ),
    InputOption("action_map", "--action-map", f"e.g. 'pv=view,buy=purchase'; {_FROM_MODEL}"),
    InputOption(
        "unknown_actions",
        "--unknown-actions",
        f"raise (default) | drop | keep: action names outside the canonical set and --action-map; {_FROM_MODEL}",
    ),
    InputOption(
        "invalid", "--invalid", "raise | drop: rows with null ids or bad or implausible timestamps", str, "raise"
    ),
    InputOption(
        "any_time",
        "--any-time/--plausible-times",
        f"accept timestamps before 1990 or after tomorrow (default: refuse them); {_FROM_MODEL}",
        bool,
    ),
    InputOption(
        "numeric_ids",
        "--numeric-ids/--text-ids",
        f"read user/item ids in text files as integers (default: as the text written); {_FROM_MODEL}",
        bool,
    ),
)


def parse_action_map(text: str | None) -> dict[str, str] | None:
    """``--action-map 'pv=view,buy=purchase'`` as a mapping (None when not given)."""
    if not text:
        return None
    pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
    bad = [p for p in pairs if len(p) != 2 or not p[0].strip() or not p[1].strip()]
    if bad:
        raise ConfigurationError(f"--action-map: expected 'name=canonical,...', got {text!r}")
    return {k.strip(): v.strip() for k, v in pairs}


@dataclass
class EventsInput:
    """Where a command's events (and item metadata) come from: the values of :data:`INPUT_OPTIONS`.

    Schema options left unset (``None``) come from the model's stored input schema, else the
    canonical defaults.
    """

    events: Path | None = None
    dataset: str | None = None
    items: Path | None = None
    user_col: str | None = None
    item_col: str | None = None
    action_col: str | None = None
    time_col: str | None = None
    amount_col: str | None = None
    quantity_col: str | None = None
    time_unit: str | None = None
    action_map: str | None = None
    unknown_actions: str | None = None
    invalid: str = "raise"
    any_time: bool | None = None
    numeric_ids: bool | None = None

    @classmethod
    def of(cls, values: Any) -> EventsInput:
        """From any object with these names as attributes (an ``argparse`` namespace); a name
        it lacks keeps its default; a path given as text becomes a path."""
        given = {f.name: getattr(values, f.name) for f in fields(cls) if getattr(values, f.name, None) is not None}
        for name in ("events", "items"):
            if name in given:
                given[name] = Path(given[name])
        return cls(**given)

    def schema(self, base: InputSchema | None = None) -> InputSchema:
        """``base`` (a model's schema, or the defaults) with every option given here on top."""
        from behaviorlm.data.schema import InputSchema

        no_items = self.item_col is not None and self.item_col.lower() == "none"
        schema = (base or InputSchema()).override(
            user=self.user_col,
            item=None if no_items else self.item_col,
            timestamp=self.time_col,
            amount=self.amount_col,
            quantity=self.quantity_col,
            time_unit=self.time_unit,
            action_map=parse_action_map(self.action_map),
            unknown_actions=self.unknown_actions,
            plausible_times=None if self.any_time is None else not self.any_time,
            numeric_ids=self.numeric_ids,
        )
        if no_items:
            schema = schema.without_item_column()
        if self.action_col is not None and self.action_col.lower() == "none":
            return schema.without_action_column()
        return schema.override(action=self.action_col)

    def load(self, base: InputSchema | None = None, say: Callable[[str], None] | None = None) -> LoadedEvents:
        """Validated events, their source name, and the item table (--items, else the bundled
        one); what validation dropped or noted in a file the user gave is said on stderr (or
        to ``say``)."""
        from behaviorlm.data.loading import load_events

        loaded = load_events(self.events, self.dataset, self.schema(base), self.invalid, self.items)
        report = loaded.events.report
        if self.events is not None and (report.n_dropped or report.notes):
            (say or _to_stderr)(f"events: {report.summary()}")
        return loaded


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def exit_status(run: Callable[[], object], say: Callable[[str], None]) -> int:
    """Run ``run``; 0, or 2 after ``say``-ing a deliberate error's one-line message (in CLI
    terms). Any other exception propagates: it is a bug, and its traceback is the report."""
    try:
        run()
    except BehaviorLMError as exc:
        say(exc.cli_message())
        return 2
    return 0
