"""``method="auto"``: the choice is made on validation users no candidate has seen, and explained."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from behaviorlm.errors import ConfigurationError
from behaviorlm.propensity import PropensityModel, select_method
from behaviorlm.propensity.labels import ExampleSet


class Fake:
    """Scores with a fixed amount of label noise; remembers what it was fitted on."""

    def __init__(self, noise: float, fails: bool = False):
        self.noise, self.fails = noise, fails

    def fit(self, train, valid):
        if self.fails:
            raise ConfigurationError("does not apply here")
        self.seen_users_ = set(train.examples["user_id"]) | set(valid.examples["user_id"])
        return self

    def decision_function(self, ex):
        rng = np.random.default_rng(len(ex))
        return ex.labels + self.noise * rng.standard_normal(len(ex))


def examples(n: int, offset: int = 0) -> ExampleSet:
    rng = np.random.default_rng(offset)
    ex = pl.DataFrame(
        {"example_id": np.arange(n), "user_id": [f"u{i + offset}" for i in range(n)], "label": rng.integers(0, 2, n)}
    )
    return ExampleSet(ex, pl.DataFrame({"example_id": []}))


def test_the_best_on_the_unseen_half_wins_and_the_others_are_explained():
    fakes = {"good": Fake(0.3), "bad": Fake(3.0), "broken": Fake(0.0, fails=True)}
    train, valid = examples(200), examples(400, offset=1000)
    chosen, scorer, report = select_method(tuple(fakes), train, valid, lambda m: fakes[m])
    assert chosen == "good" and scorer is fakes["good"]
    assert report["roc_auc"]["good"] > report["roc_auc"]["bad"] and report["skipped"] == {
        "broken": "does not apply here"
    }
    assert "good" in report["why"] and "bad" in report["why"]
    # the half the choice was made on was never given to any candidate
    compared = len(valid) - len(fakes["good"].seen_users_ - set(train.examples["user_id"]))
    assert 0 < compared < len(valid)


def test_nothing_applies_is_an_error():
    with pytest.raises(ConfigurationError, match="no propensity method applies"):
        select_method(("x",), examples(50), examples(50, 99), lambda m: Fake(0.0, fails=True))


def test_auto_is_the_default_and_a_saved_choice_reloads(funnel_events, tmp_path):
    pm = PropensityModel(horizon="1d", n_windows=2).fit(funnel_events)
    assert pm.params["method"] == "auto" and pm.method_ in ("lightgbm", "bgnbd")
    assert pm.selection_ is not None and "bgnbd" in pm.selection_["skipped"]  # some users never bought
    pm.save(tmp_path / "pm")
    back = PropensityModel.load(tmp_path / "pm")
    assert back.method_ == pm.method_ and back.selection_ == pm.selection_
    np.testing.assert_allclose(back.predict(funnel_events)["propensity"], pm.predict(funnel_events)["propensity"])
