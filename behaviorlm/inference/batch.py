"""Batch scoring: top-K for every user in bounded memory, streamed to Parquet.

Memory stays bounded because users are processed in chunks (``chunk_users`` users' events are
encoded at a time) and scored in batches (``batch_size`` x catalog floats at a time); the full
user x item score matrix never exists. Small batches are also faster on CPU, because the
attention working set (batch x heads x L x L) then stays in cache (the batch-size sweep is in
benchmarks/RESULTS.md section 3). Within a chunk, users are sorted by sequence length so a
batch carries little padding. Every top-k goes through the one
:class:`~behaviorlm.inference.engine.InferenceEngine`, so allow-lists, a conditioning next action
and int8 quantisation work here exactly as in ``BehaviorLM.recommend``. Outputs are written to
temporary files renamed into place, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from behaviorlm.data.events import Events, events_digest, require_events
from behaviorlm.data.io import atomic_path, write_text_atomic
from behaviorlm.data.timestamps import UTC
from behaviorlm.errors import ConfigurationError
from behaviorlm.inference.engine import NO_SEEN, InferenceEngine
from behaviorlm.nn.training import peak_rss_mb
from behaviorlm.sequence import shards
from behaviorlm.sequence.shards import PreparedShards
from behaviorlm.sequence.tokenizer import N_SPECIAL, EncodedSequences, concat_ranges, with_request_times


@dataclass
class ScoreSummary:
    out: Path
    n_users: int
    n_rows: int
    seconds: float
    users_per_s: float
    peak_rss_mb: float
    model_version: str
    scored_at: str
    quantize: str | None
    retrieval: str = "exact"  # how the lists were ranked: exact, or the ANN index (and why)

    @classmethod
    def since(cls, t0: float, out: Path, n_users: int, n_rows: int, engine: InferenceEngine, stamp: datetime, quantize):
        """The summary of a run that started at ``perf_counter() == t0`` and just finished."""
        dt = time.perf_counter() - t0
        rate = n_users / max(dt, 1e-9)
        return cls(
            out, n_users, n_rows, dt, rate, peak_rss_mb(), engine.version, stamp.isoformat(), quantize,
            engine.retrieval_for("batch"),
        )  # fmt: skip


def set_threads(n: int | None = None) -> int:
    """Torch's intra-op threads: ``n``, else ``$OMP_NUM_THREADS``, else every core; one inter-op
    thread (2-core boxes thrash otherwise). Returns the number used."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    n = n or (int(env) if env.isdigit() and int(env) > 0 else None) or os.cpu_count() or 1
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass
    return n


@dataclass(frozen=True)
class ScoringOptions:
    """What to rank for every user: the same options ``BehaviorLM.recommend`` takes."""

    k: int = 10
    exclude_seen: bool = True
    action: str | None = None
    allowed_items: tuple | None = None
    batch_size: int = 128

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise ConfigurationError(f"k must be a positive integer, got {self.k!r}", cli_hint="--k must be >= 1")
        if self.batch_size < 1:
            raise ConfigurationError("batch_size must be >= 1", cli_hint="--batch-size must be >= 1")

    def plan(self) -> dict:
        return {
            "k": self.k,
            "exclude_seen": self.exclude_seen,
            "action": self.action,
            "allowed_items": self.allowed_items,
        }


def _user_bounds(df: pl.DataFrame) -> np.ndarray:
    """Row offsets where each user's (contiguous, sorted) events start, plus the end."""
    users = df["user_id"]
    change = (users[1:] != users[:-1]).to_numpy() if len(users) > 1 else np.zeros(0, bool)
    return np.concatenate([[0], np.flatnonzero(change) + 1, [len(users)]]).astype(np.int64)


def score_events(
    engine: InferenceEngine,
    events: Events,
    out: str | Path,
    options: ScoringOptions = ScoringOptions(),
    chunk_users: int = 8192,
    quantize: str | None = None,
    progress: bool = True,
    scored_at: datetime | None = None,
) -> ScoreSummary:
    """Write ``user_id, item_id, score, rank, model_version, scored_at`` for every user to ``out``."""
    if chunk_users < 1:
        raise ConfigurationError("chunk_users must be >= 1")
    engine = engine.quantized(quantize)
    df = require_events(events).df
    n_users = len(_user_bounds(df)) - 1
    stamp = (scored_at or datetime.now(UTC)).replace(microsecond=0)
    t0, n_rows = time.perf_counter(), 0
    bar = tqdm(total=n_users, unit="user", desc="scoring", disable=not progress)
    try:
        with atomic_path(out) as tmp:
            writer: pq.ParquetWriter | None = None
            for _, chunk, users in _user_chunks(df, chunk_users):
                table = _score_chunk(engine, chunk, options, stamp)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
                n_rows += table.num_rows
                bar.update(users)
            if writer is None:  # no users: still write a valid, empty file
                writer = pq.ParquetWriter(tmp, _schema(df["user_id"].dtype, df["item_id"].dtype))
            writer.close()
    finally:
        bar.close()
    return ScoreSummary.since(t0, Path(out), n_users, n_rows, engine, stamp, quantize)


def _user_chunks(df: pl.DataFrame, chunk_users: int) -> Iterator[tuple[int, pl.DataFrame, int]]:
    """(chunk number, its events, its user count) over ``df``'s users (contiguous, sorted) in a
    fixed order, ``chunk_users`` at a time: the one chunking of every event-scoring loop."""
    bounds = _user_bounds(df)
    n_users = len(bounds) - 1
    for i, c in enumerate(range(0, n_users, chunk_users)):
        lo, hi = int(bounds[c]), int(bounds[min(c + chunk_users, n_users)])
        yield i, df.slice(lo, hi - lo), min(chunk_users, n_users - c)


@torch.inference_mode()
def _score_chunk(engine: InferenceEngine, chunk: pl.DataFrame, options: ScoringOptions, stamp: datetime) -> pa.Table:
    enc = engine.encode(Events.trusted(chunk, "scoring chunk"))
    if engine.time_context == "request":  # asked at the scoring time, the rows' scored_at
        enc = with_request_times(enc, stamp)
    enc = enc.subset(np.argsort(enc.lengths(), kind="stable"))  # similar lengths share a batch
    seen = engine.seen_pairs(chunk, enc.user_ids) if options.exclude_seen else NO_SEEN
    allowed = engine.allowed_mask(options.allowed_items)
    new_items = not options.exclude_seen  # a repeat-aware model may return a new item just touched
    val, idx = engine.top_k_all(enc, options.k, seen, allowed, options.action, options.batch_size, new_items)
    frame = engine.frame(enc.user_ids, val, idx, chunk["user_id"].dtype, chunk["item_id"].dtype, enc.new_ids)
    return _stamped(engine, frame, stamp)


def _stamped(engine: InferenceEngine, frame: pl.DataFrame, stamp: datetime) -> pa.Table:
    """A top-k frame as the scores contract's table: model version and time added, sorted."""
    frame = frame.with_columns(
        model_version=pl.lit(engine.version), scored_at=pl.lit(stamp, dtype=pl.Datetime("us", "UTC"))
    )
    return frame.sort("user_id", "rank").to_arrow()


def _resumable_part(part: Path, make: Callable[[], pa.Table]) -> tuple[int, bool]:
    """``part``'s row count, writing it atomically from ``make()`` unless a finished one exists
    (a resumed run); and whether it was written now."""
    if part.exists():
        return pq.ParquetFile(part).metadata.num_rows, False
    table = make()
    with atomic_path(part) as tmp:
        pq.write_table(table, tmp)
    return table.num_rows, True


def _schema(user_dtype: pl.DataType, item_dtype: pl.DataType) -> pa.Schema:
    empty = pl.DataFrame(
        schema={
            "user_id": user_dtype,
            "item_id": item_dtype,
            "score": pl.Float32,
            "rank": pl.Int32,
            "model_version": pl.String,
            "scored_at": pl.Datetime("us", "UTC"),
        }
    )
    return empty.to_arrow().schema


PLAN_FILE, SUCCESS_FILE = "_PLAN.json", "_SUCCESS"


def score_partition(
    engine: InferenceEngine,
    events: Events,
    out_dir: str | Path,
    scored_at: datetime,
    options: ScoringOptions = ScoringOptions(),
    chunk_users: int = 2048,
    quantize: str | None = None,
    pause_s: float = 0.0,
    progress: bool = True,
) -> ScoreSummary:
    """Resumable, idempotent batch scoring into a folder of ``part-NNNNN.parquet`` files.

    Users are chunked in a fixed order; each chunk is written atomically as its own part, so a
    run killed midway leaves only complete parts and the rerun scores just the missing ones.
    ``_PLAN.json`` records what the parts were computed from (model version, events digest,
    options, chunking, ``scored_at``): a rerun with a different plan discards the old parts
    instead of mixing them. ``_SUCCESS`` is written last. Same inputs give byte-identical output,
    since ``scored_at`` is an argument, not the clock. ``pause_s`` sleeps between chunks,
    leaving CPU to other jobs on a shared machine.
    """
    ev = require_events(events)
    engine = engine.quantized(quantize)
    df = ev.df
    out_dir = Path(out_dir)
    stamp = scored_at.astimezone(UTC).replace(microsecond=0)
    plan = {
        "model_version": engine.version,
        "events_digest": events_digest(ev),
        **options.plan(),
        "chunk_users": chunk_users,
        "scored_at": stamp.isoformat(),
    }
    _start_plan(out_dir, plan)
    n_users = len(_user_bounds(df)) - 1
    parts = (
        (f"part-{i:05d}.parquet", users, partial(_score_chunk, engine, chunk, options, stamp))
        for i, chunk, users in _user_chunks(df, chunk_users)
    )
    t0 = time.perf_counter()
    done = _write_parts(out_dir, parts, n_users, progress, pause_s)
    summary = ScoreSummary.since(t0, out_dir, done["n_users"], done["n_rows"], engine, stamp, quantize)
    write_text_atomic(json.dumps(plan | done, indent=2), out_dir / SUCCESS_FILE)
    return summary


def _write_parts(
    out_dir: Path,
    parts: Iterable[tuple[str, int, Callable[[], pa.Table]]],
    total_users: int,
    progress: bool,
    pause_s: float = 0.0,
) -> dict[str, int]:
    """Write each ``(file name, users, make)`` part that is not there yet (atomically, resuming a
    killed run), with one progress bar over users; what was written, for ``_SUCCESS``. The one
    loop of folder scoring, from events or from shards."""
    n_users = n_rows = n_parts = n_new = 0
    with tqdm(total=total_users, unit="user", desc="scoring", disable=not progress) as bar:
        for name, users, make in parts:
            rows, written = _resumable_part(out_dir / name, make)
            n_users, n_rows, n_parts, n_new = n_users + users, n_rows + rows, n_parts + 1, n_new + written
            bar.update(users)
            if written and pause_s:
                time.sleep(pause_s)
    return {"n_users": n_users, "n_rows": n_rows, "parts": n_parts, "parts_written_now": n_new}


def _stamp(out_dir: Path, plan: dict, scored_at: datetime | None) -> datetime:
    """``scored_at`` (to the second, UTC); when not given, the stamp of the plan already in
    ``out_dir`` if everything else in it is ``plan`` (the same job, resumed), else now."""
    if scored_at is not None:
        return scored_at.astimezone(UTC).replace(microsecond=0)
    path = out_dir / PLAN_FILE
    if path.is_file():
        earlier = json.loads(path.read_text())
        if "scored_at" in earlier and {k: v for k, v in earlier.items() if k != "scored_at"} == json.loads(
            json.dumps(plan)
        ):
            return datetime.fromisoformat(earlier["scored_at"])
    return datetime.now(UTC).replace(microsecond=0)


def _start_plan(out_dir: Path, plan: dict) -> None:
    """Keep the parts of an earlier run with the same plan (resume); discard them otherwise."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stray in out_dir.glob(".*.tmp"):  # left by a killed writer
        stray.unlink()
    plan_path = out_dir / PLAN_FILE
    if not plan_path.exists() or json.loads(plan_path.read_text()) != json.loads(json.dumps(plan)):
        for old in [*out_dir.glob("part-*.parquet"), out_dir / SUCCESS_FILE]:
            old.unlink(missing_ok=True)
        write_text_atomic(json.dumps(plan, indent=2), plan_path)


def score_prepared(
    engine: InferenceEngine,
    prepared: PreparedShards,
    out_dir: str | Path,
    scored_at: datetime | None = None,
    options: ScoringOptions = ScoringOptions(),
    chunk_users: int = 8192,
    quantize: str | None = None,
    progress: bool = True,
    max_users: int | None = None,
) -> ScoreSummary:
    """Top-K for every user of a prepared folder, read from its memory-mapped shards.

    No events are parsed or tokenised: each user's newest ``max_len`` tokens are the input and
    every item token of the user's whole sequence is "seen". Parts (one per shard chunk) are
    written atomically under a plan, so a killed run resumes like :func:`score_partition`.
    ``scored_at`` (the time stamped on every row) defaults to the one of an unfinished run of
    the same plan in ``out_dir`` -- so rerunning the same command resumes it --, else now.
    Memory is one chunk's tokens and ``batch_size`` x catalog scores. ``max_users`` stops early
    (throughput benchmarks on a sample).
    """
    _check_vocabulary(engine, prepared)
    engine = engine.quantized(quantize)
    out_dir = Path(out_dir)
    plan = {
        "model_version": engine.version,
        "prepared": str(prepared.folder),
        "prepared_tokens": prepared.n_tokens,
        **options.plan(),
        "chunk_users": chunk_users,
        "max_users": max_users,
    }
    stamp = _stamp(out_dir, plan, scored_at)
    plan["scored_at"] = stamp.isoformat()
    _start_plan(out_dir, plan)
    item_dtype = prepared.tokenizer.item_polars_dtype
    total = min(prepared.n_users, max_users or prepared.n_users)
    parts = (
        (
            f"part-{name}-{rows[0] // chunk_users:05d}.parquet",
            len(rows),
            partial(_score_tokens, engine, enc, rows, user_ids, item_dtype, options, stamp),
        )
        for name, enc, user_ids, rows in _shard_chunks(prepared, chunk_users, total)
    )
    t0 = time.perf_counter()
    done = _write_parts(out_dir, parts, total, progress)
    summary = ScoreSummary.since(t0, out_dir, done["n_users"], done["n_rows"], engine, stamp, quantize)
    write_text_atomic(json.dumps(plan | done, indent=2), out_dir / SUCCESS_FILE)
    return summary


def _shard_chunks(
    prepared: PreparedShards, chunk_users: int, total: int
) -> Iterator[tuple[str, EncodedSequences, pl.Series, np.ndarray]]:
    """(shard name, its memory-mapped tokens, its user ids, rows of one chunk) over the shards
    in order, ``total`` users in all."""
    left = total
    for shard in prepared.shards:
        enc, user_ids = shards.load_shard(prepared.folder / shard["name"]), prepared.user_ids(shard)
        for c in range(0, len(enc), chunk_users):
            if left <= 0:
                return
            rows = np.arange(c, min(c + chunk_users, len(enc), c + left))
            left -= len(rows)
            yield shard["name"], enc, user_ids, rows


def _check_vocabulary(engine: InferenceEngine, prepared: PreparedShards) -> None:
    """The shards' token ids must mean the same items and actions to the model (its vocabulary
    equals the folder's, or extends it, as after ``fit_partial``)."""
    mine, theirs = engine.tokenizer, prepared.tokenizer
    n, m = len(theirs.items_), len(theirs.actions_)
    if mine.items_[:n] != theirs.items_ or mine.actions_[:m] != theirs.actions_:
        raise ConfigurationError(
            f"{prepared.folder} was tokenised with another vocabulary than the model's; "
            "score it with the model it trained, or prepare the events again",
            cli_hint=f"--prepared {prepared.folder} does not match --model's vocabulary",
        )


@torch.inference_mode()
def _score_tokens(
    engine: InferenceEngine,
    enc: EncodedSequences,
    rows: np.ndarray,
    user_ids: pl.Series,
    item_dtype: pl.DataType,
    options: ScoringOptions,
    stamp: datetime,
) -> pa.Table:
    """One chunk of a shard: newest ``max_len`` tokens as input, the whole sequence as seen."""
    lo, hi = enc.offsets[rows].astype(np.int64), enc.offsets[rows + 1].astype(np.int64)
    order = np.argsort(np.minimum(hi - lo, engine.max_len), kind="stable")  # similar lengths share a batch
    lo, hi, rows = lo[order], hi[order], rows[order]
    recent = enc.newest(rows, engine.max_len)  # ids attached to the frame below
    seen = NO_SEEN
    if options.exclude_seen:
        every, every_off = concat_ranges(lo, hi)
        cols = np.asarray(enc.items[every], np.int64)
        row_of = np.repeat(np.arange(len(rows)), np.diff(every_off))
        keep = cols >= N_SPECIAL
        seen = (row_of[keep], cols[keep])
    allowed = engine.allowed_mask(options.allowed_items)
    val, idx = engine.top_k_all(recent, options.k, seen, allowed, options.action, options.batch_size)
    return _stamped(engine, engine.frame(user_ids.gather(rows).to_list(), val, idx, user_ids.dtype, item_dtype), stamp)
