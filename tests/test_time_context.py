"""A model that reads the request time: it learns what only the time of the request can tell,
every consumer supplies that time, and nothing of the target beyond its time reaches it."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import numpy as np
import polars as pl
import pytest

from behaviorlm.data.events import validate_events
from behaviorlm.errors import InputDataError
from behaviorlm.evaluation import evaluate, leave_one_out
from behaviorlm.recommender import BehaviorLM

T0 = 1_700_000_000
SMALL = dict(
    dim=32, n_layers=1, n_heads=2, max_len=24, epochs=40, batch_size=8, lr=5e-3, progress=False, seed=0, patience=30
)


def when_matters(n_users: int = 80, n_events: int = 16, seed: int = 0) -> pl.DataFrame:
    """The next item depends on *when* it comes: a minute later the user moves one item on
    (same session), a day later ten items on (a new visit). History alone cannot tell which."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        t, item = T0 + int(rng.integers(0, 86_400)), int(rng.integers(0, 20))
        for _ in range(n_events):
            rows.append((u, f"i{item}", "view", t))
            soon = rng.random() < 0.5
            t += int(rng.integers(20, 60)) if soon else int(rng.integers(86_400, 3 * 86_400))
            item = (item + (1 if soon else 10)) % 20
    return pl.DataFrame(rows, schema=["user_id", "item_id", "event_type", "timestamp"], orient="row")


@pytest.fixture(scope="module")
def split():
    return leave_one_out(validate_events(when_matters()))


@pytest.fixture(scope="module")
def request_model(split):
    return BehaviorLM(time_context="request", **SMALL).fit(split.train, split.valid, exclude_seen=False)


def test_the_request_time_tells_what_history_cannot(split, request_model):
    history = BehaviorLM(**SMALL).fit(split.train, split.valid, exclude_seen=False)
    with_time = evaluate(request_model, split, k=1, exclude_seen=False, n_boot=0, baselines=()).model["hr@1"]
    without = evaluate(history, split, k=1, exclude_seen=False, n_boot=0, baselines=()).model["hr@1"]
    assert without < 0.75 and with_time > 0.9, (without, with_time)  # history alone: at best a coin flip


def test_recommend_takes_the_request_time_and_refuses_one_before_the_history(split, request_model, tmp_path):
    df = split.test.inputs.df.filter(pl.col("user_id") == 3)
    last = df["timestamp"].max()
    soon = request_model.recommend(events=df, k=1, exclude_seen=False, as_of=last.timestamp() + 30)
    later = request_model.recommend(events=df, k=1, exclude_seen=False, as_of=last.timestamp() + 2 * 86_400)
    step = lambda r: (int(r["item_id"][0][1:]) - int(df["item_id"][-1][1:])) % 20  # noqa: E731
    assert (step(soon), step(later)) == (1, 10)
    now = request_model.recommend(events=df, k=1, exclude_seen=False)  # no as_of: asked now
    assert now.equals(request_model.recommend(events=df, k=1, exclude_seen=False, as_of=time.time()))
    with pytest.raises(InputDataError, match="as_of is before the last event of 1 user"):
        request_model.recommend(events=df, k=1, as_of=datetime(2020, 1, 1, tzinfo=timezone.utc))
    loaded = BehaviorLM.load(request_model.save(tmp_path / "m"), retrieval="exact")
    assert loaded.time_context_ == "request"
    assert loaded.recommend(events=df, k=1, exclude_seen=False, as_of=last.timestamp() + 30).equals(soon)


def test_the_api_asks_a_request_time_model_at_the_time_of_the_request(split, request_model):
    """Raw events a minute old and two days old: the API's answer follows the clock."""
    import httpx

    from behaviorlm.service.api import create_app
    from behaviorlm.testing import UvicornThread

    history = split.test.inputs.df.filter(pl.col("user_id") == 3)
    items = history["item_id"].to_list()[-5:]

    def events(ago: float) -> list[dict]:
        now = time.time()
        return [
            {"item_id": i, "event_type": "view", "timestamp": now - ago - 60 * (4 - n)} for n, i in enumerate(items)
        ]

    with UvicornThread(create_app(request_model, api_key="")) as url, httpx.Client(base_url=url, timeout=30) as c:
        answers = {
            ago: c.post("/v1/recommend", json={"events": events(ago), "k": 1, "exclude_seen": False}).json()
            for ago in (30, 2 * 86_400)
        }
    step = {ago: (int(a["items"][0]["item_id"][1:]) - int(items[-1][1:])) % 20 for ago, a in answers.items()}
    assert step == {30: 1, 2 * 86_400: 10}, answers
