"""Preparation on Spark, for logs that outgrow one machine: the same transform, the same shards.

:func:`prepare_spark` runs the steps of :mod:`behaviorlm.sequence.prepare` with Spark
DataFrames and writes the same folder format (:mod:`behaviorlm.sequence.shards`), equal to the
polars path on the same input (same vocabulary, same per-user token sequences; tested on local
Spark). The work that defines the result is shared code, not a re-implementation:

1. **validate**: every Spark partition goes through the same ``validate_schema`` (``mapInArrow``),
   tagged with its input file and row order;
2. **deduplicate and order**: exact duplicates dropped (the first, by file and row, kept); each
   user's events ordered by (time, file, row) as the in-memory path orders them;
3. **vocabulary**: item counts and first appearances (global user rank, position) by Spark
   aggregations, collected to the driver and turned into a tokenizer by the same
   :func:`~behaviorlm.sequence.prepare.vocabulary` the polars path uses;
4. **encode**: users hash-partitioned into buckets; each executor encodes its bucket with the
   same ``ActionTokenizer.encode`` and writes one shard with the same ``write_shard``.

On a cluster ``out`` must be storage that the driver and every executor see (shards are written
by the executors). Row numbers in validation errors count within a Spark partition of the file.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from behaviorlm.data.events import Events, validate_schema
from behaviorlm.data.io import write_text_atomic
from behaviorlm.data.schema import InputSchema
from behaviorlm.errors import BehaviorLMError, InputDataError
from behaviorlm.sequence import shards
from behaviorlm.sequence.prepare import (
    KEY_SHIFT,
    STAGING,
    PrepareConfig,
    begin,
    check_same_columns,
    input_files,
    plan_of,
    vocabulary,
)
from behaviorlm.sequence.tokenizer import ActionTokenizer

_KEY = ["user_id", "item_id", "event_type", "timestamp"]


def prepare_spark(
    spark: Any,
    events: str | Path | list[str | Path],
    out: str | Path,
    schema: InputSchema | None = None,
    config: PrepareConfig | None = None,
) -> shards.PreparedShards:
    """Validate and tokenise ``events`` with ``spark`` into shards under ``out``."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    cfg, schema, out = config or PrepareConfig(), schema or InputSchema(), Path(out)
    files = input_files(events)
    check_same_columns(files)
    plan = plan_of(files, schema, cfg)
    if begin(out, plan):
        return shards.PreparedShards.open(out)
    raw = _read(spark, files)
    rows_read = raw.count()
    valid = raw.mapInArrow(_validator(schema, cfg.invalid, files), _output_schema(files[0], schema))
    first = F.min(F.struct("__file", "__row")).alias("__first")
    deduped = valid.groupBy(*_KEY).agg(first).cache()
    rows_kept = deduped.count()
    if rows_kept == 0:
        raise InputDataError("no events are left after validation", cli_hint="no events are left after validation")
    ranks = (
        deduped.select("user_id").distinct().withColumn("__rank", F.row_number().over(Window.orderBy("user_id")) - 1)
    )
    order = Window.partitionBy("user_id").orderBy("timestamp", "__first")
    keyed = deduped.join(ranks, "user_id").withColumn("__pos", F.row_number().over(order) - 1)
    stats = keyed.groupBy("item_id").agg(
        F.count("*").alias("n"), F.min(F.col("__rank") * KEY_SHIFT + F.col("__pos")).alias("first")
    )
    actions = [r[0] for r in deduped.select("event_type").distinct().collect()]
    tokenizer = vocabulary(pl.from_arrow(_collect_arrow(stats)), actions, cfg)  # type: ignore[arg-type]
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out / shards.TOKENIZER)
    write_text_atomic(json.dumps(schema.to_dict()), out / shards.SCHEMA)
    n_buckets = max(1, math.ceil(rows_kept / cfg.rows_per_shard))
    bucketed = keyed.repartition(n_buckets, "user_id").sortWithinPartitions("user_id", "timestamp", "__first")
    encoded = bucketed.select(*_KEY, "__rank").mapInArrow(
        _encoder(tokenizer.to_dict(), str(out)), "name string, users long, tokens long"
    )
    shard_list = sorted((r.asDict() for r in encoded.collect()), key=lambda s: s["name"])
    report = {
        "files": [{"file": str(f)} for f in files],
        "rows_read": rows_read,
        "rows_kept": rows_kept,
        "dropped": {"invalid or duplicate": rows_read - rows_kept} if rows_read > rows_kept else {},
        "buckets": n_buckets,
        "engine": "spark",
        "plan": plan,
    }
    deduped.unpersist()
    shards.write_manifest(out, shard_list, report)
    shutil.rmtree(out / STAGING, ignore_errors=True)
    return shards.PreparedShards(out, tokenizer, schema, shard_list, report)


def _read(spark: Any, files: list[Path]) -> Any:
    """Every file as one DataFrame, each row tagged with its file index and its order in the file."""
    from pyspark.sql import functions as F

    index = {f.resolve().as_uri(): i for i, f in enumerate(files)}
    paths = [str(f) for f in files]
    if files[0].suffix == ".parquet":
        df = spark.read.parquet(*paths)
    else:
        df = spark.read.option("header", True).option("sep", "\t" if files[0].suffix == ".tsv" else ",").csv(paths)
    mapping = F.create_map(*[x for uri, i in index.items() for x in (F.lit(uri), F.lit(i))])
    file_index = mapping[F.input_file_name()]
    return df.withColumn("__file", file_index.cast("int")).withColumn("__row", F.monotonically_increasing_id())


def _output_schema(sample: Path, schema: InputSchema) -> Any:
    """The Spark schema of validated rows, learnt by validating the first rows of one file."""
    from pyspark.sql.pandas.types import from_arrow_schema

    head = pl.read_parquet(sample, n_rows=1000) if sample.suffix == ".parquet" else pl.read_csv(sample, n_rows=1000)
    ev = validate_schema(head, schema, invalid="drop", duplicates="keep")
    frame = ev.df.select(_KEY).with_columns(pl.lit(0, pl.Int32).alias("__file"), pl.lit(0, pl.Int64).alias("__row"))
    return from_arrow_schema(frame.to_arrow().schema)


def _validator(schema: InputSchema, invalid: str, files: list[Path]):
    """A ``mapInArrow`` function: each file's rows of a batch through ``validate_schema``.

    Validation keeps the canonical columns, sorted by (user, time) with input order kept for
    ties, so a row's position in the validated part, offset by the part's first row id, orders
    ties exactly as the polars path's (file, row) does.
    """

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            df = pl.from_arrow(batch)
            assert isinstance(df, pl.DataFrame)
            for (f,), part in df.partition_by("__file", as_dict=True, maintain_order=True).items():
                try:
                    ev = validate_schema(part.drop("__file", "__row"), schema, invalid=invalid, duplicates="keep")
                except BehaviorLMError as e:
                    path = files[int(f)]
                    raise type(e)(f"{path}: {e.message}", hint=e.hint, cli_hint=e.cli_hint) from e
                tagged = ev.df.select(_KEY).with_columns(
                    pl.lit(f, pl.Int32).alias("__file"),
                    (pl.int_range(pl.len(), dtype=pl.Int64) + int(part["__row"].min())).alias("__row"),  # type: ignore[arg-type]
                )
                yield from tagged.to_arrow().to_batches()

    return run


def _encoder(tokenizer: dict[str, Any], out: str):
    """A ``mapInArrow`` function: one partition (a user bucket, sorted) -> one shard on disk."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        table = pa.Table.from_batches(list(batches))
        if table.num_rows == 0:
            return
        df = pl.from_arrow(table)
        assert isinstance(df, pl.DataFrame)
        tok = ActionTokenizer.from_dict(tokenizer)
        enc = tok.encode(Events.trusted(df.drop("__rank"), "spark bucket"), truncate=False)
        ranks = df.group_by("user_id", maintain_order=True).agg(pl.col("__rank").first())["__rank"].to_numpy()
        ctx = TaskContext.get()
        assert ctx is not None, "runs inside a Spark task"
        name = shards.shard_name(ctx.partitionId())
        shards.write_shard(Path(out) / name, enc, ranks)
        yield pa.RecordBatch.from_pydict(
            {"name": [name], "users": [len(enc)], "tokens": [int(enc.offsets[-1])]},
            schema=pa.schema([("name", pa.string()), ("users", pa.int64()), ("tokens", pa.int64())]),
        )

    return run


def _collect_arrow(df: Any) -> pa.Table:
    """A (small) Spark DataFrame on the driver as Arrow."""
    if hasattr(df, "toArrow"):
        return df.toArrow()
    return pa.Table.from_pandas(df.toPandas())
