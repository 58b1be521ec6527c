"""Streaming preparation: many event files -> vocabulary + per-user token shards, in bounded memory.

The in-memory path (``validate_events`` then ``ActionTokenizer.fit/encode``) holds every event
at once; this one never holds more than one input file or one user bucket:

1. **validate** each input file on its own (the same ``validate_schema`` as everywhere, so a bad
   row is reported with its file and row) and split its rows into ``B`` user buckets by a
   fixed hash of ``user_id``, staged as Parquet parts (lz4: scratch, read back once);
2. **sort** each bucket by (user, time, file, row) — the order the in-memory path gives the
   concatenated files — drop exact duplicates (within and across files), count each item and its first
   appearance as (global user rank, position in the user's sequence);
3. build the **vocabulary** from those counts, in exactly the order ``ActionTokenizer.fit``
   would choose (first appearance in the sorted log);
4. **encode** each bucket into one shard (:mod:`behaviorlm.sequence.shards`).

Every stage writes atomically and skips work whose output already exists, so a killed run
restarted with the same arguments produces identical shards. ``manifest.json`` comes last.

What "the same arguments" means is recorded: the **plan** (each input's resolved path, size and
mtime, the schema and the settings) is written beside the staged work and into the manifest.
Staged work or a finished folder under another plan is never reused in part -- it is removed
(only the files this module writes) and the run starts over; the same plan over a finished
folder returns it as it is.
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from behaviorlm.data.events import Events, table_format, validate_schema
from behaviorlm.data.io import write_parquet_atomic, write_text_atomic
from behaviorlm.data.schema import InputSchema
from behaviorlm.errors import BehaviorLMError, ConfigurationError, InputDataError
from behaviorlm.sequence import shards
from behaviorlm.sequence.tokenizer import ActionTokenizer

log = logging.getLogger("behaviorlm.prepare")
STAGING = "_staging"
KEY_SHIFT = 2**31  # first-appearance key: user rank * 2^31 + position in the user's sequence
_HASH_SEED = 17  # fixed: the same user lands in the same bucket on every run


@dataclass
class PrepareConfig:
    """How to cut the work: rows per bucket bound the memory; tokenizer settings as in a recipe."""

    rows_per_shard: int = 2_000_000
    max_len: int = 200
    min_item_count: int = 1
    n_time_buckets: int = 24
    invalid: str = "raise"
    workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))  # processes over files/buckets


def input_files(spec: str | Path | list[str | Path]) -> list[Path]:
    """A file, a folder or a glob, sorted. In a folder every entry is read (a table file:
    ``.parquet``, ``.csv[.gz]``, ``.tsv[.gz]``, ``.txt``, any letter case) or skipped with the
    reason logged (a subfolder, a hidden file, another extension); an empty file is an error."""
    if isinstance(spec, list):
        files = [Path(p) for p in spec]
    else:
        path = Path(spec)
        if path.is_dir():
            files = []
            for p in sorted(path.iterdir()):
                why = _not_read(p)
                if why:
                    log.warning("prepare: skipping %s (%s)", p, why)
                else:
                    files.append(p)
        elif any(ch in str(spec) for ch in "*?["):
            files = sorted(Path(p) for p in glob.glob(str(spec)))
        else:
            files = [path] if path.exists() else []
    if not files:
        raise InputDataError(f"--events {spec}: no event files found (a file, a folder of them, or a glob)")
    for f in files:
        if f.is_file() and f.stat().st_size == 0:
            raise InputDataError(f"--events: {f} is empty (0 bytes)")
    return files


def _not_read(path: Path) -> str | None:
    """Why a folder entry is not read as events (None: it is)."""
    if path.name.startswith("."):
        return "hidden"
    if path.is_dir():
        return "a folder"
    if table_format(path) is None:
        return "not .parquet, .csv[.gz], .tsv[.gz] or .txt"
    return None


def check_same_columns(files: list[Path]) -> None:
    """Shards whose columns disagree are named together, before any work."""
    first = _columns(files[0])
    for f in files[1:]:
        cols = _columns(f)
        if set(cols) != set(first):
            raise InputDataError(
                f"{f}: columns {sorted(cols)} differ from {files[0]}'s {sorted(first)}",
                cli_hint=f"every --events file needs the same columns; {f.name} and {files[0].name} differ",
            )


def _columns(path: Path) -> list[str]:
    fmt = table_format(path)
    if fmt == "parquet":
        return list(pl.read_parquet_schema(path))
    return pl.read_csv(path, n_rows=0, separator="\t" if fmt == "tsv" else ",").columns


def _count_rows(path: Path) -> int:
    fmt = table_format(path)
    if fmt == "parquet":
        return int(pl.scan_parquet(path).select(pl.len()).collect().item())
    scan = pl.scan_csv(path, separator="\t" if fmt == "tsv" else ",", infer_schema=False)
    return int(scan.select(pl.len()).collect().item())


def _bucket_of(users: pl.Series, n_buckets: int) -> pl.Series:
    return (users.cast(pl.String).hash(_HASH_SEED) % n_buckets).alias("__bucket")


def _stage_file(index: int, path: Path, schema: InputSchema, cfg: PrepareConfig, n_buckets: int, stage: Path) -> dict:
    """Validate one file and write its rows into the user buckets (skipped when already staged)."""
    done = stage / f"file-{index:05d}.json"
    if done.exists():
        return json.loads(done.read_text())
    try:
        # duplicates are dropped per bucket, across files at once (the in-memory rule: first kept)
        ev = validate_schema(path, schema, invalid=cfg.invalid, duplicates="keep")
    except BehaviorLMError as e:
        raise type(e)(f"{path}: {e.message}", hint=e.hint, cli_hint=e.cli_hint) from e
    df = ev.df.with_columns(
        pl.lit(index, pl.Int32).alias("__file"), pl.int_range(pl.len(), dtype=pl.Int64).alias("__row")
    )
    df = df.with_columns(_bucket_of(df["user_id"], n_buckets))
    for (b,), part in df.partition_by("__bucket", as_dict=True).items():
        part_path = stage / f"bucket-{b:05d}" / f"part-{index:05d}.parquet"
        write_parquet_atomic(part.drop("__bucket"), part_path, compression="lz4")
    info = {
        "file": str(path),
        "rows_read": ev.report.n_input_rows,
        "rows_kept": ev.df.height,
        "dropped": ev.report.dropped,
        "user_dtype": str(ev.df["user_id"].dtype),
        "item_dtype": str(ev.df["item_id"].dtype),
        "actions": ev.actions,
    }
    write_text_atomic(json.dumps(info), done)
    return info


def _sorted_bucket(stage: Path, b: int) -> tuple[pl.DataFrame, int]:
    """A bucket in the in-memory path's order, exact cross-file duplicates dropped (first kept)."""
    parts = sorted((stage / f"bucket-{b:05d}").glob("part-*.parquet"))
    if not parts:
        return pl.DataFrame(), 0
    df = pl.concat([pl.read_parquet(p) for p in parts], how="vertical_relaxed")
    df = df.sort(["user_id", "timestamp", "__file", "__row"], maintain_order=True)
    dup = df.select(pl.struct("user_id", "item_id", "event_type", "timestamp").is_first_distinct()).to_series()
    return df.filter(dup), int((~dup).sum())


def _item_stats(df: pl.DataFrame, rank: pl.DataFrame) -> pl.DataFrame:
    """Per item: count and the first-appearance key (global user rank, position in the user)."""
    keyed = df.join(rank, on="user_id", how="left", maintain_order="left").with_columns(
        (pl.col("__rank") * KEY_SHIFT + pl.int_range(pl.len()).over("user_id")).alias("__key")
    )
    return keyed.group_by("item_id").agg(pl.len().alias("n"), pl.col("__key").min().alias("first"))


def prepare(
    events: str | Path | list[str | Path],
    out: str | Path,
    schema: InputSchema | None = None,
    config: PrepareConfig | None = None,
) -> shards.PreparedShards:
    """Validate and tokenise ``events`` (files, a folder or a glob) into shards under ``out``."""
    cfg, schema = config or PrepareConfig(), schema or InputSchema()
    if cfg.rows_per_shard < 1:
        raise ConfigurationError("rows_per_shard must be >= 1", cli_hint="--rows-per-shard must be >= 1")
    out = Path(out)
    files = input_files(events)
    check_same_columns(files)
    stage = out / STAGING
    plan = plan_of(files, schema, cfg)
    if begin(out, plan):
        return shards.PreparedShards.open(out)
    total = sum(_count_rows(f) for f in files)
    n_buckets = max(1, math.ceil(total / cfg.rows_per_shard))
    log.info("prepare: %d file(s), %d rows, %d bucket(s)", len(files), total, n_buckets)
    infos = _map(_stage_file, [(i, f, schema, cfg, n_buckets, stage) for i, f in enumerate(files)], cfg.workers)
    _check_same_dtypes(infos)
    write_parquet_atomic(_user_ranks(stage, n_buckets), stage / "ranks.parquet")
    counted = _map(_count_bucket, [(stage, b) for b in range(n_buckets)], cfg.workers)
    stats, duplicates = _merge_stats(counted)
    tokenizer = vocabulary(stats, {a for info in infos for a in info["actions"]}, cfg)
    tokenizer.save(out / shards.TOKENIZER)
    write_text_atomic(json.dumps(schema.to_dict()), out / shards.SCHEMA)
    buckets = [b for b in range(n_buckets) if (stage / f"bucket-{b:05d}" / "sorted.parquet").exists()]
    jobs = [(stage, b, out / shards.TOKENIZER, out / shards.shard_name(i)) for i, b in enumerate(buckets)]
    shard_list = _map(_encode_bucket, jobs, cfg.workers)
    report = {
        "files": infos,
        "rows_read": sum(i["rows_read"] for i in infos),
        "rows_kept": sum(i["rows_kept"] for i in infos) - duplicates,
        "dropped": _merge_drops(infos, duplicates),
        "buckets": n_buckets,
        "plan": plan,
    }
    shards.write_manifest(out, shard_list, report)
    shutil.rmtree(stage, ignore_errors=True)
    return shards.PreparedShards(out, tokenizer, schema, shard_list, report)


def plan_of(files: list[Path], schema: InputSchema, cfg: PrepareConfig) -> dict[str, Any]:
    """What the output is a function of: every input's identity (resolved path, size, mtime --
    a file rewritten in place changes them) and every setting but the worker count."""
    inputs = []
    for f in files:
        st = f.stat()
        inputs.append({"path": str(f.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    settings = {
        k: getattr(cfg, k) for k in ("rows_per_shard", "max_len", "min_item_count", "n_time_buckets", "invalid")
    }
    return {"inputs": inputs, "schema": schema.to_dict(), "settings": settings}


def begin(out: Path, plan: dict[str, Any]) -> bool:
    """True when ``out`` is already the finished result of ``plan``; otherwise clear whatever
    another plan left there (finished or staged) and record this plan for a resumed run."""
    manifest, stage = out / shards.MANIFEST, out / STAGING
    if out.exists() and any(out.iterdir()) and not (manifest.is_file() or stage.is_dir()):
        raise ConfigurationError(
            f"{out} exists and is not a prepared folder (no {shards.MANIFEST}); prepare will not write into it",
            cli_hint=f"--out {out} exists and is not a prepared folder; choose another --out",
        )
    if manifest.is_file():
        if json.loads(manifest.read_text()).get("report", {}).get("plan") == plan:
            log.info("prepare: %s already holds these inputs prepared with these settings; reused", out)
            return True
        log.warning("prepare: %s was prepared from other inputs or settings; rebuilding it", out)
        _clear(out)
    elif (stage / "plan.json").is_file() and json.loads((stage / "plan.json").read_text()) == plan:
        log.info("prepare: resuming the unfinished run in %s", out)
        return False
    elif stage.exists():
        log.warning("prepare: the unfinished run in %s had other inputs or settings; starting over", out)
        _clear(out)
    write_text_atomic(json.dumps(plan), stage / "plan.json")
    return False


def _clear(out: Path) -> None:
    """Remove what prepare writes under ``out`` -- the manifest first, so a run killed while
    clearing leaves an incomplete folder rather than a complete-looking mix -- and nothing else."""
    (out / shards.MANIFEST).unlink(missing_ok=True)
    for name in (shards.TOKENIZER, shards.SCHEMA):
        (out / name).unlink(missing_ok=True)
    for folder in [*out.glob("shard-[0-9]*"), out / STAGING]:
        if folder.is_dir():
            shutil.rmtree(folder)


def _map(fn: Callable[..., Any], jobs: Iterable[tuple], workers: int) -> list[Any]:
    """``fn(*job)`` for every job, in order; over ``workers`` fresh processes when more than one.

    Processes are spawned (forking a process whose polars thread pool is running can hang), and
    each gets an equal share of the cores for polars, so the workers do not oversubscribe them.
    """
    jobs = list(jobs)
    if workers <= 1 or len(jobs) <= 1:
        return [fn(*job) for job in jobs]
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    previous = os.environ.get("POLARS_MAX_THREADS")
    os.environ["POLARS_MAX_THREADS"] = threads  # read by polars when a spawned worker imports it
    try:
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(fn, *job) for job in jobs]
            return [f.result() for f in futures]
    finally:
        if previous is None:
            os.environ.pop("POLARS_MAX_THREADS", None)
        else:
            os.environ["POLARS_MAX_THREADS"] = previous


def _check_same_dtypes(infos: list[dict]) -> None:
    for key in ("user_dtype", "item_dtype"):
        kinds = {i[key] for i in infos}
        if len(kinds) > 1:
            a, b = infos[0], next(i for i in infos if i[key] != infos[0][key])
            raise InputDataError(f"{b['file']}: {key.split('_')[0]} ids are {b[key]} but {a[key]} in {a['file']}")


def _user_ranks(stage: Path, n_buckets: int) -> pl.DataFrame:
    """Every user's rank in sorted order: the in-memory log is sorted by user first."""
    users = [
        pl.scan_parquet(folder / "part-*.parquet").select("user_id").unique().collect()
        for folder in (stage / f"bucket-{b:05d}" for b in range(n_buckets))
        if any(folder.glob("part-*.parquet"))
    ]
    all_users = pl.concat(users).unique().sort("user_id")
    return all_users.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("__rank"))


def _count_bucket(stage: Path, b: int) -> tuple[Path | None, int]:
    """Sort one bucket (kept as ``sorted.parquet``) and write its item statistics; skipped if done."""
    folder = stage / f"bucket-{b:05d}"
    done = folder / "stats.parquet"
    if not done.exists():
        df, dups = _sorted_bucket(stage, b)
        if not df.height:
            return None, 0
        write_parquet_atomic(df.drop("__file", "__row"), folder / "sorted.parquet", compression="lz4")
        write_parquet_atomic(
            _item_stats(df, _ranks(stage, (stage / "ranks.parquet").stat().st_mtime_ns)).with_columns(
                pl.lit(dups).alias("__dups")
            ),
            done,
        )
    return done, int(pl.read_parquet(done, columns=["__dups"])["__dups"][0])


@functools.lru_cache(maxsize=1)
def _ranks(stage: Path, stamp: int) -> pl.DataFrame:
    """The user ranks, read once per worker process (``stamp``: the file's mtime, so a new run reloads)."""
    return pl.read_parquet(stage / "ranks.parquet")


def _merge_stats(counted: list[tuple[Path | None, int]]) -> tuple[pl.DataFrame, int]:
    parts = [pl.read_parquet(path).drop("__dups") for path, _ in counted if path is not None]
    if not parts:
        raise InputDataError("no events are left after validation", cli_hint="no events are left after validation")
    merged = pl.concat(parts).group_by("item_id").agg(pl.col("n").sum(), pl.col("first").min())
    return merged, sum(d for _, d in counted)


def vocabulary(stats: pl.DataFrame, actions: Iterable[str], cfg: PrepareConfig) -> ActionTokenizer:
    """The tokenizer from per-item counts and first-appearance keys (``item_id, n, first``), in
    the order ``ActionTokenizer.fit`` gives: shared by the polars and the Spark preparation."""
    kept = stats.filter(pl.col("n") >= cfg.min_item_count).sort("first")
    item_dtype = "int" if kept["item_id"].dtype.is_integer() else "str"
    return ActionTokenizer.from_vocabulary(
        kept["item_id"].to_list(),
        kept["n"].to_list(),
        list(actions),
        item_dtype,
        cfg.max_len,
        cfg.min_item_count,
        cfg.n_time_buckets,
    )


def _encode_bucket(stage: Path, b: int, tokenizer_path: Path, folder: Path) -> dict[str, Any]:
    """Encode one sorted bucket into its shard (skipped when the shard exists); its counts."""
    if not (folder / "offsets.npy").exists():
        df = pl.read_parquet(stage / f"bucket-{b:05d}" / "sorted.parquet")
        enc = _tokenizer(tokenizer_path, tokenizer_path.stat().st_mtime_ns).encode(
            Events.trusted(df, f"prepared bucket {b}"), truncate=False
        )
        rank = _ranks(stage, (stage / "ranks.parquet").stat().st_mtime_ns)
        users = pl.DataFrame({"user_id": enc.user_ids}, schema={"user_id": df["user_id"].dtype})
        ranks = users.join(rank, on="user_id", how="left", maintain_order="left")["__rank"].to_numpy()
        shards.write_shard(folder, enc, ranks)
    offsets = np.load(folder / "offsets.npy", mmap_mode="r")  # from disk, also for a resumed shard
    return {"name": folder.name, "users": len(offsets) - 1, "tokens": int(offsets[-1])}


@functools.lru_cache(maxsize=1)
def _tokenizer(path: Path, stamp: int) -> ActionTokenizer:
    """The vocabulary, loaded once per worker process (``stamp``: the file's mtime)."""
    return ActionTokenizer.load(path)


def _merge_drops(infos: list[dict], duplicates: int) -> dict[str, int]:
    dropped: dict[str, int] = {}
    for info in infos:
        for reason, n in info["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + n
    if duplicates:
        dropped["exact duplicate"] = dropped.get("exact duplicate", 0) + duplicates
    return dropped
