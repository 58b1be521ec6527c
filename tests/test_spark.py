"""Spark scale-out: spark_udf over the registered pyfunc equals the single-process scorer."""

from __future__ import annotations

import shutil
import sys

import pandas as pd
import pytest

from behaviorlm.recommender import BehaviorLM
from tests.conftest import make_events

pyspark = pytest.importorskip("pyspark")
mlflow = pytest.importorskip("mlflow")
if shutil.which("java") is None:
    pytest.skip("Spark needs a Java runtime", allow_module_level=True)

from behaviorlm import tracking  # noqa: E402
from pipelines.spark_score import spark_recommendations  # noqa: E402


def test_spark_udf_equals_single_process(tmp_path, monkeypatch):
    from pyspark.sql import SparkSession

    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)  # workers must use this venv, not PATH's python3
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("BEHAVIORLM_DATA_DIR", str(tmp_path / "data"))
    uri = tracking.setup("spark")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the Python workers resolve models:/ too
    model = BehaviorLM(max_len=16, dim=16, n_layers=1, n_heads=1, epochs=1, progress=False).fit(
        make_events(n_users=25, n_items=40, length=8)
    )
    model.save(tmp_path / "model")
    with mlflow.start_run():
        info = tracking.log_model(model, tmp_path / "model", registered_model_name="behaviorlm")
    tracking.promote(info.registered_model_version, 0.1)
    spark = SparkSession.builder.master("local[2]").appName("test").config("spark.ui.enabled", "false").getOrCreate()
    try:
        users = spark.createDataFrame(pd.DataFrame({"user_id": list(range(25))}))
        got = spark_recommendations(spark, users, "models:/behaviorlm@champion", k=5).toPandas()
    finally:
        spark.stop()
    expected = model.recommend(list(range(25)), k=5)
    want = {u: g["item_id"].to_list() for (u,), g in expected.partition_by("user_id", as_dict=True).items()}
    assert len(got) == 25
    for u, items in zip(got["user_id"], got["item_ids"], strict=True):
        assert [i for i in items if i] == [str(i) for i in want[u]]


def test_torch_distributor_runs_the_same_ddp_training(tmp_path, monkeypatch):
    """TorchDistributor (local Spark, 2 processes) trains what one process trains (same global batch)."""
    import numpy as np
    from pyspark.sql import SparkSession

    from behaviorlm.spark_train import train_on_spark

    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    make_events(n_users=30, n_items=20, length=8).write_csv(tmp_path / "events.csv")
    args = ["--events", str(tmp_path / "events.csv"), "--holdout", "none", "--recipe", "quick", "--epochs", "2"]
    args += ["--dim", "16", "--layers", "1", "--heads", "1", "--max-len", "12", "--batch-size", "16", "--dropout", "0"]
    spark = SparkSession.builder.master("local[2]").appName("test").config("spark.ui.enabled", "false").getOrCreate()
    try:
        train_on_spark([*args, "--out", str(tmp_path / "spark")], num_processes=2, local_mode=True, spark=spark)
    finally:
        spark.stop()
    from behaviorlm.spark_train import train_command

    train_command([*args, "--out", str(tmp_path / "one")])
    a, b = BehaviorLM.load(tmp_path / "one"), BehaviorLM.load(tmp_path / "spark")
    assert a.tokenizer_.to_dict() == b.tokenizer_.to_dict()
    la, lb = ([e["loss"] for e in m.history_.epochs] for m in (a, b))
    np.testing.assert_allclose(lb, la, rtol=1e-4)


def test_spark_prepare_equals_the_polars_prepare(tmp_path, monkeypatch):
    import numpy as np
    import polars as pl
    from pyspark.sql import SparkSession

    from behaviorlm.sequence.prepare import PrepareConfig, prepare
    from behaviorlm.sequence.spark_prepare import prepare_spark
    from tests.conftest import make_funnel_events

    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)
    df = make_funnel_events(n_users=60)
    df = pl.concat([df, df.head(1), df.slice(7, 1)])  # exact duplicates across files
    (tmp_path / "in").mkdir()
    for i in range(3):
        df.gather(np.arange(i, df.height, 3)).write_parquet(tmp_path / "in" / f"part-{i}.parquet")
    cfg = PrepareConfig(rows_per_shard=300, workers=1)
    ref = prepare(tmp_path / "in", tmp_path / "polars", config=cfg)
    spark = (
        SparkSession.builder.master("local[2]").appName("test").config("spark.ui.enabled", "false")
        .config("spark.sql.session.timeZone", "UTC").getOrCreate()
    )  # fmt: skip
    try:
        got = prepare_spark(spark, tmp_path / "in", tmp_path / "spark", config=cfg)
    finally:
        spark.stop()
    assert got.tokenizer.to_dict() == ref.tokenizer.to_dict()
    assert got.report["rows_kept"] == ref.report["rows_kept"] and got.n_tokens == ref.n_tokens

    def by_user(p):
        return {
            u: tuple(
                a[int(enc.offsets[i]) : int(enc.offsets[i + 1])].tolist() for a in (enc.items, enc.actions, enc.gaps)
            )
            for enc in p
            for i, u in enumerate(enc.user_ids)
        }

    assert by_user(got) == by_user(ref)
    c_ref, c_got = ref.corpus(), got.corpus()  # same canonical training order, whatever the sharding
    np.testing.assert_array_equal(c_got.ends - c_got.starts, c_ref.ends - c_ref.starts)
