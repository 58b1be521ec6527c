"""BG/NBD and Pareto/NBD: the published CDNOW estimates, recovery from simulated customers, and
the scorer's contract."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import polars as pl
import pytest

from behaviorlm.data.datasets import cdnow_dir, load_dataset
from behaviorlm.errors import ConfigurationError
from behaviorlm.propensity.btyd import BTYDModel, BTYDScorer, Summary, bgnbd_p_alive, rfm_summary, simulate_bgnbd
from behaviorlm.propensity.labels import cutoff_examples

FHL_2005 = {"r": 0.243, "alpha": 4.414, "a": 0.793, "b": 2.426}  # Fader, Hardie & Lee (2005), table 1
PARETO_CDNOW = {"r": 0.553, "alpha": 10.578, "s": 0.606, "beta": 11.669}  # Fader & Hardie's Pareto/NBD note

needs_cdnow = pytest.mark.skipif(
    not (cdnow_dir() / "sample.parquet").exists(), reason="CDNOW not fetched: run `behaviorlm fetch --name cdnow`"
)


@pytest.fixture(scope="module")
def cdnow_sample_summary() -> Summary:
    """The 2,357-customer sample, calibration weeks 1-39, ``T`` measured to 1997-09-30 as in the paper."""
    ev = load_dataset("cdnow-sample").events
    cal = ev.df.filter(pl.col("timestamp") < datetime(1997, 10, 1, tzinfo=UTC))
    users = cal.select(pl.col("user_id").unique().sort(), as_of=pl.lit(datetime(1997, 9, 30, tzinfo=UTC)))
    return rfm_summary(cal, users, key="user_id")


@needs_cdnow
def test_bgnbd_matches_the_published_cdnow_estimates(cdnow_sample_summary):
    s = cdnow_sample_summary
    assert len(s) == 2357 and int(s.x.sum()) == 2457  # the paper: 2,457 repeat transactions in weeks 1-39
    m = BTYDModel("bgnbd").fit(s)
    for name, value in FHL_2005.items():
        assert m.param_dict[name] == pytest.approx(value, rel=0.01), name
    assert m.loglik_ == pytest.approx(-9582.4, abs=0.5)


@needs_cdnow
def test_pareto_nbd_matches_the_published_cdnow_estimates(cdnow_sample_summary):
    m = BTYDModel("paretonbd").fit(cdnow_sample_summary)
    for name, value in PARETO_CDNOW.items():
        assert m.param_dict[name] == pytest.approx(value, rel=0.01), name
    assert m.loglik_ == pytest.approx(-9595.0, abs=0.5)


def test_bgnbd_recovers_simulated_parameters():
    truth = (0.6, 3.0, 1.2, 4.0)
    rng = np.random.default_rng(3)
    sim = simulate_bgnbd(truth, T=rng.uniform(26, 52, 20_000), seed=4)
    fitted = BTYDModel("bgnbd").fit(sim).params_
    np.testing.assert_allclose(fitted, truth, rtol=0.15)
    # and a different truth gives a clearly different answer (the test can fail)
    other = BTYDModel("bgnbd").fit(simulate_bgnbd((0.3, 6.0, 0.5, 2.0), T=np.full(20_000, 39.0), seed=5)).params_
    assert np.abs(np.log(other / fitted)).max() > 0.4


def test_predictions_behave():
    m = BTYDModel("bgnbd")
    m.params_ = np.array(list(FHL_2005.values()))
    s = Summary(np.array([0.0, 2.0, 2.0, 7.0]), np.array([0.0, 30.0, 5.0, 35.0]), np.full(4, 39.0))
    alive = bgnbd_p_alive(m.params_, s)
    assert alive[0] == 1.0  # never repeated: cannot have dropped out yet
    assert alive[1] > alive[2]  # same frequency, the more recent buyer is more likely alive
    p13, p39 = m.p_purchase(s, 13.0), m.p_purchase(s, 39.0)
    assert ((p13 > 0) & (p13 < p39) & (p39 < 1)).all()
    assert (m.expected_purchases(s, 39.0) >= p39 - 1e-9).all()  # E[count] >= P(count >= 1)


def _purchase_log() -> pl.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for u in range(300):
        t = datetime(2020, 1, 1, tzinfo=UTC).timestamp() + rng.uniform(0, 30) * 86400
        rate = rng.gamma(1.0, 1 / 20)  # purchases per day
        while t < datetime(2020, 12, 31, tzinfo=UTC).timestamp():
            rows.append((f"c{u}", "purchase", t, float(rng.uniform(5, 50))))
            t += rng.exponential(1 / rate) * 86400
            if rng.random() < 0.15:
                break
    return pl.DataFrame(rows, schema=["user_id", "event_type", "timestamp", "amount"], orient="row")


def test_scorer_ranks_and_round_trips(tmp_path):
    from behaviorlm.data.events import ColumnMapping, validate_events

    ev = validate_events(_purchase_log(), ColumnMapping(item=None, amount="amount"))
    ex = cutoff_examples(ev, "2020-07-01", "13w")
    scorer = BTYDScorer("bgnbd", "13w").fit(ex)
    p = scorer.decision_function(ex)
    assert p.shape == (len(ex),) and ((p >= 0) & (p <= 1)).all()
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(ex.labels, p) > 0.7
    scorer.save(tmp_path)
    np.testing.assert_allclose(BTYDScorer.load(tmp_path).decision_function(ex), p)
    churn = BTYDScorer("bgnbd", "13w", target="churn").fit(ex)
    np.testing.assert_allclose(churn.decision_function(ex), 1 - p)  # a purchase-only log: the complement


def test_customer_without_purchase_is_a_clear_error():
    ex = cutoff_examples(
        pl.DataFrame(
            {
                "user_id": ["a", "a", "b"],
                "item_id": [1, 1, 2],
                "event_type": ["view", "purchase", "view"],
                "timestamp": [1.6e9, 1.6e9 + 10, 1.6e9],
            }
        ),
        datetime(2021, 1, 1, tzinfo=UTC),
        "1d",
    )
    with pytest.raises(ConfigurationError, match="need a purchase before as_of"):
        BTYDScorer().fit(ex)
