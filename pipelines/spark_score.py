"""Batch scoring on Spark with the registered pyfunc: ``mlflow.pyfunc.spark_udf``.

    python -m pipelines.spark_score --users users.parquet --model models:/behaviorlm@champion --out scores_spark

Each executor loads the model once and scores its partition of user ids; the result is one row
per user with the top-K item ids, equal to the single-process scorer's ranking. Locally this
runs in ``local[2]`` mode; on a cluster, submit it with ``spark-submit`` (the executors need
this package and its dependencies installed, or ``env_manager="virtualenv"``) and point
``MLFLOW_TRACKING_URI`` at a tracking server the executors can reach.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def spark_recommendations(spark: Any, users: Any, model_uri: str, k: int = 10) -> Any:
    """Spark DataFrame with ``user_id`` -> the same plus ``item_ids`` (array<string>, best first)."""
    import mlflow
    from pyspark.sql.functions import struct

    udf = mlflow.pyfunc.spark_udf(
        spark, model_uri, result_type="array<string>", env_manager="local", params={"k": k, "format": "items"}
    )
    return users.withColumn("item_ids", udf(struct("user_id")))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", required=True, help="Parquet with a user_id column")
    ap.add_argument("--model", default="models:/behaviorlm@champion")
    ap.add_argument("--out", required=True)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--master", default="local[2]")
    args = ap.parse_args(argv)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # local workers: this environment's python
    from behaviorlm.extras import require_extra

    require_extra("spark", "pipelines.spark_score")
    from pyspark.sql import SparkSession

    from behaviorlm.tracking import setup

    setup()
    spark = SparkSession.builder.master(args.master).appName("behaviorlm-score").getOrCreate()
    try:
        users = spark.read.parquet(args.users).select("user_id")
        spark_recommendations(spark, users, args.model, args.k).write.mode("overwrite").parquet(args.out)
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
