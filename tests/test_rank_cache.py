"""The known users' rank cache: same answers as the model, bounded, never stale, off where it must be."""

from __future__ import annotations

import subprocess
import sys

import httpx
import numpy as np
import pytest

from behaviorlm.recommender import BehaviorLM
from behaviorlm.service.api import create_app
from behaviorlm.service.online import OnlineRecommender
from behaviorlm.service.rank_cache import CachedList, RankCache
from behaviorlm.testing import UvicornThread
from tests.conftest import make_events


def _entry(n: int, depth: int, stamp=(5, 1.0)) -> CachedList:
    return CachedList(tuple(range(n)), tuple(1.0 / (i + 1) for i in range(n)), stamp, depth)


def test_lru_bound_depth_and_stamp():
    cache = RankCache(max_entries=2)
    cache.put(0, True, _entry(10, 10))
    cache.put(1, True, _entry(10, 10))
    assert cache.get(0, True, 5, (5, 1.0)).first(5) == ([0, 1, 2, 3, 4], [1.0, 0.5, 1 / 3, 0.25, 0.2])
    cache.put(2, True, _entry(10, 10))  # row 1 was used least recently: it leaves
    assert len(cache) == 2 and cache.get(1, True, 5, (5, 1.0)) is None
    assert cache.get(0, True, 11, (5, 1.0)) is None  # deeper than computed: ranked again
    assert cache.get(0, False, 5, (5, 1.0)) is None  # the other exclude_seen is another list
    assert cache.get(0, True, 5, (6, 2.0)) is None  # another history: never the old list
    cache.put(0, True, _entry(5, 5))  # a shallower list for the same history does not replace a deeper one
    assert cache.get(0, True, 10, (5, 1.0)) is not None
    assert (cache.hits, cache.misses) == (2, 4)


def test_off_and_bad_size():
    cache = RankCache(0)
    cache.put(0, True, _entry(3, 3))
    assert not cache.enabled and len(cache) == 0 and cache.get(0, True, 3, (5, 1.0)) is None
    with pytest.raises(ValueError, match="max_entries"):
        RankCache(-1)


@pytest.fixture(scope="module")
def model():
    events = make_events(n_users=30, n_items=50, length=10)
    return BehaviorLM(max_len=16, dim=16, n_layers=1, n_heads=1, epochs=1, progress=False).fit(events)


@pytest.mark.parametrize("exclude_seen", [True, False])
def test_cached_lists_equal_the_model_and_slice_to_smaller_k(model, exclude_seen):
    online = OnlineRecommender.from_model(model)
    users = model.histories_["user_id"].unique().sort().to_list()
    assert online.cached(users[0], 5, exclude_seen) is None  # nothing ranked yet
    online.recommend([online.query_for_user(u, k=8, exclude_seen=exclude_seen) for u in users])
    want = model.recommend(users, k=5, exclude_seen=exclude_seen)
    for u in users:
        hit = online.cached(u, 5, exclude_seen)
        rows = want.filter(want["user_id"] == u)
        assert hit is not None and hit.user_id == u
        assert hit.item_ids == rows["item_id"].to_list()
        assert hit.scores == pytest.approx(rows["score"].to_list(), rel=1e-5)
    assert online.cached(users[0], 9, exclude_seen) is None  # k=8 was computed


def test_allow_lists_are_not_cached_and_a_changed_history_is_ranked_again(model):
    online = OnlineRecommender.from_model(model)
    u = model.histories_["user_id"][0]
    allowed = online.allowed_index(list(model.tokenizer_.items_[:10]))
    online.recommend([online.query_for_user(u, k=5, exclude_seen=False, allowed=allowed)])
    assert len(online.ranks_) == 0
    online.recommend([online.query_for_user(u, k=5, exclude_seen=False)])
    assert online.cached(u, 5, False) is not None
    row = online.rows_[str(u)]
    online.enc_.last_times = np.array(online.enc_.last_times, copy=True)
    online.enc_.last_times[row] += 60.0  # the row now holds a newer history
    assert online.cached(u, 5, False) is None


def test_request_time_models_keep_no_lists():
    events = make_events(n_users=20, n_items=30, length=8)
    m = BehaviorLM(max_len=16, dim=16, n_layers=1, n_heads=1, epochs=1, time_context="request", progress=False)
    online = OnlineRecommender.from_model(m.fit(events))
    u = m.histories_["user_id"][0]
    online.recommend([online.query_for_user(u, k=5, exclude_seen=True)])
    assert not online.ranks_.enabled and online.cached(u, 5, True) is None


@pytest.mark.parametrize("size", [100, 0])
def test_service_answers_repeats_from_the_cache_with_the_same_body(model, size):
    app = create_app(model, api_key="", rank_cache=size)
    u = model.histories_["user_id"][0]
    with UvicornThread(app) as base, httpx.Client(base_url=base, timeout=30) as client:
        first = client.post("/v1/recommend", json={"user_id": u, "k": 6})
        again = client.post("/v1/recommend", json={"user_id": u, "k": 4})
        listed = client.post("/v1/recommend", json={"user_id": u, "k": 4, "allowed_items": ["item1", "item2"]})
        unknown = client.post("/v1/recommend", json={"user_id": "nobody", "k": 4})  # a 404, not a cache miss
        metrics = client.get("/metrics").text
    assert first.status_code == again.status_code == listed.status_code == 200
    assert unknown.status_code == 404
    assert again.json()["items"] == first.json()["items"][:4]
    assert {i["item_id"] for i in listed.json()["items"]} <= {"item1", "item2"}
    if size:
        assert 'behaviorlm_rank_cache_lookups_total{result="hit"} 1.0' in metrics
        assert 'behaviorlm_rank_cache_lookups_total{result="miss"} 1.0' in metrics
    else:
        assert "behaviorlm_rank_cache_lookups_total{" not in metrics


def test_serve_refuses_a_negative_cache_size(tmp_path):
    for name in ("estimator.json", "weights.pt"):  # looks like a model folder: the flags are checked before loading
        (tmp_path / name).write_text("{}")
    cmd = [sys.executable, "-m", "behaviorlm.cli", "serve", "--model", str(tmp_path), "--rank-cache", "-1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    said = res.stdout + res.stderr
    assert res.returncode != 0 and "--rank-cache must be >= 0 (0 turns it off), got -1" in said, said[-1500:]
    assert "Traceback" not in said
