"""Hot reload under load: the alias moves, the service swaps versions, no request fails."""

from __future__ import annotations

import threading

import httpx
import pytest

from behaviorlm.data.events import validate_events
from behaviorlm.recommender import BehaviorLM
from behaviorlm.service.api import create_app
from behaviorlm.service.reload import RegistryWatcher
from behaviorlm.testing import UvicornThread
from tests.conftest import make_events

mlflow = pytest.importorskip("mlflow")

from behaviorlm import tracking  # noqa: E402


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Two registered versions of a small model (other seeds), champion on version 1."""
    root = tmp_path_factory.mktemp("reload")
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.setenv("BEHAVIORLM_DATA_DIR", str(root / "data"))
    tracking.setup("reload-test")
    ev = validate_events(make_events(n_users=30))
    versions = []
    for seed in (0, 1):
        model = BehaviorLM(max_len=16, dim=16, n_layers=1, n_heads=1, epochs=1, seed=seed, progress=False).fit(ev)
        model.save(root / f"m{seed}")
        with mlflow.start_run():
            info = tracking.log_model(model, root / f"m{seed}", registered_model_name="behaviorlm")
        versions.append(str(info.registered_model_version))
    client = mlflow.MlflowClient()
    client.set_registered_model_alias("behaviorlm", "champion", versions[0])
    yield client, versions, ev
    mlflow.set_tracking_uri(None)
    mp.undo()


def test_alias_move_swaps_without_failed_requests(registry):
    client, versions, ev = registry
    app = create_app("models:/behaviorlm@champion", api_key="", reload_interval=0.2)
    users = ev.df["user_id"].unique().to_list()
    seen_versions: set[str] = set()
    failures: list[str] = []  # collected here: an assert inside a worker thread is only a warning
    stop = threading.Event()
    answered = {v: threading.Event() for v in ("old", "new")}

    def hammer(w: int) -> None:
        with httpx.Client(base_url=base, timeout=30) as c:
            i = w
            while not stop.is_set():
                body = (
                    {"user_id": users[i % len(users)], "k": 5}
                    if i % 2
                    else {
                        "events": [{"item_id": "item3", "event_type": "view", "timestamp": 1_700_000_000 + i}],
                        "k": 5,
                    }
                )
                r = c.post("/v1/recommend", json=body)
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:200]}")
                elif r.headers["x-model-version"] != r.json()["model_version"]:
                    failures.append(f"header {r.headers['x-model-version']} != body {r.json()['model_version']}")
                else:
                    version = r.json()["model_version"]
                    seen_versions.add(version)
                    answered["old" if version == old_version else "new"].set()
                i += 8

    with UvicornThread(app) as base:
        first = httpx.get(base + "/ready").json()
        assert first["registry_version"] == versions[0] and first["reload"]["follows"].endswith("@champion")
        old = app.state.service.current
        old_version = first["model_version"]
        threads = [threading.Thread(target=hammer, args=(w,)) for w in range(8)]
        for t in threads:
            t.start()
        # gates, not sleeps: move the alias once the old version answered under load, stop once the
        # new one has (the timeouts only keep a hung service from hanging the suite)
        assert answered["old"].wait(timeout=60), f"no answer from the old version: {failures[:3]}"
        client.set_registered_model_alias("behaviorlm", "champion", versions[1])
        assert answered["new"].wait(timeout=60), f"the service never answered from the new version: {failures[:3]}"
        stop.set()
        for t in threads:
            t.join()
        ready = httpx.get(base + "/ready").json()
        metrics = httpx.get(base + "/metrics").text
        # the old version's cached lists left with it: a known user is ranked by the new weights
        new = app.state.service.current
        answered_now = httpx.post(base + "/v1/recommend", json={"user_id": users[1], "k": 5}).json()["items"]
        want = new.model.recommend([users[1]], k=5)["item_id"].to_list()
    assert failures == []
    assert len(seen_versions) == 2, seen_versions  # answers came from both sides of the swap
    assert ready["reload"]["reloads"] == 1 and ready["reload"]["last_swap_seconds"] > 0
    assert 'behaviorlm_reloads_total{result="ok"} 1.0' in metrics
    assert f'behaviorlm_model_info{{version="{ready["model_version"]}"}} 1.0' in metrics
    assert 'behaviorlm_requests_total{route="/v1/recommend",status="200"}' in metrics
    assert "behaviorlm_batch_size_bucket" in metrics and "behaviorlm_request_seconds_bucket" in metrics
    assert old.batcher.stopped(timeout=5)  # the retired version's worker has stopped
    assert new.online.ranks_ is not old.online.ranks_ and len(old.online.ranks_) > 0
    assert [i["item_id"] for i in answered_now] == want


def test_a_failed_reload_keeps_the_old_version_and_says_why(registry):
    client, versions, _ = registry
    client.set_registered_model_alias("behaviorlm", "champion", versions[0])
    swapped = []

    def broken_build(model, provenance):
        raise RuntimeError("disk full")

    watcher = RegistryWatcher(
        "models:/behaviorlm@champion", 1.0, {"registry_version": "nonexistent"}, broken_build, swapped.append
    )
    assert watcher.check() is False and swapped == []
    assert "disk full" in watcher.status()["last_error"]
    with pytest.raises(ValueError, match="follows an alias"):
        RegistryWatcher("models:/behaviorlm/1", 1.0, {}, broken_build, swapped.append)


def test_a_broken_version_is_retried_with_back_off_and_its_traceback_logged_once(registry, caplog):
    """Issue 31 item 9: a broken version under the alias is not reloaded at every poll."""
    client, versions, _ = registry
    client.set_registered_model_alias("behaviorlm", "champion", versions[1])
    builds, now = [], [1000.0]

    def broken_build(model, provenance):
        builds.append(provenance["registry_version"])
        raise RuntimeError("cannot load this version")

    watcher = RegistryWatcher(
        "models:/behaviorlm@champion", 10.0, {"registry_version": versions[0]}, broken_build, id, clock=lambda: now[0]
    )
    with caplog.at_level("WARNING", logger="behaviorlm.service.reload"):
        for _ in range(5):  # five polls inside the first back-off (20 s): one load
            assert watcher.check() is False
            now[0] += 3
        assert builds == [versions[1]]
        now[0] += 10  # past 20 s: tried again, then 40 s of back-off
        watcher.check()
        now[0] += 30
        watcher.check()
        assert builds == [versions[1]] * 2
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "attempt 2" in caplog.records[-1].getMessage()
    assert watcher.version == versions[0] and "cannot load" in watcher.status()["last_error"]
    client.set_registered_model_alias("behaviorlm", "champion", versions[0])
