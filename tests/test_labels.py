"""Propensity labels: no event at or after a cutoff reaches an input; labels look only ahead."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from behaviorlm.data.events import EventsError, validate_events
from behaviorlm.propensity.labels import (
    cutoff_examples,
    parse_duration,
    prefix_examples,
    propensity_split,
    scoring_examples,
    sessionize,
    split_users,
)

DAY = 86400


def _ev(rows):
    frame = pl.DataFrame(rows, schema=["user_id", "item_id", "event_type", "timestamp"], orient="row")
    return validate_events(frame, time_unit="s", plausible_times=False)  # synthetic seconds since 1970


@pytest.fixture
def tiny():
    # u1 buys exactly at the cutoff (day 2), u2 only views, u3 is silent after the cutoff,
    # u4 appears only after the cutoff (no example).
    return _ev(
        [
            (1, "a", "view", 0),
            (1, "a", "add_to_cart", 100),
            (1, "a", "purchase", 2 * DAY),
            (2, "b", "view", DAY),
            (2, "b", "view", 2 * DAY + 10),
            (3, "c", "view", 10),
            (4, "d", "purchase", 2 * DAY + 5),
        ]
    )


def test_cutoff_labels_and_strict_inputs(tiny):
    cutoff = datetime(1970, 1, 3, tzinfo=UTC)  # = 2 * DAY
    conv = cutoff_examples(tiny, cutoff, "1d")
    labels = dict(zip(conv.examples["user_id"], conv.examples["label"], strict=True))
    assert labels == {1: 1, 2: 0, 3: 0}  # u4 has no events before the cutoff
    assert (conv.inputs["timestamp"] < cutoff).all()  # the purchase AT the cutoff is a label, not an input
    assert "purchase" not in conv.inputs["event_type"].to_list()
    churn = cutoff_examples(tiny, cutoff, "1d", target="churn")
    assert dict(zip(churn.examples["user_id"], churn.examples["label"], strict=True)) == {1: 0, 2: 0, 3: 1}


def test_missing_target_action_is_named(tiny):
    views = tiny.derive(tiny.df.filter(pl.col("event_type") == "view"), "views only")
    with pytest.raises(EventsError, match="target action 'purchase' never occurs"):
        cutoff_examples(views, "1970-01-02", "1d")
    with pytest.raises(EventsError, match="'purchase'"):
        prefix_examples(views)


def test_split_keeps_test_window_out_of_training(funnel_events):
    split = propensity_split(funnel_events, "1d", n_windows=3)
    t_test = split.test.examples["as_of"][0]
    for part in (split.train, split.valid):
        # every training label window [as_of, as_of + 1d) ends at or before the test cutoff
        assert (part.examples["as_of"] + timedelta(days=1) <= t_test).all()
        assert (part.inputs["timestamp"] < t_test - timedelta(days=1)).all()
    assert (split.test.inputs["timestamp"] < t_test).all()
    train_users = set(split.train.examples["user_id"])
    assert train_users.isdisjoint(split.valid.examples["user_id"])
    assert split.info["n_train"] == len(split.train) and len(split.train.info["parts"]) == 3


def test_split_rejects_censored_test_window(funnel_events):
    end = funnel_events.df["timestamp"].max()
    with pytest.raises(EventsError, match="censored"):
        propensity_split(funnel_events, "1d", test_cutoff=end - timedelta(hours=1))


def test_single_class_is_a_clear_error(tiny):
    with pytest.raises(EventsError, match="single class"):
        propensity_split(tiny, "1h", n_windows=1)


def test_prefixes_stop_before_first_purchase():
    ev = _ev(
        [(1, f"i{j}", "view", j) for j in range(8)]
        + [(1, "x", "purchase", 100), (1, "y", "view", 200)]
        + [(2, f"i{j}", "view", j) for j in range(4)]
        + [(3, "z", "purchase", 5), (3, "z", "view", 6)]  # buys first: nothing to predict from
    )
    ex = prefix_examples(ev, fractions=(0.1, 0.5, 1.0), negatives="full")
    assert ex.info["dropped_sequences"] == 1
    assert "purchase" not in ex.inputs["event_type"].to_list() and "y" not in ex.inputs["item_id"].to_list()
    n = ex.inputs.group_by("example_id").len().join(ex.examples, on="example_id")
    got = {(r["user_id"], r["fraction"]): r["len"] for r in n.iter_rows(named=True)}
    assert got == {(1, 0.1): 1, (1, 0.5): 4, (1, 1.0): 8, (2, 0.1): 1, (2, 0.5): 2, (2, 1.0): 4}
    assert dict(ex.examples.select("user_id", "label").unique().iter_rows()) == {1: 1, 2: 0}


def test_matched_negatives_remove_the_length_leak():
    """Negatives are cut at lengths drawn from the positives', so length no longer tells the label."""
    rows = [(u, f"i{j}", "view", j) for u in range(40) for j in range(5)]  # positives: 5 events, then a purchase
    rows += [(u, "x", "purchase", 100) for u in range(40)]
    rows += [(u, f"i{j}", "view", j) for u in range(40, 80) for j in range(50)]  # negatives: 50 events
    ev = _ev(rows)
    full = prefix_examples(ev, fractions=(1.0,), negatives="full")
    matched = prefix_examples(ev, fractions=(1.0,), negatives="matched")
    lengths = lambda ex: ex.inputs.group_by("example_id").len().join(ex.examples, on="example_id")  # noqa: E731
    assert set(lengths(full).filter(pl.col("label") == 0)["len"]) == {50}
    assert set(lengths(matched)["len"]) == {5} and matched.info["negatives"] == "matched"
    assert prefix_examples(ev, negatives="matched").examples.equals(prefix_examples(ev, negatives="matched").examples)
    with pytest.raises(EventsError, match="negatives must be"):
        prefix_examples(ev, negatives="some")


def test_split_users_is_user_disjoint(funnel_events):
    tr, va, te = split_users(prefix_examples(funnel_events))
    sets = [set(p.examples["user_id"]) for p in (tr, va, te)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert sum(len(p) for p in (tr, va, te)) == len(prefix_examples(funnel_events))


def test_sessionize_splits_on_gaps():
    ev = _ev([(1, "a", "view", 0), (1, "b", "view", 60), (1, "c", "view", 60 + 3600)])
    s = sessionize(ev, "30m")
    assert s.df["user_id"].to_list() == ["1#1", "1#1", "1#2"]


def test_scoring_examples_cover_every_user(tiny):
    ex = scoring_examples(tiny)
    assert sorted(ex.examples["user_id"]) == [1, 2, 3, 4]
    assert len(ex.inputs) == len(tiny)


@pytest.mark.parametrize("bad", ["1 day", "x", "-1d", "0h"])
def test_bad_durations(bad):
    with pytest.raises(EventsError):
        parse_duration(bad)
    assert parse_duration("90m") == timedelta(minutes=90)
