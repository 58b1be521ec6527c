"""Features, calibration and propensity scorers on a synthetic funnel with learnable intent."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from sklearn.metrics import roc_auc_score

from behaviorlm.data.events import EventsError, validate_events
from behaviorlm.errors import ConfigurationError
from behaviorlm.propensity import (
    HeuristicScorer,
    LightGBMScorer,
    PropensityModel,
    TransformerScorer,
    ZeroShotScorer,
    encode_examples,
)
from behaviorlm.propensity.calibration import (
    Calibrator,
    binary_metrics,
    ece_noise_floor,
    expected_calibration_error,
    paired_auc_difference,
)
from behaviorlm.propensity.features import heuristic_score, rich_features, seed_features
from behaviorlm.propensity.labels import cutoff_examples, propensity_split
from behaviorlm.recommender import BehaviorLM
from behaviorlm.sequence.tokenizer import MASK
from tests.conftest import T0


@pytest.fixture(scope="module")
def split(funnel_events):
    return propensity_split(funnel_events, "1d", n_windows=3)


@pytest.fixture(scope="module")
def backbone(funnel_events, split):
    cutoff = split.test.examples["as_of"][0]
    before = funnel_events.derive(funnel_events.df.filter(pl.col("timestamp") < cutoff), "before test")
    # a small backbone with a wide FFN and a gentle learning rate: enough signal to fine-tune in seconds
    small = {"max_len": 32, "dim": 16, "n_layers": 1, "n_heads": 1, "ffn_mult": 4, "dropout": 0.2, "lr": 1e-3}
    return BehaviorLM(epochs=4, batch_size=32, progress=False, **small).fit(before)


# --------------------------------------------------------------------------- features


def _examples_of(rows: list[tuple[int, str]], n_items: int | None = None):
    """Examples at 2024-01-01 from hand-written (user, action) rows, one second apart (every row
    its own item unless ``n_items`` cycles them)."""
    log = pl.DataFrame(
        {
            "user_id": [u for u, _ in rows],
            "item_id": [f"i{j % n_items if n_items else j}" for j in range(len(rows))],
            "event_type": [a for _, a in rows],
            "timestamp": list(range(T0, T0 + len(rows))),
        }
    )
    return cutoff_examples(validate_events(log), "2024-01-01", "1d")


def test_seed_features_of_a_hand_counted_log():
    """Counted by hand, not re-derived from the implementation: user 1 has 3 views, 2 carts and a
    purchase; user 2 one view; rows follow the examples' order."""
    ex = _examples_of([(1, "view")] * 3 + [(1, "add_to_cart")] * 2 + [(1, "purchase"), (2, "view")], n_items=2)
    f = seed_features(ex)
    assert f["example_id"].to_list() == ex.examples["example_id"].to_list()
    got = {u: f.row(i, named=True) for i, u in enumerate(ex.examples["user_id"].to_list())}
    want = {1: (6, 2, 3, 3), 2: (1, 0, 1, 1)}  # length, carts, views, distinct actions
    cols = ("sequence_length", "cart_additions", "product_views", "unique_actions")
    assert {u: tuple(r[c] for c in cols) for u, r in got.items()} == want


def test_heuristic_matches_the_seeds_worked_examples():
    """Hand-computed from the seeds' formula, not from the implementation: user 1 has 3 views,
    2 carts and a purchase (6 events, 3 action types): 0.1*2 + 0.05*3 + 0.3*3/6 = 0.5; user 2's
    12 carts cap at 1.0; user 3 has one view: 0.05 + 0.3 = 0.35."""
    rows = [(1, "view")] * 3 + [(1, "add_to_cart")] * 2 + [(1, "purchase")] + [(2, "add_to_cart")] * 12 + [(3, "view")]
    ex = _examples_of(rows)
    scores = dict(zip(ex.examples["user_id"].to_list(), heuristic_score(seed_features(ex)), strict=True))
    assert scores == pytest.approx({1: 0.5, 2: 1.0, 3: 0.35})


def test_rich_features_ignore_everything_after_as_of(funnel_events, split):
    """Appending future events (purchases, carts) to the log must not change any feature (leakage canary)."""
    cutoff = split.test.examples["as_of"][0]
    future = funnel_events.df.head(300).with_columns(
        pl.lit("purchase").alias("event_type"),
        (pl.lit(cutoff) + pl.duration(minutes=pl.int_range(300))).alias("timestamp"),
    )
    polluted = funnel_events.derive(pl.concat([funnel_events.df, future]).sort("user_id", "timestamp"), "future")
    clean_ex = cutoff_examples(funnel_events, cutoff, "1d")
    dirty_ex = cutoff_examples(polluted, cutoff, "1d")
    base = rich_features(clean_ex)
    assert base.equals(rich_features(dirty_ex)) and seed_features(clean_ex).equals(seed_features(dirty_ex))
    assert not np.array_equal(clean_ex.labels, dirty_ex.labels)  # the future did change the labels
    assert base.height == len(clean_ex) and base["recency_h"].min() >= 0
    assert (base["n_view"] + base["n_add_to_cart"] + base["n_purchase"] == base["n_events"]).all()


# --------------------------------------------------------------------------- calibration


def test_calibration_fixes_miscalibrated_scores():
    rng = np.random.default_rng(0)
    p_true = rng.uniform(0, 0.5, 4000)
    y = (rng.random(4000) < p_true).astype(int)
    raw = np.sqrt(p_true)  # right order, wrong scale
    assert expected_calibration_error(y, raw) > 0.15
    for method in ("isotonic", "platt", "auto"):
        cal = Calibrator(method).fit(raw[:2000], y[:2000])
        p = cal.predict(raw[2000:])
        assert expected_calibration_error(y[2000:], p) < 0.04, method
        assert roc_auc_score(y[2000:], p) == pytest.approx(roc_auc_score(y[2000:], raw[2000:]), abs=0.01)
        again = Calibrator.from_dict(cal.to_dict())
        np.testing.assert_allclose(again.predict(raw[2000:]), p)


def test_ece_noise_floor_shrinks_with_sample_size():
    rng = np.random.default_rng(2)
    small, large = rng.uniform(0.05, 0.4, 800), rng.uniform(0.05, 0.4, 80_000)
    f_small, f_large = ece_noise_floor(small, n_sim=50), ece_noise_floor(large, n_sim=20)
    assert 0.02 < f_small["mean"] < 0.06 and f_small["p95"] > f_small["mean"]
    assert f_large["mean"] < f_small["mean"] / 5  # ~ 1 / sqrt(n)


def test_binary_metrics_and_paired_difference():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 600)
    good, noise = y + rng.normal(0, 0.5, 600), rng.normal(0, 1, 600)
    m = binary_metrics(y, 1 / (1 + np.exp(-good)), n_boot=100)
    lo, hi = m["ci95"]["roc_auc"]
    assert lo <= m["roc_auc"] <= hi and m["roc_auc"] > 0.85 and m["positives"] == y.sum()
    d = paired_auc_difference(y, good, noise, n_boot=200)
    assert d["significant"] and d["ci95"][0] > 0
    same = paired_auc_difference(y, good, good + 1e-9 * noise, n_boot=200)
    assert not same["significant"]


# --------------------------------------------------------------------------- scorers


def test_lightgbm_learns_the_funnel(split):
    s = LightGBMScorer("rich").fit(split.train, split.valid)
    assert roc_auc_score(split.test.labels, s.decision_function(split.test)) > 0.75
    assert s.feature_importance()["feature"][0] in {c for c in rich_features(split.test).columns}
    h = HeuristicScorer().fit(split.train, split.valid).decision_function(split.test)
    assert roc_auc_score(split.test.labels, h) > 0.65  # the funnel's intent is visible to the rule too


def test_encode_examples_appends_query_gap(backbone, split):
    tok = backbone.tokenizer_
    enc = encode_examples(tok, split.test, max_len=8)
    assert (enc.lengths() <= 8).all()
    for u in range(3):
        items, actions, gaps = enc.sequence(u)
        assert items[-1] == MASK and actions[-1] == MASK
        ex = split.test.examples.row(u, named=True)
        last = split.test.inputs.filter(pl.col("example_id") == ex["example_id"])["timestamp"].max()
        assert gaps[-1] == tok.gap_bucket(np.array([(ex["as_of"] - last).total_seconds()]))[0]


def test_transformer_fine_tunes_and_is_deterministic(backbone, split):
    before = {k: v.clone() for k, v in backbone.model_.state_dict().items()}
    a = TransformerScorer(backbone, epochs=6, lr=1e-3, patience=6).fit(split.train, split.valid)
    b = TransformerScorer(backbone, epochs=6, lr=1e-3, patience=6).fit(split.train, split.valid)
    pa = a.decision_function(split.test)
    np.testing.assert_array_equal(pa, b.decision_function(split.test))
    assert roc_auc_score(split.test.labels, pa) > 0.7
    assert a.embeddings(split.test).shape == (len(split.test), 16)
    # the pretrained model itself is untouched by fine-tuning (values, not just object identity),
    # while the fine-tuned copy moved
    after = backbone.model_.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    tuned = a.net_.backbone.state_dict()
    assert any(not torch.equal(before[k], tuned[k]) for k in before if k in tuned)


def test_zero_shot_matches_next_action_probability(backbone, split):
    """With one step, the estimate is exactly the action head's P(purchase next)."""
    ex = split.test
    one = ZeroShotScorer(backbone, n_actions=1, n_samples=2).decision_function(ex)
    events = ex.inputs.select(pl.col("example_id").alias("user_id"), "item_id", "event_type", "timestamp")
    direct = backbone.next_action_proba(events=events)["p_purchase"].to_numpy()
    np.testing.assert_allclose(one, direct, rtol=1e-4, atol=1e-6)
    five = ZeroShotScorer(backbone, n_actions=5, n_samples=4).decision_function(ex)
    assert (five >= one - 1e-6).all() and (five <= 1).all()


@pytest.mark.parametrize("method", ["lightgbm", "transformer"])
def test_propensity_model_round_trip(method, funnel_events, backbone, tmp_path):
    pm = PropensityModel(
        method, horizon="1d", n_windows=2, scorer_params={"epochs": 2} if method == "transformer" else None
    )
    pm.fit(funnel_events, backbone)
    pred = pm.predict(funnel_events)
    assert pred.columns == ["user_id", "as_of", "propensity"]
    assert pred.height == funnel_events.n_users and pred["propensity"].is_between(0, 1).all()
    again = PropensityModel.load(pm.save(tmp_path / method))
    np.testing.assert_allclose(again.predict(funnel_events)["propensity"], pred["propensity"], rtol=1e-6)


def test_zero_shot_refuses_single_action_data(funnel_events):
    buys = funnel_events.derive(funnel_events.df.with_columns(pl.lit("purchase").alias("event_type")), "all buys")
    lm = BehaviorLM(max_len=16, dim=8, n_layers=1, n_heads=1, epochs=1, progress=False).fit(buys)
    with pytest.raises(EventsError, match="more than one action type"):
        ZeroShotScorer(lm)


def test_propensity_errors_are_clear(funnel_events):
    with pytest.raises(ConfigurationError, match="unknown propensity method"):
        PropensityModel("magic")
    with pytest.raises(ConfigurationError, match="needs a pretrained model"):
        PropensityModel("transformer", n_windows=2).fit(funnel_events)
    with pytest.raises(EventsError, match="duration"):
        PropensityModel("lightgbm", horizon="soon")


def _sparse_half_year(n_users: int = 800, seed: int = 0):
    """A 6-month funnel log with sparse visits: a few sessions per user, purchases rare."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        for _ in range(rng.integers(2, 6)):
            t = T0 + int(rng.integers(0, 180 * 86_400))
            rows.append((u, f"i{rng.integers(0, 200)}", "view", t))
            if rng.random() < 0.25:
                rows.append((u, f"i{rng.integers(0, 200)}", "purchase", t + 600))
    df = pl.DataFrame(rows, schema=["user_id", "item_id", "event_type", "timestamp"], orient="row")
    return validate_events(df)


def test_the_default_horizon_comes_from_the_data_and_says_why(caplog):
    """Issue 31 item 19: a sparse 6-month log gets a horizon with enough positives, said in words."""
    import logging

    from behaviorlm.propensity import user_propensities
    from behaviorlm.propensity.labels import MIN_POSITIVE_RATE, default_horizon

    ev = _sparse_half_year()
    one_day = cutoff_examples(ev, ev.end - np.timedelta64(1, "D"), "1d").labels.mean()
    assert one_day < 0.01  # what the old fixed default gave: too few positives
    choice = default_horizon(ev, "purchase", 3)
    assert choice.enough and choice.positive_rate >= MIN_POSITIVE_RATE and choice.horizon in ("14d", "28d")
    with caplog.at_level(logging.WARNING, logger="behaviorlm"):
        table, models = user_propensities(ev, method="heuristic", targets=(("conversion", "auto"),))
    assert f"propensity horizon not given: {choice.horizon}" in caplog.text
    assert models["propensity"].params["horizon"] == choice.horizon and "too few" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="behaviorlm"):
        _, models = user_propensities(ev, method="heuristic", targets=(("conversion", "1d"),))
    assert "too few to learn from" in caplog.text and "warning" in models["propensity"].train_info_
