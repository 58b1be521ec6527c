"""The low-latency path ranks exactly like BehaviorLM.recommend, cached or not, batched or not."""

from __future__ import annotations

import threading

import pytest

from behaviorlm.recommender import BehaviorLM
from behaviorlm.service.online import MicroBatcher, OnlineRecommender
from tests.conftest import make_events


@pytest.fixture(scope="module")
def model():
    events = make_events(n_users=40, n_items=60, length=12)
    return BehaviorLM(max_len=16, dim=16, n_layers=1, n_heads=1, epochs=1, progress=False).fit(events)


def _items(ranked):
    return [r.item_ids for r in ranked]


@pytest.mark.parametrize("exclude_seen", [True, False])
def test_online_equals_batch_recommend_cold_and_cached(model, exclude_seen):
    online = OnlineRecommender.from_model(model)
    users = model.histories_["user_id"].unique().sort().to_list()
    want = model.recommend(users, k=7, exclude_seen=exclude_seen)
    want_items = [want.filter(want["user_id"] == u)["item_id"].to_list() for u in users]
    queries = [online.query_for_user(u, k=7, exclude_seen=exclude_seen) for u in users]
    first = online.recommend(queries[:5]) + online.recommend(queries[5:])  # transformer forward
    assert online.cached_.all()
    again = [online.recommend([q])[0] for q in queries]  # output layer only
    assert _items(first) == want_items and _items(again) == want_items
    flat = lambda rs: [s for r in rs for s in r.scores]  # noqa: E731
    assert flat(again) == pytest.approx(flat(first), rel=1e-5)


def test_allowed_items_and_events(model):
    online = OnlineRecommender.from_model(model)
    u = model.histories_["user_id"][0]
    allowed = list(model.tokenizer_.items_[:10])
    q = online.query_for_user(u, k=5, exclude_seen=False, allowed=online.allowed_index(allowed))
    want = model.recommend([u], k=5, exclude_seen=False, allowed_items=allowed)["item_id"].to_list()
    assert online.recommend([q])[0].item_ids == want


def test_batcher_batches_and_propagates_errors():
    seen, gate, started = [], threading.Event(), threading.Event()

    def fn(xs):
        started.set()
        gate.wait(timeout=30)  # the first batch is held until everything else is queued
        seen.append(len(xs))
        if "boom" in xs:
            raise ValueError("boom")
        return [x * 2 for x in xs]

    b = MicroBatcher(fn, max_batch=4)
    try:
        futs = [b.submit(0)]
        assert started.wait(timeout=30)  # the worker is inside the first batch
        futs += [b.submit(i) for i in range(1, 10)]
        gate.set()
        assert [f.result(timeout=5) for f in futs] == [i * 2 for i in range(10)]
        assert seen == [1, 4, 4, 1]  # one alone, then full batches of what waited
        with pytest.raises(ValueError, match="boom"):
            b.submit("boom").result(timeout=5)
        assert b.submit(5).result(timeout=5) == 10  # the worker survived
    finally:
        b.close()
