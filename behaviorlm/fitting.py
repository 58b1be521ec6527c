"""Fit a model from where its events are: a loaded source, a prepared folder, or a previous model.

The one place that decides what a training run holds out and what it records about it, so
``behaviorlm train``, the pipelines and Python users get the same runs and the same training
record (:mod:`behaviorlm.evaluation.leakage`), which evaluation later reads to refuse leaks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from behaviorlm.data.events import Events, events_digest
from behaviorlm.data.loading import LoadedEvents
from behaviorlm.errors import ConfigurationError, InputDataError
from behaviorlm.evaluation.splits import SPLITS, Holdout, make_split
from behaviorlm.nn.checkpoint import Checkpointing
from behaviorlm.recipes import DEFAULT_RECIPE
from behaviorlm.recommender import BehaviorLM

HOLDOUTS = (*SPLITS, "none")


def default_holdout(prepared: bool, continuing: bool) -> str:
    """``loo`` for a new model from events; ``none`` (train on all) from a prepared folder or
    when continuing a model, whose new events usually hold no targets of their own."""
    return "none" if prepared or continuing else "loo"


def held_out(events: Events, holdout: str) -> tuple[Events, Holdout | None]:
    """The training events and the validation holdout of ``holdout`` (none: all events, no validation)."""
    if holdout not in HOLDOUTS:
        raise ConfigurationError(
            f"holdout must be one of {list(HOLDOUTS)}, got {holdout!r}",
            cli_hint=f"--holdout must be one of {', '.join(HOLDOUTS)}; got {holdout!r}",
        )
    if holdout == "none":
        return events, None
    split = make_split(events, holdout)
    return split.train, split.valid


def fit_from_source(
    source: LoadedEvents | None = None,
    *,
    prepared: str | Path | None = None,
    init_from: BehaviorLM | None = None,
    holdout: str | None = None,
    recipe: str = DEFAULT_RECIPE,
    exclude_seen: bool = True,
    checkpoint: Checkpointing | None = None,
    progress: bool = False,
    **overrides: Any,
) -> BehaviorLM:
    """A model fitted from ``source`` (loaded events), from a ``prepared`` folder (memory-mapped,
    every event trained on), or ``init_from`` continued on ``source`` (the daily increment).

    ``holdout`` (loo | temporal | none; default :func:`default_holdout`) is split off before
    training and recorded with the source and its digest; ``overrides`` (None values ignored)
    change the recipe's parameters, except for a continuation, which keeps its model's and takes
    ``epochs`` and ``lr`` only."""
    holdout = holdout or default_holdout(prepared is not None, init_from is not None)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if prepared is not None:
        if source is not None or init_from is not None:
            raise ConfigurationError(
                "a prepared folder replaces the events and cannot continue a model",
                cli_hint="--prepared replaces --events/--dataset and cannot be combined with --init-from",
            )
        return _fit_prepared(Path(prepared), holdout, recipe, exclude_seen, checkpoint, progress, overrides)
    if source is None:
        raise ConfigurationError("no events to fit on", cli_hint="give --events PATH or --dataset NAME")
    provenance = {"source": source.source, "holdout": holdout, "events_digest": events_digest(source.events)}
    train_ev, valid = held_out(source.events, holdout)
    if init_from is not None:
        kept = {k: overrides[k] for k in ("epochs", "lr") if k in overrides}
        return init_from.fit_partial(train_ev, valid, checkpoint=checkpoint, training_data=provenance, **kept)
    model = BehaviorLM(recipe, progress=progress, **overrides)
    # every user is observed up to the training data's end when the holdout cuts at one time (or
    # there is none): a gap head may read their silence; a per-user holdout hides what follows it
    until = train_ev.end if model.params["gap_head"] and holdout in ("none", "temporal") else None
    return model.fit(
        train_ev, valid, exclude_seen, items=source.items, training_data=provenance, checkpoint=checkpoint,
        observed_until=until,
    )  # fmt: skip


def _fit_prepared(
    folder: Path,
    holdout: str,
    recipe: str,
    exclude_seen: bool,
    checkpoint: Checkpointing | None,
    progress: bool,
    overrides: dict[str, Any],
) -> BehaviorLM:
    from behaviorlm.sequence.shards import PreparedShards

    if holdout != "none":
        raise ConfigurationError(
            "a prepared folder is trained on every event: hold out by preparing the training events only",
            cli_hint="--prepared trains on every prepared event: hold out by preparing the training events only "
            "(--holdout none)",
        )
    shards = PreparedShards.open(folder)
    overrides = {"min_item_count": shards.tokenizer.min_item_count, **overrides}
    model = BehaviorLM(recipe, progress=progress, **overrides)
    provenance = {"source": str(folder), "holdout": "none", "events_digest": None}
    return model.fit(shards, exclude_seen=exclude_seen, training_data=provenance, checkpoint=checkpoint)


def finetune_from_source(
    model: BehaviorLM, source: LoadedEvents, method: str = "dpo", *, action: str = "purchase", **stage: Any
) -> BehaviorLM:
    """``model`` fine-tuned on ``source`` (:meth:`BehaviorLM.finetune`), holding out what its
    pretraining held out: the model's recorded holdout is applied to ``source`` again, so the
    stage learns from the same training period and evaluation can still trust the split; its
    validation purchases (the held-out ``action`` targets) choose the epoch."""
    holdout = (model.training_data_ or {}).get("holdout") or "none"
    train_ev, valid = held_out(source.events, holdout if holdout in HOLDOUTS else "none")
    if valid is not None:
        buys = valid.targets.filter(pl.col("event_type") == action)
        inputs = valid.inputs.derive(
            valid.inputs.df.filter(pl.col("user_id").is_in(buys["user_id"].implode())),
            f"validation inputs of {action} targets",
        )
        valid = Holdout(inputs, buys) if buys.height else None
    return model.finetune(train_ev, method, validation=valid, action=action, **stage)


def fit_adapters_by(
    model: BehaviorLM, events: Events, groups: pl.DataFrame, column: str, *, min_users: int = 20, **adapter: Any
) -> list[str]:
    """One adapter per value of ``column`` in ``groups`` (``user_id`` + ``column``: a segment
    table such as the segments step's ``users.parquet`` with ``tier``, or a market per user),
    each trained on its users' ``events`` and named ``column=value``; values with fewer than
    ``min_users`` users with events are skipped (said in the log). Returns the names fitted."""
    import logging

    for col in ("user_id", column):
        if col not in groups.columns:
            raise ConfigurationError(
                f"the user table has no column {col!r} (columns: {groups.columns})",
                cli_hint=f"--users needs columns user_id and {column!r}; it has {groups.columns}",
            )
    ids = _user_groups(groups, column, events.df["user_id"].dtype)
    fitted = []
    for value in sorted(ids[column].unique().to_list(), key=str):
        users = ids.filter(pl.col(column) == value)["user_id"].implode()
        part = events.derive(events.df.filter(pl.col("user_id").is_in(users)), f"{column}={value}")
        if part.n_users < min_users:
            logging.getLogger(__name__).info("%s=%s: %d users with events, fewer than %d: no adapter", column, value,
                                             part.n_users, min_users)  # fmt: skip
            continue
        name = f"{column}={value}"
        model.fit_adapter(part, name, describe={"column": column, "value": value}, **adapter)
        fitted.append(name)
    return fitted


def _user_groups(groups: pl.DataFrame, column: str, id_dtype: pl.DataType) -> pl.DataFrame:
    """``user_id`` (cast to the events' id type) and ``column`` of the user table, refused --
    naming the rows -- where an id does not cast, a value is missing or a user has two values:
    each of those would otherwise drop users from an adapter without a word."""
    hint = f"every row of --users needs a user_id of the events' type and a value in {column!r}"
    table = groups.with_row_index("row").select(
        "row", pl.col("user_id").alias("raw"), pl.col("user_id").cast(id_dtype, strict=False), column
    )
    problems = {
        f"user_id that is not a {id_dtype} user id": table.filter(pl.col("user_id").is_null()),
        f"no value in column {column!r}": table.filter(pl.col(column).is_null()),
    }
    for what, bad in problems.items():
        if bad.height:
            rows = ", ".join(f"row {r} (user_id {u!r})" for r, u in bad.select("row", "raw").head(5).iter_rows())
            raise InputDataError(f"{bad.height} row(s) of the user table have {what}: {rows}", cli_hint=hint)
    twice = table.group_by("user_id").agg(pl.col(column).n_unique().alias("n")).filter(pl.col("n") > 1)
    if twice.height:
        raise InputDataError(
            f"{twice.height} user(s) have more than one {column!r} value in the user table "
            f"(e.g. user_id {twice['user_id'][0]!r}): an adapter per value needs one value per user",
            cli_hint=hint,
        )
    return table.select("user_id", column).unique(maintain_order=True)
