"""The HTTP service on a real uvicorn server (127.0.0.1) driven with httpx, plus fuzzed bodies."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import httpx
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from behaviorlm.data.events import validate_events
from behaviorlm.recommender import BehaviorLM
from behaviorlm.service.api import create_app
from behaviorlm.testing import UvicornThread
from pipelines.segment import SegmentConfig, segment_day
from tests.conftest import make_funnel_events

END = datetime(2023, 11, 20, tzinfo=UTC)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    ev = validate_events(make_funnel_events(n_users=90))
    model = BehaviorLM(max_len=32, dim=32, n_layers=1, n_heads=2, epochs=3, seed=0, progress=False).fit(ev)
    seg = tmp_path_factory.mktemp("seg") / "date=2023-11-19"
    segment_day(model, ev, None, seg, END, SegmentConfig(n_windows=2), {"model_uri": "test"})
    return ev, model, seg


@pytest.fixture(scope="module")
def app(fitted):
    _, model, seg = fitted
    return create_app(model, seg.parent, api_key="")


@pytest.fixture(scope="module")
def base(app):
    with UvicornThread(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    with httpx.Client(base_url=base, timeout=30) as c:
        yield c


def _events_of(ev, user, n=None):
    df = ev.df.filter(pl.col("user_id") == user).sort("timestamp")
    df = df if n is None else df.tail(n)
    return [
        {"item_id": r["item_id"], "event_type": r["event_type"], "timestamp": r["timestamp"].isoformat()}
        for r in df.iter_rows(named=True)
    ]


def test_health_ready_and_request_ids(client):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready").json()
    assert ready["ready"] is True and ready["known_users"] == 90 and ready["segments_date"] == "2023-11-19"
    r = client.get("/health", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    made = [client.get("/health", headers={"x-request-id": "bad id!"}).headers["x-request-id"] for _ in range(2)]
    assert made[0] != made[1] and "bad" not in made[0]
    assert "/v1/recommend" in client.get("/openapi.json").json()["paths"]


def test_recommend_matches_the_library(client, fitted):
    ev, model, _ = fitted
    for user in (0, 7, 42):
        got = client.post("/v1/recommend", json={"user_id": user, "k": 5}).json()
        want = model.recommend([user], k=5)
        assert [i["item_id"] for i in got["items"]] == want["item_id"].to_list()
        assert [i["score"] for i in got["items"]] == pytest.approx(want["score"].to_list(), rel=1e-4)
        assert got["model_version"].startswith(model.model_version) and got["rationales"] is None
    # the same user as raw events (any user, known or not) ranks like recommend(events=...)
    events = _events_of(ev, 3, n=12)
    got = client.post("/v1/recommend", json={"events": events, "k": 4}).json()
    want = model.recommend(events=ev.df.filter(pl.col("user_id") == 3).sort("timestamp").tail(12), k=4)
    assert [i["item_id"] for i in got["items"]] == want["item_id"].to_list()
    # string ids of a model with integer user ids are the same user
    as_text = client.post("/v1/recommend", json={"user_id": "7", "k": 5}).json()
    assert [i["item_id"] for i in as_text["items"]] == model.recommend([7], k=5)["item_id"].to_list()


def test_recommend_options(client, fitted):
    ev, model, _ = fitted
    seen = set(ev.df.filter(pl.col("user_id") == 0)["item_id"])
    got = client.post("/v1/recommend", json={"user_id": 0, "k": 30, "exclude_seen": True}).json()["items"]
    assert not {i["item_id"] for i in got} & seen and [i["rank"] for i in got] == list(range(1, len(got) + 1))
    allowed = ["i1", "i2", "i3", "nope"]
    got = client.post("/v1/recommend", json={"user_id": 0, "k": 10, "allowed_items": allowed, "exclude_seen": False})
    assert {i["item_id"] for i in got.json()["items"]} == {"i1", "i2", "i3"}
    cold = [{"item_id": "unknown-item", "event_type": "view", "timestamp": 1_700_000_000}]
    got = client.post("/v1/recommend", json={"events": cold, "k": 3}).json()
    counts = dict(zip(model.tokenizer_.items_, model.tokenizer_.item_counts_, strict=True))
    share = {i: c / sum(counts.values()) for i, c in counts.items()}  # cold start: the training shares
    assert got["cold_start"] is True and len(got["items"]) == 3
    assert [i["score"] for i in got["items"]] == pytest.approx(sorted(share.values(), reverse=True)[:3], rel=1e-5)
    assert all(i["score"] == pytest.approx(share[i["item_id"]], rel=1e-5) for i in got["items"])


def test_explanations_only_when_asked(client, fitted):
    got = client.post("/v1/recommend", json={"user_id": 5, "k": 3, "explain": True}).json()
    items = {i["item_id"] for i in got["items"]}
    assert len(got["rationales"]) == 3 and {r["item_id"] for r in got["rationales"]} == items
    for r in got["rationales"]:
        assert r["source"] == "template" and len(r["rationale"]) > 20, r
        assert isinstance(r["evidence"], list) and len(r["evidence"]) >= 1, r
    attributed = [r for r in got["rationales"] if r["attributed"]]
    assert attributed  # the model's own reasons come back with the rationale, and the rationale cites them
    history = fitted[0].df.filter(pl.col("user_id") == 5).sort("timestamp")
    for r in attributed:
        contributions = [a["contribution"] for a in r["attributed"]]
        assert contributions == sorted(contributions, reverse=True) and r["attributed"][0]["event"] in r["evidence"]
        for a in r["attributed"]:  # each entry is the user's event at that index, not a look-alike
            e = history.row(a["event_index"], named=True)
            assert (a["item_id"], a["action"]) == (str(e["item_id"]), e["event_type"])
            assert datetime.fromisoformat(a["timestamp"]) == e["timestamp"]
    plain = client.post("/v1/recommend", json={"user_id": 5, "k": 3}).json()
    assert plain["rationales"] is None and plain["items"] == got["items"]
    # an anonymous request viewing the same item three times: its events are attributed (under
    # the id they were read with), and each attributed entry is its own event, not a look-alike
    events = [{"item_id": "i7", "event_type": "view", "timestamp": 1_700_000_000 + 60 * m} for m in range(3)]
    again = client.post("/v1/recommend", json={"events": events, "k": 3, "explain": True})
    assert again.status_code == 200, again.text
    several = [r for r in again.json()["rationales"] if len(r["attributed"]) >= 2]
    assert several
    for r in several:
        assert sorted({a["event_index"] for a in r["attributed"]}) == sorted(a["event_index"] for a in r["attributed"])
        for a in r["attributed"]:
            assert datetime.fromisoformat(a["timestamp"]).timestamp() == events[a["event_index"]]["timestamp"]


def test_next_actions(client, fitted):
    _, model, _ = fitted
    body = {"user_id": 4, "method": "beam", "n_steps": 2, "beam_width": 3}
    got = client.post("/v1/next-actions", json=body).json()
    assert sum(got["action_probabilities"].values()) == pytest.approx(1, abs=1e-4)
    assert {s["trajectory"] for s in got["steps"]} == {0, 1, 2} and {s["step"] for s in got["steps"]} == {1, 2}
    sample = {"user_id": 4, "method": "sample", "n_steps": 3, "top_p": 0.9, "seed": 7}
    assert client.post("/v1/next-actions", json=sample).json() == client.post("/v1/next-actions", json=sample).json()
    want = model.generate([4], method="greedy", n_steps=2)
    got = client.post("/v1/next-actions", json={"user_id": 4, "n_steps": 2}).json()["steps"]
    assert [s["item_id"] for s in got] == want["item_id"].to_list()


def test_propensity_and_segment(client, fitted):
    ev, _, seg = fitted
    users = pl.read_parquet(seg / "users.parquet")
    row = users.filter(pl.col("user_id") == 9).row(0, named=True)
    got = client.post("/v1/segment", json={"user_id": 9}).json()
    assert got["source"] == "batch" and got["tier"] == row["tier"] and got["cluster"] == row["cluster"]
    assert got["propensity"] == pytest.approx(row["propensity"]) and got["segments_date"] == "2023-11-19"
    online = client.post("/v1/segment", json={"events": _events_of(ev, 9)}).json()
    assert online["source"] == "online" and online["tier"] in {"Low", "Medium", "High"}
    assert 0 <= online["propensity"] <= 1 and 0 <= online["churn_propensity"] <= 1
    p = client.post("/v1/propensity", json={"user_id": 9}).json()
    assert p["propensity"] == got["propensity"] and "tier" not in p and p["horizon"] == "1d"


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"user_id": 10_000}, 404, "unknown user_id"),
        ({}, 422, "'user_id' (a known user) or 'events'"),
        ({"user_id": 1, "k": 0}, 422, "field 'k'"),
        ({"user_id": 1, "k": 101}, 422, "field 'k'"),
        ({"user_id": 1, "kk": 3}, 422, "field 'kk'"),
        ({"user_id": "x" * 500}, 422, "field 'user_id"),
        ({"events": []}, 422, "field 'events'"),
        ({"events": [{"item_id": "i1", "event_type": "view"}]}, 422, "field 'events.0.timestamp'"),
        ({"events": [{"item_id": "i1", "event_type": "view", "timestamp": "soon"}]}, 422, "events.0.timestamp"),
        ({"events": [{"item_id": "i1", "event_type": "teleport", "timestamp": 1_700_000_000}]}, 422, "teleport"),
        ({"user_id": 1, "allowed_items": ["zzz"]}, 422, "field 'allowed_items'"),
    ],
)
def test_bad_requests_name_the_field(client, body, status, field):
    r = client.post("/v1/recommend", json=body)
    assert r.status_code == status and field in r.json()["detail"], r.text


def test_malformed_bodies(client):
    r = client.post("/v1/recommend", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["detail"]
    big = json.dumps({"user_id": 1, "allowed_items": ["i1"] * 200_000}).encode()
    assert client.post("/v1/recommend", content=big, headers={"content-type": "application/json"}).status_code == 413

    def chunks():  # no Content-Length: the cap counts streamed bytes
        yield b'{"user_id": 1, "allowed_items": ['
        for _ in range(100):
            yield b'"i1",' * 4000
        yield b'"i1"]}'

    r = client.post("/v1/recommend", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = client.post("/v1/next-actions", json={"user_id": 1, "method": "nucleus"})
    assert r.status_code == 422 and "field 'method'" in r.json()["detail"]


def test_concurrent_requests_are_batched_and_identical(client, app):
    """Deterministic: the first forward pass is held until every other request is queued, so the
    60 requests must take exactly 1 + ceil(59 / max_batch) passes, however fast the machine is."""
    batcher = app.state.service.current.batcher
    app.state.service.current.online.ranks_.clear()  # earlier tests' lists would answer without the batcher
    gate, started, fn = threading.Event(), threading.Event(), batcher.fn

    def held(queries):
        started.set()
        gate.wait(timeout=60)
        return fn(queries)

    batcher.fn = held
    before = (batcher.batches, batcher.items)
    bodies = [{"user_id": u, "k": 5} for u in range(60)]
    post = lambda b: client.post("/v1/recommend", json=b).json()  # noqa: E731
    try:
        with ThreadPoolExecutor(60) as pool:
            futures = [pool.submit(post, bodies[0])]
            assert started.wait(timeout=60)  # the inference thread is inside the first pass
            futures += [pool.submit(post, b) for b in bodies[1:]]
            deadline = time.monotonic() + 60
            while batcher.pending() < 59 and time.monotonic() < deadline:
                time.sleep(0.01)
            gate.set()
            answers = [f.result(timeout=60) for f in futures]
    finally:
        batcher.fn, _ = fn, gate.set()
    batches, items = batcher.batches - before[0], batcher.items - before[1]
    assert items == 60 and batches == 1 + -(-59 // batcher.max_batch)  # waiting requests shared a pass
    for b, a in zip(bodies, answers, strict=True):
        single = client.post("/v1/recommend", json=b).json()
        assert [i["item_id"] for i in a["items"]] == [i["item_id"] for i in single["items"]]
        assert [i["score"] for i in a["items"]] == pytest.approx([i["score"] for i in single["items"]], rel=1e-4)


def test_api_key(fitted):
    _, model, _ = fitted
    with UvicornThread(create_app(model, api_key="s3cret")) as url, httpx.Client(base_url=url) as c:
        assert c.get("/health").status_code == 200
        r = c.post("/v1/recommend", json={"user_id": 1})
        assert r.status_code == 401 and "API key" in r.json()["detail"]
        assert c.post("/v1/recommend", json={"user_id": 1}, headers={"x-api-key": "wrong"}).status_code == 401
        assert c.post("/v1/recommend", json={"user_id": 1}, headers={"x-api-key": "s3cret"}).status_code == 200
        ok = c.post("/v1/recommend", json={"user_id": 1}, headers={"authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        off = c.post("/v1/segment", json={"user_id": 1}, headers={"x-api-key": "s3cret"})
        assert off.status_code == 501 and "--segments" in off.json()["detail"]  # off, not busy: no retry
        for path in ("/v1/propensity", "/v1/segment"):
            assert c.post(path, json={"user_id": 1}, headers={"x-api-key": "s3cret"}).status_code == 501
        # the key is checked before the body is parsed: a malformed body from a stranger is a 401
        junk = c.post("/v1/recommend", content=b"{not json", headers={"content-type": "application/json"})
        assert junk.status_code == 401
        assert c.post("/v1/recommend", json={"k": "x"}).status_code == 401


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"user_id": True}, "user_id"),  # JSON true is not user 1
        ({"user_id": 1, "k": True}, "k"),  # nor k=1
        ({"user_id": 1, "k": "5"}, "k"),
        ({"user_id": 1, "exclude_seen": 1}, "exclude_seen"),
        ({"user_id": 1, "allowed_items": [False]}, "allowed_items.0"),
        ({"events": [{"item_id": "i1", "event_type": "view", "timestamp": -1}]}, "events.0.timestamp"),
        (
            {"events": [{"item_id": "i1", "event_type": "view", "timestamp": "1969-12-31T23:59:59Z"}]},
            "events.0.timestamp",
        ),
        ({"events": [{"item_id": "i1", "event_type": "view", "timestamp": 4e9}]}, "events.0.timestamp"),  # 2096
    ],
)
def test_strict_types_and_time_bounds(client, body, field):
    r = client.post("/v1/recommend", json=body)
    assert r.status_code == 422 and f"field '{field}'" in r.json()["detail"], r.text


def test_request_times_follow_the_file_rule(client, fitted):
    """1.7e12 is milliseconds and 1.7e9 seconds, in a request as in a file: same answer."""
    seconds = [{"item_id": "i3", "event_type": "view", "timestamp": 1_700_000_000 + i} for i in range(3)]
    millis = [{**e, "timestamp": e["timestamp"] * 1000} for e in seconds]
    a = client.post("/v1/recommend", json={"events": seconds, "k": 5}).json()
    b = client.post("/v1/recommend", json={"events": millis, "k": 5}).json()
    assert a["items"] == b["items"]


# ---------------------------------------------------------------- property-based fuzzing: never a 5xx
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
)
values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=4))
event = st.fixed_dictionaries(
    {},
    optional={
        "item_id": st.one_of(st.sampled_from(["i1", "i2", "zz"]), st.integers(-5, 40), values),
        "event_type": st.one_of(st.sampled_from(["view", "add_to_cart", "purchase", ""]), values),
        "timestamp": st.one_of(st.integers(-10, 2**40), st.sampled_from(["2023-11-18T10:00:00Z", "x"]), values),
    },
)
body = st.fixed_dictionaries(
    {},
    optional={
        "user_id": st.one_of(st.integers(-3, 100), st.text(max_size=8), values),
        "events": st.one_of(st.lists(event, max_size=5), values),
        "k": st.one_of(st.integers(-3, 120), values),
        "exclude_seen": values,
        "allowed_items": st.one_of(st.lists(st.sampled_from(["i1", "i5", "q"]), max_size=3), values),
        "explain": st.one_of(st.booleans(), values),
        "method": st.one_of(st.sampled_from(["greedy", "sample", "beam"]), values),
        "n_steps": st.one_of(st.integers(-2, 25), values),
        "temperature": st.one_of(st.floats(-1, 12), values),
        "top_k": st.one_of(st.integers(-2, 50), values),
        "top_p": st.one_of(st.floats(-0.5, 1.5), values),
        "beam_width": st.one_of(st.integers(-1, 20), values),
    },
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/recommend", "/v1/next-actions", "/v1/propensity", "/v1/segment"]), payload=body)
def test_fuzzed_bodies_never_5xx(client, path, payload):
    r = client.post(path, content=json.dumps(payload, allow_nan=True), headers={"content-type": "application/json"})
    assert r.status_code < 500, (path, payload, r.text)
    if r.status_code != 200:  # a refusal names what was wrong
        assert isinstance(r.json()["detail"], str) and len(r.json()["detail"]) > 5, r.text


def test_load_failure_keeps_liveness_and_says_why(tmp_path):
    (tmp_path / "weights.pt").write_bytes(b"not a model")
    with UvicornThread(create_app(str(tmp_path), api_key=""), ready_path=None) as url, httpx.Client(base_url=url) as c:
        assert c.get("/health").status_code == 200
        deadline = time.monotonic() + 30
        while "failed" not in (ready := c.get("/ready")).text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.status_code == 503 and "model failed to load" in ready.json()["detail"]
        r = c.post("/v1/recommend", json={"user_id": 1})
        assert r.status_code == 503 and "failed to load" in r.json()["detail"]


def test_serve_refuses_a_missing_model(tmp_path):
    from typer.testing import CliRunner

    from behaviorlm.cli import app as cli

    res = CliRunner().invoke(cli, ["serve", "--model", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "not a registry URI" in res.output


def test_ready_names_a_local_model_folder_without_its_path():
    """Issue 31 item 9: /ready shows registry URIs as they are, a local folder by its name only."""
    from behaviorlm.service.api import public_uri

    assert public_uri("/srv/secret/models/m1") == "m1" and public_uri("data/models/m1/") == "m1"
    assert public_uri("models:/behaviorlm@champion") == "models:/behaviorlm@champion"
    assert public_uri("in-process") == "in-process" and public_uri(None) is None
