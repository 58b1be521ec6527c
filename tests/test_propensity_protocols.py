"""The CDNOW protocols: no input of any protocol holds an event at or after its cutoff.

Canary events -- dated exactly at and after each cutoff, with an item, an amount and a quantity
no real event has -- are added to a purchase log; every example's inputs, features and tokens
must come out identical, while the labels may (and here do) change.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from behaviorlm.data.events import ColumnMapping, EventsError, validate_events
from behaviorlm.propensity.features import rfm_features, rich_features
from behaviorlm.propensity.labels import holdout_split, propensity_split
from behaviorlm.propensity.scorers import encode_examples
from behaviorlm.sequence.tokenizer import ActionTokenizer

CUTOFF = datetime(2020, 7, 1, tzinfo=UTC)
MAPPING = ColumnMapping(item="item_id", amount="amount", quantity="quantity")


def purchase_log(n_users: int = 400, seed: int = 0) -> pl.DataFrame:
    """Customers who first buy in January and then buy at their own rate until they drop out."""
    rng = np.random.default_rng(seed)
    rows, start, end = [], datetime(2020, 1, 1, tzinfo=UTC), datetime(2020, 12, 31, tzinfo=UTC)
    for u in range(n_users):
        t, rate = start + timedelta(days=float(rng.uniform(0, 30))), rng.gamma(1.0, 1 / 15)
        while t < end:
            rows.append((f"c{u:03d}", f"sku{int(rng.integers(5))}", "purchase", t, float(rng.uniform(5, 60)), 1.0))
            t += timedelta(days=float(rng.exponential(1 / rate)))
            if rng.random() < 0.1:
                break
    schema = ["user_id", "item_id", "event_type", "timestamp", "amount", "quantity"]
    return pl.DataFrame(rows, schema=schema, orient="row")


def with_canaries(raw: pl.DataFrame, cutoff: datetime) -> pl.DataFrame:
    users = raw["user_id"].unique().sort()[::3]
    rows = [
        (u, "CANARY", "purchase", cutoff + lag, 9999.0, 99.0)
        for u in users
        for lag in (timedelta(0), timedelta(days=1))
    ]
    return pl.concat([raw, pl.DataFrame(rows, schema=raw.schema, orient="row")])


def evidence(part, tok: ActionTokenizer) -> tuple:
    enc = encode_examples(tok, part, max_len=50)
    return (
        part.inputs.sort("example_id", "timestamp"),
        rich_features(part),
        rfm_features(part),
        enc.items.tolist(),
        enc.gaps.tolist(),
    )


def assert_same_evidence(a, b, tok) -> None:
    for x, y in zip(evidence(a, tok), evidence(b, tok), strict=True):
        if isinstance(x, pl.DataFrame):
            assert x.equals(y, null_equal=True)
        else:
            assert x == y


@pytest.mark.parametrize("horizon", ["13w", "26w"])
def test_holdout_inputs_never_see_the_holdout(horizon):
    raw = purchase_log()
    clean = validate_events(raw, MAPPING)
    dirty = validate_events(with_canaries(raw, CUTOFF), MAPPING)
    tok = ActionTokenizer(max_len=50).fit(dirty)  # a vocabulary that knows the canary item
    a, b = holdout_split(clean, CUTOFF, horizon), holdout_split(dirty, CUTOFF, horizon)
    for part in ("train", "valid", "test"):
        pa, pb = getattr(a, part), getattr(b, part)
        assert pa.examples.drop("label").equals(pb.examples.drop("label"))
        assert_same_evidence(pa, pb, tok)
        assert pb.inputs.filter(pl.col("timestamp") >= CUTOFF).height == 0
    assert b.test.labels.sum() > a.test.labels.sum()  # the canaries did reach the labels


def test_rolling_origin_inputs_never_see_their_cutoffs():
    raw = purchase_log()
    test_cutoff = datetime(2020, 9, 1, tzinfo=UTC)
    clean = validate_events(raw, MAPPING)
    dirty = validate_events(with_canaries(raw, test_cutoff), MAPPING)
    tok = ActionTokenizer(max_len=50).fit(dirty)
    kw = {"n_windows": 3, "stride": "2w", "test_cutoff": test_cutoff}
    a, b = propensity_split(clean, "4w", **kw), propensity_split(dirty, "4w", **kw)
    for part in ("train", "valid", "test"):
        assert_same_evidence(getattr(a, part), getattr(b, part), tok)
    for cutoff in b.info["train_cutoffs"]:  # each training example's inputs end before its own cutoff
        t = datetime.fromisoformat(cutoff)
        ex = b.train.examples.filter(pl.col("as_of") == t)["example_id"]
        assert b.train.inputs.filter(pl.col("example_id").is_in(ex.implode()) & (pl.col("timestamp") >= t)).height == 0


def test_holdout_split_is_user_disjoint_and_refuses_censored_windows():
    ev = validate_events(purchase_log(), MAPPING)
    s = holdout_split(ev, CUTOFF, "13w")
    users = [set(getattr(s, p).examples["user_id"]) for p in ("train", "valid", "test")]
    assert not (users[0] & users[1] or users[0] & users[2] or users[1] & users[2])
    assert s.info["protocol"] == "holdout" and s.info["n_test"] > 0
    with pytest.raises(EventsError, match="runs past the last event"):
        holdout_split(ev, CUTOFF, "52w")


def test_amount_and_quantity_reach_the_features():
    ev = validate_events(purchase_log(), MAPPING)
    s = holdout_split(ev, CUTOFF, "13w")
    rich, rfm = rich_features(s.train), rfm_features(s.train)
    assert {"amount_sum", "amount_mean", "quantity_sum"} <= set(rich.columns)
    assert {"rfm_recency_d", "rfm_frequency", "rfm_monetary", "rfm_tenure_d"} <= set(rfm.columns)
    assert rfm["rfm_monetary"].drop_nulls().min() >= 5.0  # mean dollars per purchase day


@pytest.mark.parametrize("method", ["joint", "multitask"])
def test_joint_fusion_and_multi_task_train_save_and_reload(method, tmp_path):
    from behaviorlm.propensity import make_scorer
    from behaviorlm.propensity.scorers import TransformerScorer
    from behaviorlm.recommender import BehaviorLM

    ev = validate_events(purchase_log(200), MAPPING)
    split = holdout_split(ev, CUTOFF, "13w", aux=(("conversion", "26w"),))
    small = {"epochs": 1, "dim": 16, "n_layers": 1, "n_heads": 1, "max_len": 16, "progress": False}
    lm = BehaviorLM("quick", value_buckets=4, **small).fit(ev.derive(ev.df.filter(pl.col("timestamp") < CUTOFF), "cal"))
    scorer = make_scorer(method, lm, epochs=2).fit(split.train, split.valid)
    if method == "joint":
        assert scorer.net_.n_features > 0 and scorer.net_.n_outputs == 1
    else:
        assert scorer.aux_targets == ("aux_conversion_26w",) and scorer.net_.n_outputs == 2
    scores = scorer.decision_function(split.test)
    scorer.save(tmp_path)
    np.testing.assert_allclose(TransformerScorer.load(tmp_path).decision_function(split.test), scores, rtol=1e-5)
