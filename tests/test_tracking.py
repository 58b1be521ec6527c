"""MLflow: project-local default store, the pyfunc in a fresh process, the promotion gate both ways."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from behaviorlm.recommender import BehaviorLM
from tests.conftest import make_events

mlflow = pytest.importorskip("mlflow")

from behaviorlm import tracking  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("track")
    model = BehaviorLM(max_len=16, dim=16, n_layers=1, n_heads=1, epochs=2, batch_size=16, progress=False)
    model.fit(make_events(n_users=20))
    model.save(root / "model")
    return root, BehaviorLM.load(root / "model")


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh project-local store: no MLFLOW_TRACKING_URI, data dir in tmp."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("BEHAVIORLM_DATA_DIR", str(tmp_path / "data"))
    uri = tracking.setup("test")
    yield uri
    mlflow.set_tracking_uri(None)


def test_default_store_is_sqlite_inside_the_data_dir(store, tmp_path, monkeypatch):
    assert store == f"sqlite:///{(tmp_path / 'data' / 'mlflow' / 'mlflow.db').resolve()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.tracking_uri() == "http://127.0.0.1:5999"


def test_pyfunc_loads_and_predicts_in_a_fresh_process(store, saved):
    root, model = saved
    with mlflow.start_run():
        info = tracking.log_model(model, root / "model", registered_model_name="behaviorlm")
    decision = tracking.promote(info.registered_model_version, 0.2)
    assert decision.alias == "champion"
    expected = model.recommend([1, 2], k=3)
    code = (
        "import json, mlflow, pandas as pd; "
        "m = mlflow.pyfunc.load_model('models:/behaviorlm@champion'); "
        "out = m.predict(pd.DataFrame({'user_id': [1, 2]}), params={'k': 3}); "
        "print(json.dumps(out.to_dict(orient='list')))"
    )
    env = dict(os.environ, MLFLOW_TRACKING_URI=store)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["item_id"] == expected["item_id"].to_list() and got["rank"] == expected["rank"].to_list()
    assert got["score"] == pytest.approx(expected["score"].to_list(), rel=1e-5)


def test_pyfunc_predicts_from_raw_events_and_rejects_bad_input(saved, monkeypatch):
    for var in ("OPENAI_API_KEY", "BEHAVIORLM_LLM_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    _, model = saved
    events = make_events(n_users=3, seed=5).to_pandas()
    events["timestamp"] = pd.to_datetime(events["timestamp"], unit="s", utc=True)
    out = tracking.predict_frame(model, events, {"k": 2, "exclude_seen": False})  # 14 events cover all 12 items
    assert list(out.columns) == ["user_id", "item_id", "score", "rank"] and len(out) == 6
    explained = tracking.predict_frame(
        model, pd.DataFrame({"user_id": [1, 2]}), {"k": 2, "exclude_seen": False, "explain": True}
    )
    assert len(explained) == 4 and explained["rationale"].str.len().min() > 10
    assert set(explained["rationale_source"]) == {"template"} and explained["evidence"].map(len).min() >= 1
    grounded = explained[explained["attributed"].map(len) > 0]  # the model's reasons, cited
    assert len(grounded) and all(a[0] in e for a, e in zip(grounded["attributed"], grounded["evidence"], strict=True))
    with pytest.raises(ValueError, match="'user_id' column"):
        tracking.predict_frame(model, pd.DataFrame({"visitor": [1]}))


def test_promotion_gate_both_ways(store, saved):
    root, model = saved
    versions = []
    for _ in range(4):
        with mlflow.start_run():
            versions.append(tracking.log_model(model, root / "model", registered_model_name="behaviorlm"))
    v = [i.registered_model_version for i in versions]
    assert tracking.promote(v[0], 0.10).alias == "champion"
    worse = tracking.promote(v[1], 0.05)
    assert worse.alias == "challenger" and worse.champion_version == str(v[0]) and worse.champion_score == 0.10
    assert tracking.promote(v[2], 0.12).alias == "champion"
    assert tracking.promote(v[3], 0.115, tolerance=0.01).alias == "champion"  # within tolerance
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("behaviorlm", "champion").version) == str(v[3])
    assert str(client.get_model_version_by_alias("behaviorlm", "challenger").version) == str(v[1])


class _Planted:
    """A pickle that runs code when loaded: what a tampered registry version could hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_serving_a_registry_version_never_unpickles_it(store, saved, tmp_path):
    """Issue 31 item 3: the service and the batch job load the version's model folder with the
    project's loader; a python_model.pkl that runs code is never loaded."""
    import pickle

    root, model = saved
    with mlflow.start_run():
        info = tracking.log_model(model, root / "model", registered_model_name="behaviorlm")
    tracking.promote(info.registered_model_version, 0.2)
    pickles = list((tmp_path / "data" / "mlflow").rglob("python_model.pkl"))
    assert len(pickles) == 1
    marker = tmp_path / "code-ran"
    pickles[0].write_bytes(pickle.dumps(_Planted(marker)))
    loaded, provenance = tracking.load_model_ref("models:/behaviorlm@champion")
    assert not marker.exists()
    assert provenance["registry_version"] == str(info.registered_model_version) and provenance["run_id"]
    assert loaded.model_version == model.model_version
    assert loaded.recommend([1], k=3)["item_id"].to_list() == model.recommend([1], k=3)["item_id"].to_list()
    folder = (tmp_path / "data" / "cache" / "registry" / "behaviorlm" / str(info.registered_model_version)).resolve()
    assert folder.is_dir()  # the download (and any index written beside it) lives in the project's cache
