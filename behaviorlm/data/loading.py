"""The one event loader of the command line and the pipelines: ``--events PATH`` or ``--dataset NAME``.

Both shells call :func:`load_events`, so a file is read with the same schema rules (a model's
stored schema by default, explicit options on top), the same drop counting and the same
errors, whichever entry point a user starts from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from behaviorlm.data.events import Events, validate_items, validate_schema
from behaviorlm.data.schema import InputSchema
from behaviorlm.errors import ConfigurationError

INVALID_POLICIES = ("raise", "drop")


@dataclass
class LoadedEvents:
    """Validated events, where they came from, and the item table (if the source has one)."""

    events: Events
    source: str
    items: pl.DataFrame | None


def load_events(
    events: str | Path | Any | None = None,
    dataset: str | None = None,
    schema: InputSchema | None = None,
    invalid: str = "raise",
    items: str | Path | None = None,
) -> LoadedEvents:
    """Events from a path (read with ``schema``) or a bundled dataset (read with its own schema).

    ``items`` (a metadata file keyed by the schema's item column) replaces a bundled dataset's
    item table.
    """
    if (events is None) == (dataset is None):
        raise ConfigurationError(
            "give exactly one of an events source or a bundled dataset name",
            hint="pass events=PATH or dataset=NAME",
            cli_hint="give exactly one of --events PATH or --dataset NAME",
        )
    if invalid not in INVALID_POLICIES:
        raise ConfigurationError(
            f"invalid must be 'raise' or 'drop', got {invalid!r}", cli_hint="use --invalid raise|drop"
        )
    schema = schema or InputSchema()
    item_table = None
    if dataset is not None:
        from behaviorlm.data.datasets import load_dataset

        data = load_dataset(dataset)
        ev, source, item_table = data.events, dataset, data.items
    else:
        ev, source = validate_schema(events, schema, invalid=invalid), str(events)
    if items is not None:
        item_table = validate_items(items, item_col=schema.columns.item or "item_id")
    return LoadedEvents(ev, source, item_table)
