"""Did the model train on the targets it is about to be scored on? The training record, and
the check every evaluation runs.

A model keeps a **training record** (``training_data`` in its manifest): where its events came
from, the holdout it was trained under, how many events and which time span it saw -- for the
first fit and for every continuation (``fit_partial``, the daily increment) after it, so the
record describes what the model actually saw, not what its parent saw.

:func:`check_no_leak` answers from two sources, the stronger first:

* **the events the model remembers** (``histories_``: each user's most recent *trained*
  events, updated by every fit): a test target the model holds, or one older than an event
  it trained on for the same user, was in training or the model saw that user's future.
  Exact for leave-one-out targets (each user's newest event), and for temporal ones (each
  user's first event after the cut: a model trained past the cut holds later events),
  whatever holdout the record claims;
* **the record**, for the stages whose events the model does not remember (trained from
  prepared shards, possibly continued since): a stage trained on all its events (holdout
  ``none``) or under another holdout than the split asked for may have seen the targets, so it
  is refused.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from behaviorlm.data.events import Events, events_digest
from behaviorlm.errors import ConfigurationError
from behaviorlm.evaluation.splits import Holdout

#: What an unrecorded continuation is taken to have done: trained on every event it was given.
UNKNOWN = "unknown"
_IDENTITY = ("user_id", "item_id", "event_type", "timestamp")


class LeakError(ConfigurationError):
    """The model was trained on (some of) the targets it would be evaluated on."""


def stage_record(given: dict[str, Any] | None, trained: Events | None) -> dict[str, Any]:
    """One training stage: the caller's provenance (``source``, ``holdout``, ``events_digest``;
    holdout ``unknown`` when not given) plus what was trained on: event count and time span."""
    record: dict[str, Any] = {"source": None, "holdout": UNKNOWN, "events_digest": None, **(given or {})}
    if trained is not None and len(trained):
        ts = trained.df["timestamp"]
        record |= {"n_events": len(trained), "first_event": str(ts.min()), "last_event": str(ts.max())}
    return record


def with_increment(record: dict[str, Any] | None, stage: dict[str, Any]) -> dict[str, Any]:
    """``record`` with a continuation appended (a model without a record gets an unknown base)."""
    base = record if record is not None else stage_record(None, None)
    earlier: list[dict[str, Any]] = list(base.get("increments", []))
    return {**base, "increments": [*earlier, stage]}


def stages(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The first fit, then each continuation, oldest first."""
    return [record, *record.get("increments", [])]


def check_no_leak(model: Any, events: Events | None, split: str, holdout: Holdout) -> list[str]:
    """Refuse (:class:`LeakError`) to evaluate ``model`` on ``holdout`` when it trained on its
    targets; the warnings worth printing otherwise (no record; other events than trained on).

    ``events`` are the events the split was made from (for the digest comparison), ``split``
    its name (``loo`` / ``temporal``)."""
    record = getattr(model, "training_data_", None)
    histories = getattr(model, "histories_", None)
    remembered = histories is not None and histories.height > 0
    if histories is not None and remembered:  # (narrows the type for mypy)
        _refuse_held_targets(histories, holdout, record)
    _refuse_by_record(record, split, only_unremembered=remembered)
    warnings = []
    if record is None:
        warnings.append("the model has no training record: only the events it remembers were checked for leaks")
    elif events is not None and record.get("events_digest") not in (None, events_digest(events)):
        warnings.append(
            "these events differ from the ones the model was first trained on; "
            "its remembered events hold none of the targets"
        )
    return warnings


def _refuse_held_targets(histories: pl.DataFrame, holdout: Holdout, record: dict[str, Any] | None) -> None:
    """Refuse when a target is among the model's trained events, or precedes one of them."""
    if holdout.targets.height == 0:
        return
    known = histories.select(_IDENTITY)
    targets = holdout.targets.select(_IDENTITY).with_columns(
        pl.col("user_id").cast(known["user_id"].dtype, strict=False),
        pl.col("item_id").cast(known["item_id"].dtype, strict=False),
    )
    pairs = targets.join(known, on="user_id", suffix="_trained")
    same = (
        (pl.col("item_id") == pl.col("item_id_trained"))
        & (pl.col("event_type") == pl.col("event_type_trained"))
        & (pl.col("timestamp") == pl.col("timestamp_trained"))
    )
    leaked = pairs.filter(same | (pl.col("timestamp_trained") > pl.col("timestamp")))["user_id"].unique()
    if len(leaked):
        example = targets.filter(pl.col("user_id") == leaked[0]).row(0, named=True)
        raise LeakError(
            f"{len(leaked):,} of {targets.height:,} test targets were training events of this model, or older "
            f"than events it trained on (e.g. user {example['user_id']!r}, item {example['item_id']!r} at "
            f"{example['timestamp']}): evaluating it would leak test targets into training. {_describe(record)}",
            hint="fit on the split's training events (split.train), or evaluate on events after the model's",
            cli_hint="train with --holdout loo or temporal (the same as --split), and continue a model with "
            "--init-from only on events that hold their targets out (--holdout loo)",
        )


def _refuse_by_record(record: dict[str, Any] | None, split: str, only_unremembered: bool = False) -> None:
    """Refuse any stage that did not hold out ``split``'s targets -- with ``only_unremembered``,
    among the stages whose events the model does not remember (trained from shards: no event
    count in the record), since the remembered ones were checked event by event."""
    if record is None:
        return
    for i, stage in enumerate(stages(record)):
        if only_unremembered and "n_events" in stage:
            continue
        what = "the first fit" if i == 0 else f"continuation {i}"
        if stage.get("holdout") in ("none", UNKNOWN):
            raise LeakError(
                f"{what} trained on all its events (holdout {stage.get('holdout')}, {stage.get('source')}): "
                f"evaluating would leak test targets into training. {_describe(record)}",
                cli_hint="retrain with --holdout loo or temporal",
            )
        if stage.get("holdout") != split:
            raise LeakError(
                f"{what} was trained with holdout {stage.get('holdout')} but the {split} split was asked: "
                "its test targets may have been training data",
                cli_hint=f"evaluate with --split {stage.get('holdout')}, or retrain with --holdout {split}",
            )


def _describe(record: dict[str, Any] | None) -> str:
    if record is None:
        return "The model has no training record."
    parts = [
        f"{st.get('holdout')} on {st.get('n_events', '?')} events from {st.get('source')}"
        + (f" ({st['first_event']} to {st['last_event']})" if "first_event" in st else "")
        for st in stages(record)
    ]
    return "Training record: " + "; then ".join(parts) + "."
