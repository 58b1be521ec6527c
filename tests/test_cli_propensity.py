"""`behaviorlm propensity` and `behaviorlm segment` end to end, and their bad-input messages."""

from __future__ import annotations

import polars as pl
import pytest
from typer.testing import CliRunner

from behaviorlm.cli import app
from behaviorlm.segments import store
from behaviorlm.segments.store import SegmentsFolder
from tests.conftest import cli_failed, make_funnel_events

runner = CliRunner()
SMALL = ["--epochs", "2", "--dim", "16", "--layers", "1", "--heads", "1", "--max-len", "32", "--batch-size", "32"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("prop")
    make_funnel_events().rename({"event_type": "action"}).write_csv(root / "events.csv")
    src = ["--events", str(root / "events.csv"), "--action-col", "action"]
    res = runner.invoke(app, ["train", *src, "--out", str(root / "model"), "--holdout", "none", *SMALL])
    assert res.exit_code == 0, res.output
    return root, src


def test_propensity_then_segment(workspace):
    root, src = workspace
    scores = root / "scores.parquet"
    args = ["propensity", *src, "--model", str(root / "model"), "--out", str(scores), "--method", "lightgbm"]
    res = runner.invoke(app, [*args, "--churn-horizon", "1d", "--save-dir", str(root / "pm"), "--n-windows", "2"])
    assert res.exit_code == 0, res.output
    table = pl.read_parquet(scores)
    assert table.columns == ["user_id", "as_of", "propensity", "churn_propensity"]
    assert table["propensity"].is_between(0, 1).all() and table["user_id"].n_unique() == table.height
    # a segments folder the service can serve: models under propensity/<column>/, _SUCCESS last
    served = SegmentsFolder.load(root / "pm")
    assert set(served.models) == {"propensity", "churn_propensity"} and served.assigner is None
    out = root / "segments"
    res = runner.invoke(
        app, ["segment", *src, "--model", str(root / "model"), "--scores", str(scores), "--out", str(out), "--k", "3"]
    )
    assert res.exit_code == 0, res.output
    assert "3 clusters" in res.output
    users = pl.read_parquet(out / "users.parquet")
    assert {"tier", "cluster", "propensity", "churn_propensity"} <= set(users.columns)
    assert (out / "user_segments.png").exists() and (out / "profiles.parquet").exists()
    assert store.is_complete(out) and store.read_record(out)["summary"]["clusters"] == 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--action", "checkout"], "target action 'checkout' never occurs in column 'event_type'"),
        (["--horizon", "tomorrow"], "horizon 'tomorrow' is not a duration"),
        (["--method", "transformer", "--no-model"], "needs a pretrained model"),
        (["--method", "oracle"], "unknown propensity method 'oracle'"),
        (["--out-csv"], "--out must end in .parquet"),
    ],
)
def test_propensity_bad_input(workspace, extra, message):
    root, src = workspace
    out = "x.csv" if "--out-csv" in extra else str(root / "bad.parquet")
    model = [] if "--no-model" in extra else ["--model", str(root / "model")]
    extra = [e for e in extra if e not in ("--no-model", "--out-csv")]
    args = ["propensity", *src, *model, "--out", out, "--method", "lightgbm", *extra]
    assert message in cli_failed(runner.invoke(app, args))


def test_segment_bad_input(workspace, tmp_path):
    root, src = workspace
    scores = tmp_path / "s.parquet"
    pl.DataFrame({"user_id": [1, 2], "score": [0.1, 0.2]}).write_parquet(scores)
    base = ["segment", *src, "--model", str(root / "model"), "--out", str(tmp_path / "o")]
    res = runner.invoke(app, [*base, "--scores", str(scores)])
    assert res.exit_code == 2 and "missing column 'propensity'" in res.output
    res = runner.invoke(app, [*base, "--scores", str(tmp_path / "none.parquet")])
    assert res.exit_code == 2 and "no such file" in res.output
    res = runner.invoke(app, [*base, "--scores", str(scores), "--bins", "0,a,1"])
    assert res.exit_code == 2 and "--bins" in res.output
