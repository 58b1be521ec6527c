"""The MLflow pipeline end to end: a synthetic clickstream (fast), then Taobao with the scheduled job."""

from __future__ import annotations

import json

import polars as pl
import pytest

from behaviorlm.data.datasets import shared_data_dir
from pipelines import batch_score, demo, steps
from tests.conftest import make_funnel_events

needs_shared = pytest.mark.skipif(not shared_data_dir().exists(), reason="../shared/data not present")

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
    assert set(res) == {*steps.STEPS, "input"}
    _assert_gate_follows_the_evaluation(res["evaluate"], out)
    assert res["input"]["users"] == 60 and all(res[s]["wall_s"] >= 0 for s in steps.STEPS)
    assert res["finetune"]["skipped"] == "no --finetune method given"
    assert (out / "model" / "weights.pt").exists() and (out / "metrics.json").exists()
    assert (out / "scores" / "date=2023-11-19" / "_SUCCESS").exists()
    users = pl.read_parquet(out / "segments" / "date=2023-11-19" / "users.parquet")
    assert {"propensity", "churn_propensity", "tier", "cluster"} <= set(users.columns) and users.height == 60
    meta = json.loads((out / "segments" / "date=2023-11-19" / "_SUCCESS").read_text())
    assert meta["date"] == "2023-11-19" and meta["provenance"]["registry_version"] == res["train"]["version"]
    assert meta["provenance"]["aliases"] == [res["evaluate"]["alias"]]  # what the dashboard's model card shows
    rationales = pl.read_parquet(out / "rationales" / "date=2023-11-19.parquet")
    assert rationales.height == 25 and set(rationales["source"]) == {"template"}
    attributions = pl.read_parquet(out / "attributions" / "date=2023-11-19.parquet")  # what the rationales rest on
    assert set(attributions.select("user_id", "item_id").unique().rows()) == set(
        rationales.select("user_id", "item_id").rows()
    )
    assert res["explain"]["cites_attributed"] == 1.0 and res["explain"]["attributed_share"] > 0

    runs = mlflow.search_runs(experiment_names=["t"], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and sorted(r.info.run_name for r in children) == sorted(steps.STEPS)
    train = next(r for r in children if r.info.run_name == "train")
    explain = next(r for r in children if r.info.run_name == "explain")
    assert {"attributed_share", "cites_attributed", "distinct_per_1000"} <= set(explain.data.metrics)
    evaluate = next(r for r in children if r.info.run_name == "evaluate")
    assert evaluate.data.params["promotion_alias"] == res["evaluate"]["alias"] and "val_ndcg_10" in train.data.metrics
    assert train.inputs.dataset_inputs and train.data.tags["code_version"]

    again = steps.run(steps.parse(["segment", *base]))  # reads the saved model; nothing else reruns
    assert again["segment"]["users"] == 60
    assert pl.read_parquet(out / "segments" / "date=2023-11-19" / "users.parquet").equals(users)


def test_the_daily_increment_continues_the_champion(workspace):
    """Yesterday's champion continues on today's events; a day the champion already holds is
    refused (nothing is trained on twice)."""
    from behaviorlm.errors import InputDataError

    events = pl.read_csv(workspace / "events.csv")
    today = 1_700_352_000  # 2023-11-19 00:00 UTC
    events.filter(pl.col("timestamp") < today).write_csv(workspace / "before.csv")
    base = ["--out", str(workspace / "o"), "--epochs", "1", "--max-len", "32", "--experiment", "inc"]
    yesterday = ["--date", "2023-11-18", "--events", str(workspace / "before.csv"), *base]
    first = steps.run(steps.parse(["train", *yesterday]))
    assert steps.run(steps.parse(["evaluate", *yesterday]))["evaluate"]["alias"] == "champion"
    parent = json.loads((workspace / "o" / "model" / "estimator.json").read_text())["model_version"]
    day = ["--date", "2023-11-19", "--events", str(workspace / "events.csv"), *base]
    second = steps.run(steps.parse(["train", *day, "--init-from", "models:/behaviorlm@champion"]))
    child = json.loads((workspace / "o" / "model" / "estimator.json").read_text())
    assert child["parent_version"] == parent and child["model_version"] != parent
    assert int(second["train"]["version"]) == int(first["train"]["version"]) + 1
    runs = mlflow.search_runs(experiment_names=["inc"], output_format="list")
    inc = next(r for r in runs if r.data.params.get("init_from") == "models:/behaviorlm@champion")
    assert inc.data.params["parent_version"] == parent and int(inc.data.params["new_events"]) > 0
    increment = child["training_data"]["increments"][0]
    assert increment["holdout"] == "loo" and increment["n_events"] == int(inc.data.params["new_events"])
    with pytest.raises(InputDataError, match="already held by the model"):  # the same day again
        steps.run(steps.parse(["train", *day, "--init-from", str(workspace / "o" / "model")]))


def test_demo_runs_the_main_job_and_summarises_it_honestly(workspace, capsys):
    """`make demo`'s job: all five steps, then a summary read back from what they wrote."""
    out = workspace / "outputs"
    argv = ["--events", str(workspace / "events.csv"), "--date", "2023-11-19", "--out", str(out), "--epochs", "1"]
    assert demo.main([*argv, "--max-len", "32", "--n-windows", "2", "--explain-users", "3", "--experiment", "d"]) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "epoch 1/1 loss=" in captured.err and "left" in captured.err  # progress while it trains
    summary = text[text.index("behaviorlm demo: the main job") :]
    expected_parts = ["60 users", "model registered as behaviorlm v1", "promotion: behaviorlm v1 -> @", "popularity"]
    expected_parts += ["honest reading:", "sample rationale", f"behaviorlm dashboard --outputs {out}", "make serve"]
    for expected in expected_parts:
        assert expected in summary, expected
    assert str(out / "segments" / "date=2023-11-19") in summary and "60 users in tiers Low" in summary
    # the verdict follows the paired intervals in metrics.json, not a fixed sentence
    paired = json.loads((out / "metrics.json").read_text())["paired_vs_baselines"]
    losing = [b for b, p in paired.items() if p["significant"] and p["diff"] < 0]
    tied = [b for b, p in paired.items() if not p["significant"]]
    if losing:
        assert f"significantly worse than {', '.join(losing)}" in summary and "--recipe clickstream-small" in summary
        assert "-> @challenger; not promoted: significantly worse than" in summary and "make serve" not in summary
    elif tied:
        assert "significantly worse" not in summary and f"cannot be told apart from {', '.join(tied)}" in summary
    else:
        assert "beats every baseline, each difference outside the noise" in summary
    defaults = demo.parse([])
    assert defaults.recipe == "clickstream-quick" and defaults.keep_seen and defaults.dataset == "taobao"


def _assert_gate_follows_the_evaluation(evaluation: dict, out) -> None:
    """The promotion gate reads the paired comparisons metrics.json holds (issue 31 item 13)."""
    paired = json.loads((out / "metrics.json").read_text())["paired_vs_baselines"]
    losing = [b for b, p in paired.items() if p["significant"] and p["diff"] < 0]
    assert evaluation["alias"] == ("challenger" if losing else "champion"), (evaluation, paired)
    assert evaluation["reason"].startswith("not promoted: significantly worse than " if losing else "promoted: ")


def test_the_gate_does_not_promote_a_model_a_baseline_beats(workspace, monkeypatch):
    from behaviorlm.evaluation.report import EvaluationReport

    monkeypatch.setattr(EvaluationReport, "better_baselines", lambda self: {"repeat": "-0.0500 [-0.0700, -0.0300]"})
    base = ["--date", "2023-11-19", "--events", str(workspace / "events.csv"), "--out", str(workspace / "g")]
    base += ["--epochs", "1", "--max-len", "32", "--experiment", "gate"]
    steps.run(steps.parse(["train", *base]))
    decision = steps.run(steps.parse(["evaluate", *base]))["evaluate"]
    assert decision["alias"] == "challenger" and "significantly worse than repeat (-0.0500" in decision["reason"]
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("behaviorlm", "challenger").version) == decision["version"]
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias("behaviorlm", "champion")


def test_step_errors_are_clear(workspace, capsys):
    assert steps.main(["score", "--date", "yesterday", "--events", str(workspace / "events.csv")]) == 2
    assert "--date must be YYYY-MM-DD" in capsys.readouterr().err


@needs_shared
def test_taobao_pipeline_then_champion_batch_scoring(workspace):
    """The real shared clickstream end to end: every step, then the scheduled job from the registry."""
    out, date = workspace / "outputs", "2017-12-02"
    fast = ["--epochs", "1", "--max-len", "32", "--n-windows", "2", "--explain-users", "5", "--experiment", "tb"]
    res = steps.run(
        steps.parse(
            ["all", "--dataset", "taobao", "--date", date, "--out", str(out), "--keep-seen", "--finetune", "dpo", *fast]
        )
    )
    assert res["segment"]["users"] == 814
    tuned = res["finetune"]  # the gate's decision, with the figures it rests on
    assert tuned["contexts"] > 0 and "NDCG@10" in tuned["reason"]
    registered = json.loads((out / "registration.json").read_text())
    assert (registered["version"] == tuned.get("version")) == tuned["kept"]  # only a kept copy is registered
    _assert_gate_follows_the_evaluation(res["evaluate"], out)
    assert 0.0 < json.loads((out / "metrics.json").read_text())["ndcg@10"] and "cooccurrence_ndcg@10" in res["evaluate"]

    daily = workspace / "daily"
    version = res["train"]["version"]  # promoted or not (a 1-epoch model may lose to a baseline): this version
    argv = ["--date", date, "--dataset", "taobao", "--out", str(daily), "--chunk-users", "300"]
    argv += ["--model", f"models:/behaviorlm/{version}"]
    assert batch_score.main(argv) == 0
    scores = pl.read_parquet(sorted((daily / "scores" / f"date={date}").glob("part-*.parquet")))
    assert scores["user_id"].n_unique() == scores.height // 10 and scores["model_version"].n_unique() == 1
    seg_dir = daily / "segments" / f"date={date}"
    users = pl.read_parquet(seg_dir / "users.parquet")
    assert set(users["user_id"]) == set(scores["user_id"]) and users["propensity"].is_between(0, 1).all()
    assert set(users["tier"]) == {"Low", "Medium", "High"}
    meta = json.loads((seg_dir / "_SUCCESS").read_text())
    assert meta["provenance"]["registry_version"] == res["train"]["version"] and meta["provenance"]["run_id"]
    assert {"user_segments.png", "profiles.parquet"} <= {p.name for p in seg_dir.iterdir()}

    stamps = {
        p: p.stat().st_mtime_ns for p in [*seg_dir.iterdir(), *(daily / "scores" / f"date={date}").glob("part-*")]
    }
    assert batch_score.main(argv) == 0  # same date again: nothing recomputed, nothing duplicated
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps and pl.read_parquet(seg_dir / "users.parquet").equals(
        users
    )


def test_two_demo_runs_print_the_same_figures(workspace, capsys):
    """Fixed seeds and thread settings: the same command twice gives the same metrics and segments."""
    figures = []
    for run in ("a", "b"):
        out = workspace / run
        argv = ["--events", str(workspace / "events.csv"), "--date", "2023-11-19", "--out", str(out), "--epochs", "2"]
        argv += ["--max-len", "32", "--n-windows", "2", "--explain-users", "3", "--experiment", f"det-{run}"]
        assert demo.main(argv) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        users = pl.read_parquet(out / "segments" / "date=2023-11-19" / "users.parquet")
        figures.append(
            (metrics["ndcg@10"], metrics["baselines"], users.select("user_id", "tier", "cluster").sort("user_id"))
        )
    assert figures[0][0] == figures[1][0] and figures[0][1] == figures[1][1]
    assert figures[0][2].equals(figures[1][2])


def test_a_users_own_file_goes_through_the_pipeline_with_the_clis_options(workspace, capsys):
    """Issue 31 item 11: own column names and action names, the CLI's options, no --date."""
    events = pl.read_csv(workspace / "events.csv")
    actions = sorted(events["event_type"].unique())
    mine = events.rename({"user_id": "customer", "item_id": "sku", "event_type": "what", "timestamp": "ts"})
    mine.with_columns(("shop_" + pl.col("what")).alias("what")).write_csv(workspace / "mine.csv")
    own = ["--events", str(workspace / "mine.csv"), "--user-col", "customer", "--item-col", "sku"]
    own += ["--action-col", "what", "--time-col", "ts", "--time-unit", "s", "--invalid", "drop"]
    own += ["--action-map", ",".join(f"shop_{a}={a}" for a in actions), "--plausible-times"]
    out = workspace / "own"
    fast = ["--out", str(out), "--epochs", "1", "--max-len", "32", "--experiment", "own"]
    assert steps.main(["train", *own, *fast]) == 0, capsys.readouterr().err
    last_day = "2023-11-19"
    assert f"--date not given: {last_day}" in capsys.readouterr().err
    assert steps.main(["score", *own, *fast]) == 0
    scores = pl.read_parquet(out / "scores" / f"date={last_day}" / "part-*.parquet")
    assert set(scores["user_id"]) == {str(u) for u in events["user_id"]}  # ids as written (text)
    assert demo.parse(["--events", "mine.csv", "--user-col", "customer"]).date is None  # taken from the data
    assert steps.main(["train", "--events", str(workspace / "mine.csv"), *fast]) == 2  # canonical names absent
    assert "--user-col" in capsys.readouterr().err


def test_the_served_model_answers_every_user_as_the_batch_scores_of_the_day(workspace):
    """Issue 31 item 12: the registered model knows every event up to the date (remembered, not
    trained on: the evaluation still passes its leak check), so the API equals the batch."""
    import httpx

    from behaviorlm.recommender import BehaviorLM
    from behaviorlm.service.api import create_app
    from behaviorlm.testing import UvicornThread
    from behaviorlm.tracking import load_model_ref

    out = workspace / "o"
    base = ["--date", "2023-11-19", "--events", str(workspace / "events.csv"), "--out", str(out), "--epochs", "1"]
    base += ["--max-len", "32", "--experiment", "same"]
    for step in ("train", "evaluate", "score"):  # the evaluation refuses a model that trained on its targets
        assert steps.main([step, *base]) == 0
    scores = pl.read_parquet(out / "scores" / "date=2023-11-19" / "part-*.parquet")
    served, _ = load_model_ref("models:/behaviorlm@champion")
    assert served.model_version == scores["model_version"][0]
    assert served.training_data_["context"]["n_events"] == 2 * 60  # each user's held-out two, known
    with UvicornThread(create_app(served, api_key="")) as url, httpx.Client(base_url=url, timeout=30) as c:
        for user, rows in scores.sort("rank").group_by("user_id", maintain_order=True):
            got = c.post("/v1/recommend", json={"user_id": user[0], "k": 10}).json()
            assert [i["item_id"] for i in got["items"]] == rows["item_id"].to_list(), user
    reloaded = BehaviorLM.load(out / "model")
    assert reloaded.context_.height == 120 and len(reloaded.history_events()) == len(served.history_events())
