"""Statistics a rationale may state, computed from events, and the one way each is written.

A rationale that says "18% of the 1,203 people who interacted with it went on to this one" must be
able to show where 18% and 1,203 come from. Each statistic here becomes a fact of the user's
context with its own id (``R2.after_E7``, ``R2.times_7d``, ``R2.popularity``,
``P.usual_price``); templates and the fact descriptions format numbers through the same
functions (:func:`share`, :func:`count`, :func:`money`), so every number in a template's text
appears in the description of a fact it cites (a test checks it).

*Population* statistics (who went on from one item to another, how many people interacted with an
item) are computed over the model's remembered histories -- the users it was trained on -- not
over the handful of users being explained.
"""

from __future__ import annotations

from datetime import timedelta

import polars as pl

WEEK = timedelta(days=7)


def share(x: float) -> str:
    """A proportion as a rounded percentage (``"18%"``, ``"0.4%"`` below 1%)."""
    pct = 100 * x
    return f"{pct:.1f}%" if 0 < pct < 1 else f"{pct:.0f}%"


def count(n: int) -> str:
    return f"{n:,}"


def money(x: float) -> str:
    return f"{x:,.2f}"


#: The least contribution (nats) that makes an event a reason: removing it would lower the item's
#: probability by 5%. Below it the ranking comes from the model's prior (popularity, the position
#: in the session), and citing the user's event would be unfaithful: on the Taobao sample most
#: unseen top-1 items have no event above 0.02 nats (benchmarks/RESULTS.md section 23).
MIN_CONTRIBUTION = 0.05


def top_attributed(attributions: pl.DataFrame, n: int, min_contribution: float = MIN_CONTRIBUTION) -> pl.DataFrame:
    """Per (user, recommended item) the ``n`` events that raised its score most (contribution at
    least ``min_contribution``), strongest first: ``user_id, item_id, event_index, event_item, event_action,
    event_time, contribution, copy_weight, place`` (``place`` 1 = strongest)."""
    if attributions.is_empty() or n <= 0:
        return pl.DataFrame(
            schema={
                "user_id": pl.String,
                "item_id": pl.String,
                "event_index": pl.Int64,
                "event_item": pl.String,
                "event_action": pl.String,
                "event_time": pl.Datetime("us", "UTC"),
                "contribution": pl.Float64,
                "copy_weight": pl.Float64,
                "place": pl.UInt32,
            }
        )
    positive = attributions.filter(pl.col("contribution") >= max(min_contribution, 1e-12))
    ranked = positive.sort(["user_id", "item_id", "contribution", "event_index"], descending=[False, False, True, True])
    ranked = ranked.with_columns(
        pl.int_range(1, pl.len() + 1).over("user_id", "item_id").cast(pl.UInt32).alias("place")
    )
    return ranked.filter(pl.col("place") <= n).select(
        pl.col("user_id").cast(pl.String),
        pl.col("item_id").cast(pl.String),
        pl.col("event_index").cast(pl.Int64),
        pl.col("event_item").cast(pl.String),
        pl.col("event_action").cast(pl.String),
        "event_time",
        "contribution",
        "copy_weight",
        "place",
    )


def recent_touches(events: pl.DataFrame, pairs: pl.DataFrame) -> pl.DataFrame:
    """For each ``pairs`` row (``user_id, item_id`` as strings), how many of the user's events
    were on that item in the week up to their last event: ``user_id, item_id, times_7d, until``."""
    ev = events.select(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String), "timestamp")
    last = ev.group_by("user_id").agg(pl.col("timestamp").max().alias("until"))
    on_item = ev.join(pairs.select("user_id", "item_id").unique(), on=["user_id", "item_id"]).join(last, on="user_id")
    week = on_item.filter(pl.col("timestamp") > pl.col("until") - WEEK)
    return week.group_by("user_id", "item_id").agg(pl.len().alias("times_7d"), pl.col("until").first())


def follow_shares(population: pl.DataFrame, pairs: pl.DataFrame) -> pl.DataFrame:
    """For each ``pairs`` row (``from_item, to_item`` as strings): of the population's users who
    touched ``from_item``, how many touched ``to_item`` after their first touch of it --
    ``from_item, to_item, users, followed`` (pairs with no such user are left out)."""
    wanted = pl.concat([pairs["from_item"], pairs["to_item"]]).unique().implode()
    pop = population.select(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String), "timestamp")
    pop = pop.filter(pl.col("item_id").is_in(wanted))
    first = pop.group_by("user_id", "item_id").agg(pl.col("timestamp").min().alias("first"))
    last = pop.group_by("user_id", "item_id").agg(pl.col("timestamp").max().alias("last"))
    users = first.group_by("item_id").agg(pl.len().alias("users")).rename({"item_id": "from_item"})
    starts = pairs.select("from_item", "to_item").unique().join(first.rename({"item_id": "from_item"}), on="from_item")
    went_on = starts.join(last.rename({"item_id": "to_item"}), on=["user_id", "to_item"])
    followed = (
        went_on.filter(pl.col("last") > pl.col("first"))
        .group_by("from_item", "to_item")
        .agg(pl.len().alias("followed"))
    )
    out = pairs.select("from_item", "to_item").unique().join(users, on="from_item")
    return out.join(followed, on=["from_item", "to_item"], how="left").with_columns(pl.col("followed").fill_null(0))


def popularity(population: pl.DataFrame, items: pl.Series) -> pl.DataFrame:
    """How many of the population's users touched each item: ``item_id, users, of``."""
    pop = population.select(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String))
    total = pop["user_id"].n_unique()
    touched = pop.filter(pl.col("item_id").is_in(items.cast(pl.String).unique().implode())).unique()
    return touched.group_by("item_id").agg(pl.len().alias("users")).with_columns(pl.lit(total).alias("of"))


def describe_stat(name: str, value: dict, item: str) -> str:
    """A statistic fact of recommended ``item`` in words, numbers formatted as templates write them."""
    if name == "times_7d":
        return f"{count(value['n'])} of the user's events were on item {item} in the 7 days to {value['until']}"
    if name.startswith("after_"):
        return (
            f"{share(value['share'])} of the {count(value['users'])} people who interacted with item {value['from']} "
            f"later interacted with item {item}"
        )
    if name == "popularity":
        return f"{count(value['users'])} of the {count(value['of'])} people the model knows interacted with item {item}"
    return f"{name} of item {item} is {value}"
