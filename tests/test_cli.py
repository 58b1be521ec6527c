"""The CLI end to end on a small CSV, and its error messages for bad input."""

from __future__ import annotations

import json
import re

import polars as pl
import pytest
from typer.testing import CliRunner

from behaviorlm.cli import app
from behaviorlm.recommender import BehaviorLM
from tests.conftest import cli_failed, make_events

runner = CliRunner()
SMALL = ["--epochs", "2", "--dim", "16", "--layers", "1", "--heads", "1", "--max-len", "16", "--batch-size", "16"]


def _source(csv_path) -> list[str]:
    """The events file of these tests, whose columns need mapping."""
    return ["--events", str(csv_path), "--user-col", "visitor", "--action-col", "what"]


@pytest.fixture(scope="module")
def csv_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "events.csv"
    make_events(n_items=30).rename({"user_id": "visitor", "event_type": "what"}).write_csv(path)
    return path


@pytest.fixture(scope="module")
def trained(csv_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    items = csv_path.parent / "items.csv"
    pl.DataFrame({"item_id": [f"item{i}" for i in range(30)], "title": [f"Item {i}" for i in range(30)]}).write_csv(
        items
    )
    res = runner.invoke(app, ["train", *_source(csv_path), "--items", str(items), "--out", str(out), *SMALL])
    assert res.exit_code == 0, res.output
    return out


def test_train_evaluate_recommend(trained, csv_path, tmp_path):
    metrics = tmp_path / "m.json"
    res = runner.invoke(app, ["evaluate", "--model", str(trained), *_source(csv_path), "--metrics-out", str(metrics)])
    assert res.exit_code == 0, res.output
    assert "popularity" in res.output and "ndcg@10" in res.output
    m = json.loads(metrics.read_text())
    verdict = "significant" if m["paired_vs_baselines"]["popularity"]["significant"] else "inside the noise"
    line = next(ln for ln in res.output.splitlines() if ln.startswith("ndcg@10 vs popularity:"))
    assert line.endswith(f"({verdict})")  # the printed verdict is the one the paired bootstrap gave
    for key in ("ndcg@10", "hr@10", "mrr"):
        assert 0 <= m[key] <= 1 and key in m["baselines"]["popularity"]
    assert pl.read_parquet(trained / "items.parquet")["title"].to_list()[:1] == ["Item 0"]
    res = runner.invoke(app, ["recommend", "--model", str(trained), "--user", "3", "--k", "4"])
    assert res.exit_code == 0, res.output
    want = BehaviorLM.load(trained).recommend([3], k=4)["item_id"].to_list()
    assert re.findall(r"\bitem\d+\b", res.output) == want  # the same four items, in rank order


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--events", "/nope.csv", "--out", "x"], "file not found: /nope.csv"),
        (["train", "--out", "x"], "exactly one of --events PATH or --dataset NAME"),
        (["train", "--dataset", "nope", "--out", "x"], "unknown dataset 'nope'"),
        (["evaluate", "--model", "/no/model", "--dataset", "otto"], "not a behaviorlm model directory"),
    ],
)
def test_bad_paths_exit_2_without_traceback(args, message):
    assert message in cli_failed(runner.invoke(app, args))


def test_bad_column_named(csv_path):
    res = runner.invoke(app, ["train", "--events", str(csv_path), "--out", "x", *SMALL])
    assert res.exit_code == 2
    out = " ".join(res.output.split())
    assert "missing column(s) user='user_id'" in out and "visitor" in out


def test_bad_rows_and_actions(tmp_path):
    path = tmp_path / "bad.csv"
    pl.DataFrame(
        {
            "user_id": [1, 1],
            "item_id": ["a", "b"],
            "event_type": ["view", "teleport"],
            "timestamp": ["2024-01-01", "2024-01-02"],
        }
    ).write_csv(path)
    res = runner.invoke(app, ["train", "--events", str(path), "--out", str(tmp_path / "m"), *SMALL])
    assert res.exit_code == 2 and "unknown action name(s) ['teleport']" in " ".join(res.output.split())
    res = runner.invoke(app, ["train", "--events", str(path), "--out", str(tmp_path / "m"), "--action-map", "oops"])
    assert res.exit_code == 2 and "--action-map" in res.output


def test_evaluate_refuses_a_model_trained_on_everything(csv_path, tmp_path):
    out = tmp_path / "full"
    args = _source(csv_path)
    assert runner.invoke(app, ["train", *args, "--out", str(out), "--holdout", "none", *SMALL]).exit_code == 0
    res = runner.invoke(app, ["evaluate", "--model", str(out), *args])
    assert res.exit_code == 2 and "would leak" in " ".join(res.output.split())


def test_evaluate_refuses_a_split_mismatch(trained, csv_path):
    res = runner.invoke(app, ["evaluate", "--model", str(trained), *_source(csv_path), "--split", "temporal"])
    assert res.exit_code == 2 and "--holdout loo" in res.output


def test_explain_offline_and_against_a_scripted_endpoint(trained, tmp_path, monkeypatch):
    from behaviorlm.testing import ScriptedLLM

    for var in ("OPENAI_API_KEY", "BEHAVIORLM_LLM_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "r.parquet"
    args = ["explain", "--model", str(trained), "--out", str(out), "--k", "3", "--max-users", "4"]
    res = runner.invoke(app, [*args, "--cache-dir", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert "offline templates" in res.output
    df = pl.read_parquet(out)
    assert df.height == 12 and set(df["source"]) == {"template"} and df["rationale"].str.len_chars().min() > 10
    monkeypatch.setenv("OPENAI_API_KEY", "sk-users-openai-key")  # exported, but this endpoint is not OpenAI
    monkeypatch.setenv("COLUMNS", "40")  # a narrow console must not wrap the machine-readable line
    with ScriptedLLM(["good"]) as llm:
        res = runner.invoke(app, [*args, "--base-url", llm.base_url, "--cache-dir", str(tmp_path / "c2")])
    assert res.exit_code == 0, res.output
    assert set(pl.read_parquet(out)["source"]) == {"llm"} and len(llm.requests) == 4
    stats = json.loads(next(line for line in res.output.splitlines() if line.startswith("{")))
    assert stats["grounding_rate"] == 1.0  # the whole statistics object on one line
    sent = " ".join(str(r["headers"]) for r in llm.requests)
    assert "sk-users-openai-key" not in sent  # OpenAI's key never goes to another endpoint
    monkeypatch.setenv("BEHAVIORLM_LLM_API_KEY", "local-key")
    with ScriptedLLM(["good"]) as llm:
        res = runner.invoke(app, [*args, "--base-url", llm.base_url, "--cache-dir", str(tmp_path / "c3")])
    assert res.exit_code == 0 and "Bearer local-key" in str(llm.requests[0]["headers"])
    res = runner.invoke(app, ["explain", "--model", str(trained), "--out", "r.csv"])
    assert res.exit_code == 2 and "--out must end in .parquet" in res.output


def test_explain_writes_the_attributions_its_rationales_cite(trained, tmp_path, monkeypatch):
    from behaviorlm.explain.attribution import COLUMNS

    for var in ("OPENAI_API_KEY", "BEHAVIORLM_LLM_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    out, att = tmp_path / "r.parquet", tmp_path / "a.parquet"
    args = ["explain", "--model", str(trained), "--out", str(out), "--k", "3", "--max-users", "4"]
    res = runner.invoke(app, [*args, "--attributions", str(att)])
    assert res.exit_code == 0, res.output
    table, contributions = pl.read_parquet(out), pl.read_parquet(att)
    assert contributions.columns == list(COLUMNS) and f"{contributions.height:,} event contributions" in res.output
    assert set(contributions.select("user_id", "item_id").unique().rows()) == set(
        table.select("user_id", "item_id").rows()
    )
    cited = table.filter(pl.col("attributed").list.len() > 0)
    assert (
        cited.height
        and cited.select(pl.col("evidence").list.contains(pl.col("attributed").list.first())).to_series().all()
    )
    res = runner.invoke(app, [*args, "--no-attribute"])
    assert res.exit_code == 0 and pl.read_parquet(out)["attributed"].list.len().sum() == 0
    res = runner.invoke(app, [*args, "--no-attribute", "--attributions", str(att)])
    assert "--no-attribute" in cli_failed(res)
    res = runner.invoke(app, [*args, "--attributions", str(tmp_path / "a.csv")])
    assert "--attributions must end in .parquet" in cli_failed(res)


def test_evaluate_writes_its_metrics_beside_the_model_not_into_the_current_folder(trained, csv_path, tmp_path):
    """Issue 31 item 17 (and 15: the notes that explain the table)."""
    import os

    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        res = runner.invoke(app, ["evaluate", "--model", str(trained), *_source(csv_path)])
    finally:
        os.chdir(here)
    assert res.exit_code == 0, res.output
    beside = trained.with_name(f"{trained.name}.metrics.json")
    assert not (tmp_path / "metrics.json").exists() and json.loads(beside.read_text())["ndcg@10"] >= 0
    assert f"wrote {beside}" in res.output.replace("\n", "")
    assert "unrankable targets:" in res.output and "catalog: the" in res.output


def test_a_model_of_integer_ids_continues_on_a_csv(tmp_path):
    """Issue 31 item 7: the documented daily increment for a model trained on integer ids (a
    Parquet file) given the next day as CSV, whose ids read as text."""
    from tests.conftest import make_funnel_events

    df = make_funnel_events(n_users=20)
    cut = 1_700_352_000  # 2023-11-19 00:00 UTC
    df.filter(pl.col("timestamp") < cut).write_parquet(tmp_path / "before.parquet")
    df.write_csv(tmp_path / "all.csv")
    small = ["--epochs", "1", "--max-len", "16", "--dim", "16", "--layers", "1", "--heads", "1"]
    res = runner.invoke(
        app, ["train", "--events", str(tmp_path / "before.parquet"), "--out", str(tmp_path / "m"), *small]
    )
    assert res.exit_code == 0, res.output
    argv = ["train", "--events", str(tmp_path / "all.csv"), "--init-from", str(tmp_path / "m"), "--epochs", "1"]
    res = runner.invoke(app, [*argv, "--out", str(tmp_path / "m2")])
    assert res.exit_code == 0, res.output
    assert BehaviorLM.load(tmp_path / "m2").histories_["user_id"].dtype.is_integer()
    df.with_columns(pl.col("user_id").cast(pl.String) + "x").write_csv(tmp_path / "bad.csv")
    argv = ["train", "--events", str(tmp_path / "bad.csv"), "--init-from", str(tmp_path / "m"), "--epochs", "1"]
    res = runner.invoke(app, [*argv, "--out", str(tmp_path / "m3")])
    assert res.exit_code == 2 and "does not read as this model's Int64 ids" in res.output, res.output
    assert "Traceback" not in res.output
