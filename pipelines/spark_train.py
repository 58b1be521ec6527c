"""Training on a Spark cluster through ``pyspark.ml.torch.distributor.TorchDistributor``.

    python -m pipelines.spark_train --num-processes 2 -- --prepared data/prepared --out data/model

Everything after ``--`` is a ``behaviorlm train`` command line; TorchDistributor starts
``num_processes`` copies of it under torchrun (``local_mode``: on the driver; otherwise one per
Spark task on the executors), each with ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` set, and the
command runs the same DDP training as ``behaviorlm train --nproc N``: the global batch is
split over the processes, only rank 0 writes the model. On a cluster, every executor needs this
package installed and the ``--prepared`` folder (or ``--events``) on storage they all see; rank
0's output path must be shared storage too.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, train_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-processes", type=int, default=2)
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--cluster", action="store_true", help="run on the executors, not the driver")
    args = ap.parse_args(ours)
    if not train_args:
        ap.error("give the behaviorlm train arguments after --, e.g. -- --prepared DIR --out MODEL")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from behaviorlm.extras import require_extra

    require_extra("spark", "pipelines.spark_train")
    from pyspark.sql import SparkSession

    spark = SparkSession.builder.master(args.master).appName("behaviorlm-train").getOrCreate()
    from behaviorlm.spark_train import train_on_spark

    try:
        train_on_spark(train_args, args.num_processes, local_mode=not args.cluster, spark=spark)
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
