"""Event attribution (behaviorlm.explain.attribution): exact occlusion, batched."""

from __future__ import annotations

import re
from datetime import timedelta

import numpy as np
import polars as pl
import pytest

from behaviorlm.data.events import validate_events
from behaviorlm.errors import ConfigurationError
from behaviorlm.explain.attribution import COLUMNS, integrated_gradients, occlusion
from behaviorlm.recommender import BehaviorLM
from tests.conftest import make_events, make_funnel_events


@pytest.fixture(scope="module")
def plain():
    ev = validate_events(make_events(n_users=12, n_items=40, length=14, seed=2))
    return BehaviorLM(max_len=8, dim=16, n_layers=1, n_heads=2, epochs=2, seed=0, progress=False).fit(ev), ev


@pytest.fixture(scope="module")
def repeat_aware():
    ev = validate_events(make_funnel_events(n_users=30))
    model = BehaviorLM("clickstream-quick", max_len=12, dim=16, n_layers=1, n_heads=2, epochs=2, progress=False)
    return model.fit(ev), ev


def _score(model, events, item) -> float:
    """log P(item | events) through the plain public path (one call, no batching)."""
    enc = model.engine.encode(model.validate_input(events))
    h, a = model.engine.heads(enc, slice(0, 1))
    col = model.tokenizer_.item_index(pl.Series([item]))[0]
    return float(model.engine.item_logp(h, a)[0, col])


@pytest.mark.parametrize(("which", "n_events"), [("plain", None), ("plain", 4), ("repeat_aware", None)])
def test_occlusion_equals_removing_each_event_by_hand(which, n_events, request):
    """Long users (more events than the window) and short ones (fewer than the window holds)."""
    model, ev = request.getfixturevalue(which)
    user = ev.df["user_id"][0]
    mine = ev.df.filter(pl.col("user_id") == user).sort("timestamp")
    mine = mine if n_events is None else mine.tail(n_events)
    recs = model.recommend(events=mine, k=3, exclude_seen=False).select("user_id", "item_id")
    att = occlusion(model, recs, mine)
    assert att.events.columns == list(COLUMNS)
    for item in recs["item_id"]:
        rows = att.events.filter(pl.col("item_id") == item).sort("event_index")
        full = _score(model, mine, item)
        assert rows["score"][0] == pytest.approx(full, abs=1e-5)
        for i in range(mine.height):  # every event, in the window or not
            without = mine.filter(pl.int_range(pl.len()) != i)
            assert rows["contribution"][i] == pytest.approx(full - _score(model, without, item), abs=1e-4), i
        total = att.totals.filter(pl.col("item_id") == item)["total"][0]
        assert total == pytest.approx(rows["contribution"].sum())


def test_events_outside_the_window_contribute_exactly_nothing(plain):
    model, ev = plain
    user = ev.df["user_id"][1]
    mine = ev.df.filter(pl.col("user_id") == user).sort("timestamp")  # 14 events, window 8
    recs = model.recommend([user], k=2).select("user_id", "item_id")
    rows = occlusion(model, recs, mine).events.filter(pl.col("item_id") == recs["item_id"][0]).sort("event_index")
    far = mine.height - (model.params["max_len"] + 1)  # older than the window and its gap-giver
    assert (rows["contribution"][:far] == 0.0).all() and (rows["contribution"][far:] != 0.0).any()


def test_copy_weights_are_the_copy_paths_share_per_position(repeat_aware):
    model, ev = repeat_aware
    user = ev.df["user_id"][0]
    mine = ev.df.filter(pl.col("user_id") == user).sort("timestamp")
    recs = model.recommend([user], k=2, exclude_seen=False).select("user_id", "item_id")
    rows = occlusion(model, recs, mine).events.filter(pl.col("item_id") == recs["item_id"][0])
    weights = rows["copy_weight"].drop_nulls().to_numpy()
    assert len(weights) and (weights >= 0).all() and weights.sum() <= 1.0 + 1e-5
    in_window = rows.tail(model.params["max_len"] - 1)
    assert in_window["copy_weight"].null_count() == 0


def test_one_encode_call_for_all_variants_of_all_users(plain, monkeypatch):
    model, ev = plain
    users = ev.df["user_id"].unique().sort().head(5).to_list()
    recs = model.recommend(users, k=3).select("user_id", "item_id")
    calls = []
    real = type(model.engine).encode
    monkeypatch.setattr(type(model.engine), "encode", lambda self, e, **kw: calls.append(len(e)) or real(self, e, **kw))
    att = occlusion(model, recs, ev.df.filter(pl.col("user_id").is_in(users)))
    assert len(calls) == 1 and att.totals.height == 15
    assert np.isfinite(att.events["contribution"].to_numpy()).all()


def test_an_event_after_the_scoring_time_is_not_input(plain):
    model, ev = plain
    user = ev.df["user_id"][2]
    mine = ev.df.filter(pl.col("user_id") == user).sort("timestamp")
    as_of = mine["timestamp"].max() + timedelta(seconds=1)
    canary = mine.tail(1).with_columns(item_id=pl.lit("item3"), timestamp=pl.col("timestamp") + timedelta(hours=1))
    recs = model.recommend(events=mine, k=2).select("user_id", "item_id")
    before = occlusion(model, recs, mine).events
    with_canary = occlusion(model, recs, pl.concat([mine, canary]), as_of=as_of).events
    assert with_canary.equals(before)


@pytest.mark.parametrize("which", ["plain", "repeat_aware"])
def test_integrated_gradients_are_complete_and_agree_with_occlusion(which, request):
    """The contributions sum to the score minus the zero-content baseline (completeness), the
    score is the engine's, events outside the window get 0. (How closely the ranking follows
    occlusion's is a benchmark figure, not a property: benchmarks/attribution.py.)"""
    from behaviorlm.explain.attribution import integrated_gradients

    model, ev = request.getfixturevalue(which)
    user = ev.df["user_id"][3]
    mine = ev.df.filter(pl.col("user_id") == user).sort("timestamp")
    recs = model.recommend(events=mine, k=2, exclude_seen=False).select("user_id", "item_id")
    ig = integrated_gradients(model, recs, mine, steps=64)
    for row in ig.totals.iter_rows(named=True):
        assert row["total"] == pytest.approx(row["score"] - row["baseline"], abs=2e-3)  # midpoint rule, 64 steps
        assert row["score"] == pytest.approx(_score(model, mine, row["item_id"]), abs=1e-4)
    outside = mine.height - (model.params["max_len"])
    contrib = ig.events.filter(pl.col("item_id") == recs["item_id"][0]).sort("event_index")["contribution"]
    assert (contrib[: max(outside, 0)] == 0.0).all() and (contrib[max(outside, 0) :] != 0.0).any()


def test_an_item_outside_the_vocabulary_is_attributed_through_the_copy_path(repeat_aware):
    """A repeat-aware model recommends an item it never trained on by copying it from the
    history; occlusion scores it as recommend does, and the events holding it carry its score."""
    model, ev = repeat_aware
    mine = ev.df.filter(pl.col("user_id") == ev.df["user_id"][0]).sort("timestamp")
    t = mine["timestamp"].max()
    new = pl.DataFrame(
        {
            "user_id": [mine["user_id"][0]] * 2,
            "item_id": ["never-trained", "never-trained"],
            "event_type": ["view", "add_to_cart"],
            "timestamp": [t + timedelta(minutes=1), t + timedelta(minutes=2)],
        }
    )
    hist = pl.concat([mine, new.cast(mine.schema)])
    recs = model.recommend(events=hist, k=40, exclude_seen=False)
    rec = recs.filter(pl.col("item_id") == "never-trained")
    assert rec.height == 1  # the copy path ranks it
    att = occlusion(model, rec.select("user_id", "item_id"), hist)
    rows = att.events.sort("event_index")
    assert np.exp(rows["score"][0]) == pytest.approx(rec["score"][0], rel=1e-4)
    holding = rows.filter(pl.col("event_item") == "never-trained")["contribution"]
    others = rows.filter(pl.col("event_item") != "never-trained")["contribution"]
    assert holding.max() > 10 * max(others.max(), 0.01) and rows["contribution"].is_finite().all()
    with pytest.raises(ConfigurationError, match="not in the model's vocabulary"):
        integrated_gradients(model, rec.select("user_id", "item_id"), hist)


def _numbers(text: str) -> list[str]:
    return re.findall(r"\d[\d,.:-]*\d|\d", text)


def test_template_rationales_state_only_the_facts_they_cite(repeat_aware):
    """Every number a grounded template writes is in the description of a fact it cites (or is
    the recommended item's own id); each attributed item cites its strongest event; and the
    sentences differ from user to user."""
    from behaviorlm.explain import TemplateExplainer, explain_batch
    from behaviorlm.explain.grounded import grounded_contexts

    model, ev = repeat_aware
    catalog = pl.DataFrame({"item_id": [f"i{i}" for i in range(30)], "price": [5.0 + i for i in range(30)]})
    users = ev.df["user_id"].unique(maintain_order=True).head(12)
    mine = ev.derive(ev.df.filter(pl.col("user_id").is_in(users.implode())), "explained users")
    recs = pl.concat(
        [model.recommend(events=mine, k=3, exclude_seen=False), model.recommend(events=mine, k=3).with_columns()]
    ).unique(["user_id", "item_id"], maintain_order=True)
    recs = recs.with_columns(pl.int_range(1, pl.len() + 1).over("user_id").cast(pl.Int32).alias("rank"))
    grounded = grounded_contexts(model, recs, mine, items=catalog)
    table = explain_batch(grounded.contexts, TemplateExplainer())
    assert table.height == recs.height and grounded.attributions is not None
    ctx_of = {c.user_id: c for c in grounded.contexts}
    for row in table.iter_rows(named=True):
        facts = " ".join(ctx_of[row["user_id"]].describe(e) for e in row["evidence"])
        assert "not in the context" not in facts
        allowed = set(_numbers(facts)) | {str(row["item_id"]).lstrip("i")}
        assert set(_numbers(row["rationale"])) <= allowed, (row["rationale"], facts)
        if row["attributed"]:
            assert row["attributed"][0] in row["evidence"]
    assert table.filter(pl.col("attributed").list.len() > 0).height >= table.height // 2
    assert table["rationale"].n_unique() >= 0.8 * table.height


@pytest.mark.parametrize("which", ["plain", "repeat_aware"])
def test_session_occlusion_equals_removing_each_session_by_hand(which, request):
    """Sessions (a pause over the gap starts one) removed whole, re-encoded as the model sees it."""
    from behaviorlm.explain.attribution import SESSION_COLUMNS

    model, ev = request.getfixturevalue(which)
    user = ev.df["user_id"][0]
    mine = ev.df.filter(pl.col("user_id") == user).sort("timestamp")
    gap = (mine["timestamp"].diff().drop_nulls().median() or timedelta(0)) / 2  # several sessions, some long
    recs = model.recommend(events=mine, k=2, exclude_seen=False).select("user_id", "item_id")
    att = occlusion(model, recs, mine, unit="session", session_gap=gap)
    assert att.events.columns == list(SESSION_COLUMNS)
    new_session = (mine["timestamp"].diff() > gap).fill_null(False).cast(pl.Int64).cum_sum()
    assert att.events["session_index"].n_unique() == new_session.n_unique() > 2
    assert att.events.group_by("item_id").agg(pl.col("n_events").sum())["n_events"].to_list() == [mine.height] * 2
    for item in recs["item_id"]:
        rows = att.events.filter(pl.col("item_id") == item).sort("session_index")
        full = _score(model, mine, item)
        for s in rows.iter_rows(named=True):
            without = mine.filter(new_session != s["session_index"])
            assert s["contribution"] == pytest.approx(full - _score(model, without, item), abs=1e-4), s
    with pytest.raises(ConfigurationError, match="unit must be"):
        occlusion(model, recs, mine, unit="day")


@pytest.mark.parametrize("which", ["plain", "repeat_aware"])
def test_log_probabilities_at_columns_equal_the_full_catalogs(which, request):
    """InferenceEngine.item_logp_columns (what occlusion reads) equals item_logp gathered at the
    same columns, new items' columns included."""
    import torch

    model, ev = request.getfixturevalue(which)
    mine = ev.df.filter(pl.col("user_id").is_in(ev.df["user_id"].unique().head(4).implode()))
    t = mine["timestamp"].max()
    new = mine.head(1).with_columns(pl.lit("never-trained").alias("item_id"), pl.lit(t).alias("timestamp"))
    enc = model.engine.encode(model.validate_input(pl.concat([mine, new.cast(mine.schema)])))
    h, a = model.engine.heads(enc, slice(0, len(enc)))
    full = model.engine.item_logp(h, a, new_items=model.model_.copy_head is not None)
    cols = torch.randint(4, model.engine.n_items, (len(enc), 6), generator=torch.Generator().manual_seed(0))
    codes = enc.padded_new_codes(slice(0, len(enc)))
    if model.model_.copy_head is not None:  # the new item's column: n_items + its first position in its row
        row = int(np.flatnonzero((codes >= 0).any(1))[0])
        cols[row, 0] = model.engine.n_items + int(np.flatnonzero(codes[row] >= 0)[0])
    got, want = model.engine.item_logp_columns(h, a, cols), full.gather(1, cols)
    assert torch.equal(got.isfinite(), want.isfinite()) and want.isfinite().float().mean() > 0.9
    assert torch.allclose(got[want.isfinite()], want[want.isfinite()], atol=1e-5)
    if model.model_.copy_head is not None:
        assert want[row, 0].isfinite()  # the copy path scores the new item
