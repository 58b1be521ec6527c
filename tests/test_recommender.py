"""BehaviorLM end to end on tiny data: it learns, it is deterministic, and its API is strict."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from behaviorlm.data.events import EventsError, validate_events
from behaviorlm.errors import InputDataError, ModelFormatError
from behaviorlm.evaluation import evaluate, leave_one_out
from behaviorlm.recommender import BehaviorLM
from tests.conftest import T0

TINY = dict(dim=32, n_layers=2, n_heads=2, max_len=16, dropout=0.0, batch_size=16, lr=5e-3, progress=False)


@pytest.fixture(scope="module")
def fitted():
    from tests.conftest import make_events

    ev = validate_events(make_events(n_items=30))  # 14-step walks over 30 items: no repeats
    sp = leave_one_out(ev)
    return BehaviorLM(epochs=40, **TINY).fit(sp.train), sp  # no early stop: learn actions too


def test_tiny_model_overfits_tiny_data(fitted):
    model, sp = fitted
    first, last = model.history_.epochs[0]["loss"], model.history_.epochs[-1]["loss"]
    assert last < 0.35 * first
    report = evaluate(model, sp, n_boot=0)
    assert report.model["ndcg@10"] > 0.9
    assert report.model["ndcg@10"] > report.baselines["popularity"]["ndcg@10"] + 0.5
    assert report.model["next_action_accuracy"] > 0.9  # the view/cart/purchase rhythm is learnable
    assert report.protocol["majority_action_accuracy"] < 0.6  # majority class: view
    assert "next_action_accuracy" not in report.baselines["popularity"]  # baselines rank items only
    assert any("commonest action scores" in line for line in report.notes())


def test_same_seed_same_metrics_different_seed_differs():
    from tests.conftest import make_events

    sp = leave_one_out(validate_events(make_events(n_users=20)))
    runs = [BehaviorLM(epochs=3, seed=s, **TINY).fit(sp.train) for s in (7, 7, 8)]
    losses = [[e["loss"] for e in m.history_.epochs] for m in runs]
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]
    m0 = evaluate(runs[0], sp, n_boot=0).to_dict()
    m1 = evaluate(runs[1], sp, n_boot=0).to_dict()
    assert m0["ndcg@10"] == m1["ndcg@10"] and m0["mrr"] == m1["mrr"]


def test_recommend_returns_original_ids_and_excludes_seen(fitted):
    model, sp = fitted
    recs = model.recommend([0, 1], k=5)
    assert recs.columns == ["user_id", "item_id", "score", "rank"]
    assert recs.height == 10 and set(recs["user_id"]) == {0, 1}
    assert recs["item_id"].str.starts_with("item").all()
    assert recs.group_by("user_id").agg(pl.col("rank").sort())["rank"].to_list() == [[1, 2, 3, 4, 5]] * 2
    seen0 = set(sp.train.df.filter(pl.col("user_id") == 0)["item_id"])
    assert not seen0 & set(recs.filter(pl.col("user_id") == 0)["item_id"])
    scores = recs.filter(pl.col("user_id") == 0)["score"].to_list()
    assert scores == sorted(scores, reverse=True)


def test_recommend_for_unseen_user_from_raw_events(fitted):
    model, _ = fitted
    raw = pl.DataFrame(
        {
            "user_id": ["new"] * 5,
            "item_id": [f"item{i}" for i in range(1, 6)],
            "event_type": ["view", "add_to_cart", "purchase", "view", "view"],
            "timestamp": [T0 + 10, T0 + 20, T0 + 30, T0 + 40, T0 + 50],
        }
    )
    recs = model.recommend(events=raw, k=3)
    assert recs["user_id"].to_list() == ["new"] * 3
    assert recs["item_id"][0] == "item6"  # continues the walk it learned
    nxt = model.next_action_proba(events=raw)
    assert nxt["predicted_action"][0] == "add_to_cart"  # ... and the action cycle


def test_allowed_items_action_and_cold_start(fitted):
    model, _ = fitted
    recs = model.recommend([0], k=2, allowed_items=["item1", "item2"], exclude_seen=False)
    assert set(recs["item_id"]) <= {"item1", "item2"}
    buy = model.recommend([0], k=3, action="purchase", exclude_seen=False)
    assert buy.height == 3
    cold = model.recommend(["nobody"], k=4)
    counts = dict(zip(model.tokenizer_.items_, model.tokenizer_.item_counts_, strict=True))
    chosen = [counts[i] for i in cold["item_id"]]
    others = [c for i, c in counts.items() if i not in set(cold["item_id"])]
    assert chosen == sorted(chosen, reverse=True) and min(chosen) >= max(others)
    assert cold["score"].sum() < 1.0  # scores are training shares


def test_bad_inputs_get_clear_errors(fitted):
    model, _ = fitted
    for k in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            model.recommend([0], k=k)
    with pytest.raises(InputDataError, match="unknown action 'teleport'"):
        model.recommend([0], action="teleport")
    with pytest.raises(ValueError, match="allowed_items"):
        model.recommend([0], allowed_items=["nope"])
    with pytest.raises(EventsError, match="missing column"):
        model.recommend(events=pl.DataFrame({"user": [1]}))
    with pytest.raises(RuntimeError, match="not fitted"):
        BehaviorLM().recommend([0])


def test_next_action_proba_is_a_distribution(fitted):
    model, _ = fitted
    p = model.next_action_proba([0, 1, 2])
    cols = [c for c in p.columns if c.startswith("p_")]
    assert cols == ["p_add_to_cart", "p_purchase", "p_view"]
    np.testing.assert_allclose(p.select(cols).sum_horizontal().to_numpy(), 1.0, rtol=1e-5)
    assert set(p["predicted_action"]) <= {"add_to_cart", "purchase", "view"}


def test_save_load_gives_identical_recommendations(fitted, tmp_path):
    model, _ = fitted
    model.save(tmp_path / "m")
    back = BehaviorLM.load(tmp_path / "m")
    assert back.model_version == model.model_version  # save() names the weights; load() reads the same name
    a, b = model.recommend([0, 1, 2], k=5), back.recommend([0, 1, 2], k=5)
    assert a.equals(b)
    with pytest.raises(ModelFormatError, match="not a behaviorlm model"):
        BehaviorLM.load(tmp_path)


def test_sampled_softmax_also_learns():
    from tests.conftest import make_events

    sp = leave_one_out(validate_events(make_events()))
    m = BehaviorLM(epochs=25, loss="sampled", n_negatives=8, **TINY).fit(sp.train)
    assert m.history_.epochs[-1]["loss"] < 0.5 * m.history_.epochs[0]["loss"]
    r = evaluate(m, sp, exclude_seen=False, n_boot=0)
    assert r.model["ndcg@10"] > r.baselines["popularity"]["ndcg@10"] + 0.3


def test_user_who_has_seen_everything_gets_no_special_tokens():
    from tests.conftest import make_events

    sp = leave_one_out(validate_events(make_events(n_users=5)))
    m = BehaviorLM(epochs=1, **TINY).fit(sp.train)
    recs = m.recommend([0], k=5)  # user 0 has seen all 12 items
    assert recs.height == 0


def test_histories_keep_short_users_whole_and_long_users_recent():
    from tests.conftest import make_events

    ev = validate_events(make_events(n_users=4, length=20))
    m = BehaviorLM(epochs=1, **{**TINY, "max_len": 8}).fit(
        ev.df.filter(pl.col("user_id") > 0).vstack(ev.df.filter(pl.col("user_id") == 0).head(3))
    )
    per_user = m.histories_.group_by("user_id").len().sort("user_id")
    assert per_user["len"].to_list() == [3, 9, 9, 9]  # max_len, and one more for the oldest one's time gap
    # so a long user's remembered history ranks exactly like all their events
    full = ev.df.filter(pl.col("user_id") == 1)
    a, b = m.recommend([1], k=10), m.recommend(events=full, k=10)
    assert a["item_id"].to_list() == b["item_id"].to_list() and a["score"].to_list() == b["score"].to_list()


def test_early_stopping_keeps_the_best_epoch():
    from tests.conftest import make_events

    sp = leave_one_out(validate_events(make_events(n_items=30)))
    m = BehaviorLM(epochs=60, patience=2, **TINY).fit(sp.train, validation=sp.valid)
    h = m.history_
    scores = [e["val_score"] for e in h.epochs]
    assert h.stopped_early and len(h.epochs) < 60
    assert h.best_score == max(scores) and scores[h.best_epoch - 1] == h.best_score
    assert all(s <= h.best_score for s in scores[h.best_epoch :])
    # the restored weights are the best epoch's: validation recomputed now gives the best score
    from behaviorlm.evaluation import per_user_metrics, rank_targets

    catalog = sp.train.df["item_id"].unique(maintain_order=True)
    now = per_user_metrics(rank_targets(m, sp.valid, catalog).ranks, 10)["ndcg@10"].mean()
    assert abs(now - h.best_score) < 1e-9


def test_pandas_in_and_out(fitted):
    """Analysts' frames: pandas events in, pandas frames out with set_output, the library unaffected."""
    import pandas as pd

    model, sp = fitted
    pandas_events = sp.test.inputs.df.to_pandas()
    expected = model.recommend(events=pandas_events, k=3)  # pandas accepted as input, polars out by default
    assert isinstance(expected, pl.DataFrame)
    try:
        assert model.set_output(transform="pandas") is model
        recs = model.recommend(events=pandas_events, k=3)
        assert isinstance(recs, pd.DataFrame) and list(recs.columns) == expected.columns
        assert pl.from_pandas(recs).equals(expected)
        assert isinstance(model.next_action_proba(events=pandas_events), pd.DataFrame)
        assert isinstance(model.embed(events=pandas_events), pd.DataFrame)
        assert evaluate(model, sp, n_boot=0).model["ndcg@10"] > 0.9  # library code still gets polars
    finally:
        model.set_output(transform="polars")
    with pytest.raises(ValueError, match="'polars' or 'pandas'"):
        model.set_output(transform="arrow")
