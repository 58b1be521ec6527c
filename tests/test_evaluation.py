"""The evaluation protocol cannot leak, cannot flatter, and computes the textbook metrics."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from behaviorlm.data.events import validate_events
from behaviorlm.evaluation import (
    CooccurrenceBaseline,
    PopularityBaseline,
    bootstrap_ci,
    evaluate,
    leave_one_out,
    per_user_metrics,
    rank_targets,
    temporal_split,
)
from tests.conftest import T0, make_events


class ConstantScorer:
    name = "constant"

    def score(self, inputs, users, catalog):
        yield users, torch.zeros(len(users), len(catalog))


class RecordingScorer:
    """Scores with popularity and records every input event it was shown."""

    name = "recording"

    def __init__(self, train, catalog):
        self.pop = PopularityBaseline().fit(train, catalog)
        self.seen_inputs: list[pl.DataFrame] = []

    def score(self, inputs, users, catalog):
        self.seen_inputs.append(inputs.df)
        yield from self.pop.score(inputs, users, catalog)


def _with_canaries(df: pl.DataFrame) -> pl.DataFrame:
    """Append to every user one last event on an item nobody else ever touches."""
    last = df.group_by("user_id").agg(pl.col("timestamp").max())
    canary = last.with_columns(
        item_id=pl.format("canary-{}", "user_id"), event_type=pl.lit("view"), timestamp=pl.col("timestamp") + 10
    )
    return pl.concat([df, canary.select(df.columns)])


def test_loo_split_shapes_and_no_target_in_train(events):
    sp = leave_one_out(events)
    n = events.n_users
    assert sp.valid.targets.height == sp.test.targets.height == n
    assert len(sp.train) == len(events) - 2 * n
    assert len(sp.test.inputs) == len(events) - n
    key = ["user_id", "item_id", "timestamp"]
    for targets in (sp.valid.targets, sp.test.targets):
        assert sp.train.df.join(targets, on=key, how="semi").height == 0
    assert sp.test.inputs.df.join(sp.test.targets, on=key, how="semi").height == 0
    # every test input precedes its target in time
    joined = sp.test.inputs.df.join(sp.test.targets.select("user_id", pl.col("timestamp").alias("t")), on="user_id")
    assert (joined["timestamp"] <= joined["t"]).all()


def test_leakage_canary_targets_never_reach_the_model(raw_events):
    ev = validate_events(_with_canaries(raw_events))
    sp = leave_one_out(ev)
    assert sp.test.targets["item_id"].str.starts_with("canary").all()
    assert not sp.train.df["item_id"].str.starts_with("canary").any()
    catalog = sp.train.df["item_id"].unique(maintain_order=True)
    scorer = RecordingScorer(sp.train, catalog)
    ur = rank_targets(scorer, sp.test, catalog)
    shown = pl.concat(scorer.seen_inputs)
    assert not shown["item_id"].str.starts_with("canary").any()
    assert np.isinf(ur.ranks).all()  # a canary is unrankable: it was never trainable


def test_model_never_trained_on_targets(raw_events):
    from behaviorlm.recommender import BehaviorLM

    ev = validate_events(_with_canaries(raw_events))
    sp = leave_one_out(ev)
    m = BehaviorLM(epochs=1, dim=8, n_heads=1, n_layers=1, max_len=8, progress=False).fit(sp.train)
    assert not any(str(i).startswith("canary") for i in m.tokenizer_.items_)
    report = evaluate(m, sp, n_boot=0)
    assert report.model["hr@10"] == 0.0 and report.protocol["unrankable_targets"] == ev.n_users


def test_constant_scorer_gets_no_credit_for_ties(events):
    sp = leave_one_out(events)
    catalog = sp.train.df["item_id"].unique()
    ur = rank_targets(ConstantScorer(), sp.test, catalog, exclude_seen=False)
    assert (ur.ranks == len(catalog)).all()
    assert per_user_metrics(ur.ranks, 10)["hr@10"].sum() == 0


def test_metric_values():
    ranks = np.array([1.0, 2.0, 11.0, np.inf])
    m = per_user_metrics(ranks, 10)
    np.testing.assert_allclose(m["hr@10"], [1, 1, 0, 0])
    np.testing.assert_allclose(m["ndcg@10"], [1, 1 / np.log2(3), 0, 0])
    np.testing.assert_allclose(m["mrr"], [1, 0.5, 1 / 11, 0])


def test_exclude_seen_masks_history_and_target_seen_is_a_miss():
    df = pl.DataFrame(
        {
            "user_id": [1] * 5 + [2] * 5,
            "item_id": ["a", "b", "c", "d", "a", "a", "b", "c", "d", "e"],
            "event_type": ["view"] * 10,
            "timestamp": list(range(T0, T0 + 10)),
        }
    )
    sp = leave_one_out(validate_events(df))
    catalog = sp.train.df["item_id"].unique(maintain_order=True)
    pop = PopularityBaseline().fit(sp.train, catalog)
    with_mask = rank_targets(pop, sp.test, catalog, exclude_seen=True)
    without = rank_targets(pop, sp.test, catalog, exclude_seen=False)
    # user 1's target 'a' was seen before: a miss when seen items are excluded
    assert np.isinf(with_mask.ranks[with_mask.users.index(1)])
    assert np.isfinite(without.ranks[without.users.index(1)])


def test_cooccurrence_learns_transitions(events):
    sp = leave_one_out(events)
    catalog = sp.train.df["item_id"].unique(maintain_order=True)
    # the walk revisits items, so the target has been seen: rank it among all items
    co = rank_targets(CooccurrenceBaseline().fit(sp.train, catalog), sp.test, catalog, exclude_seen=False)
    pop = rank_targets(PopularityBaseline().fit(sp.train, catalog), sp.test, catalog, exclude_seen=False)
    assert per_user_metrics(co.ranks, 1)["hr@1"].mean() == 1.0  # the synthetic walk is i -> i+1
    assert per_user_metrics(pop.ranks, 1)["hr@1"].mean() < 0.5


def test_temporal_split_has_no_future_inputs(events):
    sp = temporal_split(events)
    start = sp.test.targets["timestamp"].min()
    assert sp.test.inputs.df["timestamp"].max() < start
    assert sp.train.df["timestamp"].max() < sp.valid.targets["timestamp"].min()
    assert set(sp.test.targets["user_id"]) <= set(sp.test.inputs.df["user_id"])
    with pytest.raises(ValueError, match="must be before"):
        temporal_split(events, test_start="2000-01-01", val_start="2001-01-01")


def test_bootstrap_ci_contains_mean_and_shrinks():
    rng = np.random.default_rng(0)
    small, big = rng.random(50), rng.random(5000)
    lo, hi = bootstrap_ci(small)
    assert lo < small.mean() < hi
    lo2, hi2 = bootstrap_ci(big)
    assert hi2 - lo2 < hi - lo


def test_evaluate_report_keys(events):
    sp = leave_one_out(events)
    report = evaluate(PopularityBaselineAsModel(sp), sp, k=5, n_boot=50, exclude_seen=False)
    d = report.to_dict()
    for key in ("ndcg@5", "hr@5", "mrr", "coverage@5"):  # popularity scored as a model is the popularity row
        assert d[key] == d["baselines"]["popularity"][key], key
        assert d["ci95"].get(key) == d["baselines"]["popularity"]["ci95"].get(key), key
    paired = d["paired_vs_baselines"]["popularity"]
    assert 0 < d["mrr"] < 1 and (paired["diff"], paired["ci95"], paired["significant"]) == (0.0, [0.0, 0.0], False)
    assert d["protocol"]["exclude_seen"] is False and "ties" in d["protocol"]["ranking"]
    assert "popularity" in report.table()
    with pytest.raises(ValueError, match="k must be"):
        evaluate(PopularityBaselineAsModel(sp), sp, k=0)


class PopularityBaselineAsModel:
    name = "pop-as-model"

    def __init__(self, sp):
        self.pop = PopularityBaseline().fit(sp.train, sp.train.df["item_id"].unique(maintain_order=True))

    def score(self, inputs, users, catalog):
        return self.pop.score(inputs, users, catalog)


def test_short_users_are_not_evaluated_but_counted():
    ev = validate_events(make_events(n_users=5, length=2))
    sp = leave_one_out(ev)
    assert sp.test.targets.height == 0 and sp.info["users_too_short"] == 5
    with pytest.raises(ValueError, match="no users"):
        evaluate(ConstantScorer(), sp)


def test_list_ranks_of_top_k_lists():
    import numpy as np

    from behaviorlm.evaluation.metrics import list_ranks, per_user_metrics

    ranks = list_ranks(np.array([[5, 6, 7], [1, 2, 3], [9, 9, 4]]), np.array([6, 8, 4]))
    assert ranks.tolist() == [2.0, float("inf"), 3.0]
    assert per_user_metrics(ranks, 3)["ndcg@3"].tolist() == [1 / np.log2(3), 0.0, 0.5]


class ReversedPopularity(PopularityBaselineAsModel):
    """Popularity, returning the users in the reverse of the order asked (any scorer may reorder)."""

    def score(self, inputs, users, catalog):
        for part, scores in self.pop.score(inputs, users, catalog):
            yield part[::-1], scores.flip(0)


def test_paired_differences_pair_the_same_users(events):
    """Per-user results are paired by user, not by position: the same scores in another order
    differ by exactly zero for every user; a scorer that drops a user is an error."""
    sp = leave_one_out(events)
    p = evaluate(ReversedPopularity(sp), sp, k=5, n_boot=50, baselines=("popularity",)).paired["popularity"]
    assert p["diff"] == 0.0 and p["ci95"] == [0.0, 0.0], p

    class Dropping(PopularityBaselineAsModel):
        def score(self, inputs, users, catalog):
            for part, scores in self.pop.score(inputs, users, catalog):
                yield part[1:], scores[1:]

    with pytest.raises(ValueError, match="ranked different users"):
        evaluate(Dropping(sp), sp, k=5, n_boot=50, baselines=("popularity",))


def test_evaluation_ranks_what_serving_recommends():
    """The evaluated top-k is the served one: the same scores and the same seen-item mask."""
    from behaviorlm.recommender import BehaviorLM

    sp = leave_one_out(validate_events(make_events(n_users=40, n_items=60, length=14)))
    model = BehaviorLM(max_len=16, dim=16, n_layers=1, n_heads=2, epochs=1, seed=0, progress=False).fit(sp.train)
    catalog = sp.train.df["item_id"].unique(maintain_order=True)
    ur = rank_targets(model, sp.test, catalog, k=5, exclude_seen=True)
    served = model.recommend(events=sp.test.inputs, k=5, exclude_seen=True)
    for user, top in zip(ur.users, ur.topk, strict=True):
        want = served.filter(pl.col("user_id") == user)["item_id"].to_list()
        assert [catalog[int(i)] for i in top] == want, user


def test_a_shard_trained_base_is_checked_by_its_record_after_a_continuation(events):
    """Remembered events cover only what was trained in memory: a base fitted from shards on all
    events (no events remembered) and continued on a day is still refused by its record."""
    from types import SimpleNamespace

    from behaviorlm.evaluation.leakage import LeakError, check_no_leak, stage_record, with_increment

    sp = leave_one_out(events)
    base = stage_record({"source": "prepared/", "holdout": "none"}, None)  # shards: no event count
    record = with_increment(base, stage_record({"source": "day.csv", "holdout": "loo"}, sp.train))
    held_out_day = sp.train.df.head(3)  # the continuation's remembered events: no test target among them
    model = SimpleNamespace(training_data_=record, histories_=held_out_day)
    with pytest.raises(LeakError, match="the first fit trained on all its events"):
        check_no_leak(model, None, "loo", sp.test)
    model.training_data_ = with_increment(
        stage_record({"source": "x", "holdout": "loo"}, sp.train), record["increments"][0]
    )
    assert check_no_leak(model, None, "loo", sp.test) == []
