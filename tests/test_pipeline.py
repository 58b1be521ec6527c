"""The MLflow pipeline end to end on a small synthetic clickstream, then one step rerun alone."""

from __future__ import annotations

import polars as pl
import pytest

from pipelines import steps
from tests.conftest import make_funnel_events

mlflow = pytest.importorskip("mlflow")


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("BEHAVIORLM_DATA_DIR", str(tmp_path / "data"))
    make_funnel_events(n_users=60).write_csv(tmp_path / "events.csv")
    yield tmp_path
    mlflow.set_tracking_uri(None)


def test_all_steps_as_nested_runs_then_one_step_again(workspace):
    out = workspace / "outputs"
    base = ["--date", "2023-11-19", "--events", str(workspace / "events.csv"), "--out", str(out), "--epochs", "2"]
    base += ["--max-len", "32", "--n-windows", "2", "--explain-users", "5", "--experiment", "t"]
    res = steps.run(steps.parse(["all", *base]))
    assert set(res) == set(steps.STEPS) and res["train"]["alias"] == "champion"
    assert (out / "model" / "weights.pt").exists() and (out / "metrics.json").exists()
    assert (out / "scores" / "date=2023-11-19" / "_SUCCESS").exists()
    users = pl.read_parquet(out / "segments" / "date=2023-11-19" / "users.parquet")
    assert {"propensity", "churn_propensity", "tier", "cluster"} <= set(users.columns) and users.height == 60
    rationales = pl.read_parquet(out / "rationales" / "date=2023-11-19.parquet")
    assert rationales.height == 25 and set(rationales["source"]) == {"template"}

    runs = mlflow.search_runs(experiment_names=["t"], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and sorted(r.info.run_name for r in children) == sorted(steps.STEPS)
    train = next(r for r in children if r.info.run_name == "train")
    assert train.data.params["promotion_alias"] == "champion" and "val_ndcg_10" in train.data.metrics
    assert train.inputs.dataset_inputs and train.data.tags["code_version"]

    again = steps.run(steps.parse(["segment", *base]))  # reads the saved model; nothing else reruns
    assert again["segment"]["users"] == 60
    assert pl.read_parquet(out / "segments" / "date=2023-11-19" / "users.parquet").equals(users)


def test_step_errors_are_clear(workspace, capsys):
    assert steps.main(["score", "--date", "yesterday", "--events", str(workspace / "events.csv")]) == 2
    assert "--date must be YYYY-MM-DD" in capsys.readouterr().err
