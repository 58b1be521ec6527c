"""The practitioners' baselines return the hand-computed ranking on hand-made logs, and the
report lists the seen-only rules as not applicable where seen items are excluded."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from behaviorlm.data.events import validate_events
from behaviorlm.evaluation import (
    ContextCatalog,
    ItemKNNBaseline,
    RecentBaseline,
    RepeatBaseline,
    SessionKNNBaseline,
    evaluate,
    leave_one_out,
    rank_targets,
)
from behaviorlm.evaluation.splits import Holdout

T = 1_700_000_000
HOUR = 3600


def _events(rows: list[tuple]) -> object:
    return validate_events(pl.DataFrame(rows, schema=["user_id", "item_id", "event_type", "timestamp"], orient="row"))


def _ranking(scorer, inputs, user, catalog: pl.Series, n: int) -> list[str]:
    (_, scores), *_ = list(scorer.score(inputs, [user], catalog))
    order = np.argsort(-scores[0].numpy(), kind="stable")[:n]
    return [catalog[int(i)] for i in order]


@pytest.fixture
def train():
    # sessions (30-minute gaps): u1 {a, b, c}; u2 {a, d}; u3 {e, f}, then {f}; popularity f 3 > a 2 > ...
    return _events(
        [
            ("u1", "a", "view", T),
            ("u1", "b", "view", T + 60),
            ("u1", "c", "view", T + 120),
            ("u2", "a", "view", T),
            ("u2", "d", "view", T + 60),
            ("u3", "e", "view", T),
            ("u3", "f", "view", T + 60),
            ("u3", "f", "view", T + 10 * HOUR),
            ("u3", "f", "add_to_cart", T + 11 * HOUR),
        ]
    )


@pytest.fixture
def catalog(train):
    return train.df["item_id"].unique(maintain_order=True)


def test_recent_is_the_users_distinct_items_newest_first_then_popularity(train, catalog):
    inputs = _events(
        [("q", "c", "view", T), ("q", "a", "view", T + 1), ("q", "c", "view", T + 2), ("q", "b", "view", T + 3)]
    )
    ranking = _ranking(RecentBaseline().fit(train, catalog), inputs, "q", catalog, 6)
    assert ranking == ["b", "c", "a", "f", "d", "e"]  # then f (3 events) before d and e (1 each, order kept)


def test_repeat_weights_actions_and_decays_with_age(train, catalog):
    rule = RepeatBaseline().fit(train, catalog)
    rule.weights_, rule.default_weight_, rule.half_life_ = {"view": 1.0, "add_to_cart": 4.0}, 1.0, 1.0
    # ages: d 0 (view) -> 1.0; c 1 (cart) -> 4 * 0.5 = 2.0; a 2 and 3 (views) -> 0.25 + 0.125 = 0.375
    inputs = _events(
        [("q", "a", "view", T), ("q", "a", "view", T + 1), ("q", "c", "add_to_cart", T + 2), ("q", "d", "view", T + 3)]
    )
    assert _ranking(rule, inputs, "q", catalog, 4) == ["c", "d", "a", "f"]


def test_repeat_fits_its_weights_on_training_events_only(train, catalog):
    rule = RepeatBaseline().fit(train, catalog)
    # u3's internal target is its cart on f, preceded by views of f: views repeat, carts never precede a target
    assert rule.half_life_ in RepeatBaseline.half_lives
    assert rule.weights_["view"] > 0 and set(rule.weights_) <= {"view", "add_to_cart"}
    assert set(rule.fit_ndcg_) == set(RepeatBaseline.half_lives)


def test_session_knn_votes_with_the_similarity_of_the_nearest_sessions(train, catalog):
    inputs = _events([("q", "a", "view", T)])
    # sims: {a,b,c} 1/sqrt(3), {a,d} 1/sqrt(2): a gets both, d 0.707, b and c 0.577 (tie -> popularity, order kept)
    assert _ranking(SessionKNNBaseline().fit(train, catalog), inputs, "q", catalog, 5) == ["a", "d", "b", "c", "f"]


def test_item_knn_ranks_the_cosine_neighbours_of_the_last_item(train, catalog):
    inputs = _events([("q", "e", "view", T), ("q", "b", "view", T + 1)])
    # b co-occurs with a and c (once each): cos(b, b) 1, (b, c) 1, (b, a) 1/sqrt(2); then popularity
    ranking = _ranking(ItemKNNBaseline().fit(train, catalog), inputs, "q", catalog, 4)
    assert ranking[:2] in (["b", "c"], ["c", "b"]) and ranking[2:] == ["a", "f"]


def test_seen_only_rules_are_not_applicable_when_seen_items_are_excluded(events):
    split = leave_one_out(events)
    model = RecentBaseline().fit(split.train, split.train.df["item_id"].unique(maintain_order=True))
    excluded = evaluate(model, split, exclude_seen=True, n_boot=10)
    for name in ("recent", "repeat"):
        assert "not_applicable" in excluded.baselines[name] and name not in excluded.paired
    assert "n/a (seen items excluded)" in excluded.table()
    kept = evaluate(model, split, exclude_seen=False, n_boot=10)
    assert {"recent", "repeat", "sknn", "itemknn"} <= set(kept.paired)
    assert "with_context_items" in kept.model and set(kept.model["by_target"]) == {"repeat", "new"}


def test_context_items_credit_a_new_item_the_user_just_touched(train, catalog):
    inputs = _events([("q", "a", "view", T), ("q", "brand-new", "view", T + 1), ("r", "other-new", "view", T)])
    targets = pl.DataFrame({"user_id": ["q", "r"], "item_id": ["brand-new", "a"], "event_type": ["view", "view"]})
    ho = Holdout(inputs, targets.with_columns(timestamp=pl.lit(T + 5)))
    ctx = ContextCatalog.of(catalog, inputs)
    assert ctx.n_train == len(catalog) and len(ctx.catalog) == len(catalog) + 2
    ur = rank_targets(RecentBaseline().fit(train, catalog), ho, ctx, k=3, exclude_seen=False)
    by_user = dict(zip(ur.users, zip(ur.ranks, ur.ranks_context, ur.repeat, strict=True), strict=True))
    assert by_user["q"][0] == np.inf and by_user["q"][1] == 1.0 and by_user["q"][2]  # credited only with context
    # r: its own new item, then popularity (f 3 events, then a): a third; not a repeat target
    assert by_user["r"][1] == 3.0 and not by_user["r"][2]
    # a constant scorer ties everything: its pessimistic rank counts the training catalog and the
    # user's *own* context item, never another user's
    const = rank_targets(_Constant(), ho, ctx, k=3, exclude_seen=False)
    assert dict(zip(const.users, const.ranks_context, strict=True))["r"] == len(catalog) + 1


class _Constant:
    name = "constant"

    def score(self, inputs, users, catalog):
        import torch

        yield users, torch.zeros(len(users), len(catalog))


def test_baselines_and_the_tokenizer_read_item_ids_alike():
    """One id mapping: "007" is not item 7 for the model, so it is not for a baseline either."""
    from behaviorlm.evaluation import catalog_index
    from behaviorlm.sequence.tokenizer import ActionTokenizer

    ev = _events([(1, 7, "view", T), (1, 8, "view", T + 1), (2, 7, "view", T + 2)])
    tok = ActionTokenizer(min_item_count=1).fit(ev)
    asked = pl.Series(["007", "7", "8", "x", "7.0"])
    catalog = pl.Series("item_id", tok.items_, dtype=pl.Int64)
    model_known = tok.item_index(asked) >= 4  # N_SPECIAL
    baseline_known = catalog_index(catalog, asked) >= 0
    assert model_known.tolist() == [False, True, True, False, False]
    assert baseline_known.tolist() == model_known.tolist()
    assert catalog_index(pl.Series("item_id", [7, 8], dtype=pl.Int32), pl.Series(["007", "8"])).tolist() == [-1, 1]
