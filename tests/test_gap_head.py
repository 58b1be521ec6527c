"""The gap head: its likelihood (observed and censored), its CDF, the censored windows it
trains on, and a zero-shot "P(next purchase within h)" that learns who comes back when."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch

from behaviorlm.data.events import validate_events
from behaviorlm.errors import ConfigurationError
from behaviorlm.nn.gap_head import gap_cdf, gap_nll, within
from behaviorlm.nn.training import batch_from_windows, make_windows
from behaviorlm.recommender import BehaviorLM
from behaviorlm.sequence.corpus import Corpus
from behaviorlm.sequence.tokenizer import PAD, EncodedSequences

DAY = 86_400.0


def test_the_likelihood_of_an_observed_gap_and_of_a_censored_silence_by_hand():
    p = torch.zeros(1, 1, 6, 5)  # one position; actions 4, 5 real; buckets 2, 3, 4 real
    cells = {(4, 2): 0.1, (4, 3): 0.2, (4, 4): 0.3, (5, 2): 0.15, (5, 3): 0.05, (5, 4): 0.2}
    for (a, b), v in cells.items():
        p[0, 0, a, b] = v
    lj = p.log()
    total, n = gap_nll(lj, torch.tensor([[5]]), torch.tensor([[3]]), torch.tensor([[PAD]]))
    assert n == 1 and math.isclose(float(total), -math.log(0.05), rel_tol=1e-6)
    total, n = gap_nll(lj, torch.tensor([[PAD]]), torch.tensor([[PAD]]), torch.tensor([[3.0]]))
    assert n == 1 and math.isclose(float(total), -math.log(0.2 + 0.3 + 0.05 + 0.2), rel_tol=1e-6)  # buckets >= 3
    total, _ = gap_nll(lj, torch.tensor([[PAD]]), torch.tensor([[PAD]]), torch.tensor([[3.5]]))  # half-way into 3
    assert math.isclose(float(total), -math.log(0.5 * (0.2 + 0.05) + 0.3 + 0.2), rel_tol=1e-6)


def test_the_cdf_spreads_a_bucket_uniformly_in_log_time_and_never_into_the_open_last_one():
    p = torch.tensor([[0.0, 0.0, 0.5, 0.25, 0.25]], dtype=torch.float64)  # buckets 2, 3, 4 (4 is open)
    at = lambda s: float(gap_cdf(p, torch.tensor([s], dtype=torch.float64)))  # noqa: E731
    assert at(0.0) == 0.0
    assert math.isclose(at(2**0.5 - 1), 0.25)  # halfway through bucket 2 in log2(1 + s)
    assert math.isclose(at(1.0), 0.5) and math.isclose(at(2**1.5 - 1), 0.625)
    assert math.isclose(at(1e9), 0.75)  # the open bucket's mass stays beyond any horizon
    lj = torch.zeros(1, 6, 5, dtype=torch.float64).fill_(float("-inf"))
    lj[0, 4, 2:] = p[0, 2:].log()
    got = float(within(lj, 4, torch.tensor([1.0], dtype=torch.float64), 2.0))  # from s=1 to s=3
    assert math.isclose(got, (0.75 - 0.5) / (1 - 0.5))  # survival: given no event in the first second
    cut = float(within(lj, 4, torch.tensor([1.0], dtype=torch.float64), 2.0, span_s=2.0))  # nothing seen past 2 s
    assert math.isclose(cut, (0.5 + 0.25 * (math.log2(3) - 1) - 0.5) / (1 - 0.5))


def test_censored_windows_make_the_last_event_an_input_whose_only_target_is_the_silence():
    enc = EncodedSequences(
        ["a", "b"], np.array([0, 3, 5]), np.array([1, 10, 11, 1, 12]), np.array([1, 4, 4, 1, 4]),
        np.array([1, 1, 5, 1, 1]),
    )  # fmt: skip
    corpus = Corpus.from_sequences(enc)
    plain = make_windows(corpus, max_len=8)
    assert plain.ends.tolist() == [2, 4] and plain.censor is None
    w = make_windows(corpus, max_len=8, censor=np.array([9, PAD]))
    assert w.ends.tolist() == [3, 4] and w.censor.tolist() == [9, PAD]
    batch = batch_from_windows(corpus, w.starts, w.ends, w.censor)
    assert batch["items"][0].tolist() == [1, 10, 11]  # the last event is an input now ...
    assert batch["target_items"][0].tolist() == [10, 11, PAD]  # ... with no next item
    assert batch["censor"].tolist() == [[PAD, PAD, 9], [PAD, PAD, PAD]]  # the second row: padding
    assert batch["target_gaps"][0].tolist() == [1, 5, PAD]


def rhythms(n_users: int = 120, seed: int = 0) -> tuple[pl.DataFrame, float]:
    """Daily buyers of 'd' items and monthly buyers of 'm' items, all seen up to one end time and
    all last seen about half a day before it: only what they bought tells their rhythm."""
    rng = np.random.default_rng(seed)
    end, rows = 1_700_000_000 + 200 * DAY, []
    for u in range(n_users):
        daily = u % 2 == 0
        gap = DAY if daily else 30 * DAY
        t = end - rng.uniform(0.4, 0.6) * DAY
        for _ in range(6):
            rows.append((u, f"{'d' if daily else 'm'}{int(rng.integers(0, 5))}", "purchase", t))
            t -= gap * rng.uniform(0.9, 1.1)
    df = pl.DataFrame(rows, schema=["user_id", "item_id", "event_type", "timestamp"], orient="row")
    return df.with_columns(pl.col("timestamp").cast(pl.Int64)), end


@pytest.fixture(scope="module")
def rhythm_model():
    df, end = rhythms()
    ev = validate_events(df)
    model = BehaviorLM(
        gap_head=True, dim=16, n_layers=1, n_heads=1, max_len=12, n_time_buckets=26, epochs=30, batch_size=16,
        lr=1e-2, progress=False, seed=0,
    )  # fmt: skip
    return model.fit(ev, observed_until=end), ev, end


def test_a_pretrained_gap_head_knows_who_buys_within_two_days(rhythm_model, tmp_path):
    model, ev, end = rhythm_model
    p = model.next_event_within("2d", events=ev, action="purchase", as_of=end)
    daily = p.filter(pl.col("user_id") % 2 == 0)["p"]
    monthly = p.filter(pl.col("user_id") % 2 == 1)["p"]
    assert daily.min() > monthly.max(), (daily.describe(), monthly.describe())
    assert daily.mean() > 0.6 and monthly.mean() < 0.2
    first = ev.df["timestamp"].min().timestamp()
    assert math.isclose(float(model.model_.gap_head.span_s), end - first)  # the longest gap the data could show
    again = BehaviorLM.load(model.save(tmp_path / "m"), retrieval="exact")
    assert again.next_event_within("2d", events=ev, action="purchase", as_of=end).equals(p)
    with pytest.raises(ConfigurationError, match="no gap head"):
        BehaviorLM(dim=8, n_layers=1, n_heads=1, epochs=1, progress=False).fit(ev).next_event_within("2d", events=ev)


def test_the_next_gap_propensity_method_is_the_same_zero_shot_probability(rhythm_model):
    from behaviorlm.propensity.estimator import make_scorer
    from behaviorlm.propensity.labels import cutoff_examples

    model, ev, end = rhythm_model
    ex = cutoff_examples(ev, end, "2d")
    got = make_scorer("next_gap", model, horizon="2d").fit(ex, ex).decision_function(ex)
    want = model.next_event_within("2d", events=ev, action="purchase", as_of=end)
    by_user = dict(zip(want["user_id"].to_list(), want["p"].to_list(), strict=True))
    np.testing.assert_allclose(got, [by_user[u] for u in ex.examples["user_id"].to_list()], rtol=1e-6)
    with pytest.raises(ConfigurationError, match="needs a model pretrained with a gap head"):
        make_scorer("next_gap", BehaviorLM(dim=8, n_layers=1, n_heads=1, epochs=1, progress=False).fit(ev))
