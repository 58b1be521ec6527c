"""Training on Spark: ``TorchDistributor`` runs the ``behaviorlm train`` command as DDP processes.

The functions live in the installed package (not in ``pipelines/``) because TorchDistributor
pickles the function it runs, and its processes -- on the driver in local mode, on executors
otherwise -- import it by module name. See ``pipelines/spark_train.py`` for the command line.
"""

from __future__ import annotations

from typing import Any


def train_command(args: list[str]) -> None:
    """One process's work: the ``behaviorlm train`` command with ``args``, raising on failure."""
    from behaviorlm.cli import app

    try:
        app(["train", *args], prog_name="behaviorlm", standalone_mode=False)
    except SystemExit as e:  # typer's exit codes: anything but 0 is a failed rank
        if e.code not in (0, None):
            raise RuntimeError(f"behaviorlm train {' '.join(args)} exited with {e.code}") from None


def train_on_spark(args: list[str], num_processes: int = 2, local_mode: bool = True, spark: Any = None) -> None:
    """Run ``behaviorlm train args`` as ``num_processes`` DDP processes via TorchDistributor."""
    from behaviorlm.extras import require_extra

    require_extra("spark", "pipelines.spark_train")
    from pyspark.ml.torch.distributor import TorchDistributor

    if spark is None:
        from pyspark.sql import SparkSession

        SparkSession.builder.getOrCreate()  # TorchDistributor uses the active session
    distributor = TorchDistributor(num_processes=num_processes, local_mode=local_mode, use_gpu=False)
    distributor.run(train_command, args)
