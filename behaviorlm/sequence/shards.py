"""Prepared shards: the on-disk contract of tokenised sequences that outgrow memory.

A prepared folder (``behaviorlm prepare --out DIR``) holds::

    tokenizer.json            the vocabulary (ActionTokenizer), as in a model directory
    schema.json               the InputSchema the events were read with
    shard-00000/              one shard per user bucket, each memory-mappable:
        offsets.npy               int64 (users + 1,): user u's tokens are [offsets[u], offsets[u+1])
        items.npy actions.npy gaps.npy   int32 / int16 / int16 token ids, BOS-prefixed per user
        users.parquet             user_id in shard order
        ranks.npy                 int64: each user's rank among all users sorted by id (the
                                  in-memory order, so training batches do not depend on sharding)
    manifest.json             written last: format version, shards and their counts, the report

Why ``.npy`` arrays rather than Parquet: training reads random windows of token ids, which a
memory map serves without decoding or copying; the arrays are the same CSR layout as
:class:`~behaviorlm.sequence.tokenizer.EncodedSequences`, so a shard loads as one (``load_shard``)
at the cost of its user table only. **Complete** means ``manifest.json`` exists; a shard folder
is written to a temporary sibling and renamed, so a killed run never leaves a partial shard
that a later step would read.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import polars as pl

from behaviorlm.data.io import atomic_dir, write_text_atomic
from behaviorlm.data.schema import InputSchema
from behaviorlm.errors import ModelFormatError
from behaviorlm.sequence.corpus import Corpus
from behaviorlm.sequence.tokenizer import ActionTokenizer, EncodedSequences

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
SCHEMA = "schema.json"
_DTYPES = {"items": np.int32, "actions": np.int16, "gaps": np.int16}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def write_shard(folder: Path, enc: EncodedSequences, ranks: np.ndarray) -> None:
    """One shard, atomically: the arrays of ``enc``, its users and their global ranks."""
    with atomic_dir(folder) as tmp:
        np.save(tmp / "ranks.npy", np.asarray(ranks, np.int64))
        np.save(tmp / "offsets.npy", enc.offsets.astype(np.int64))
        for name, dtype in _DTYPES.items():
            np.save(tmp / f"{name}.npy", getattr(enc, name).astype(dtype))
        pl.DataFrame({"user_id": enc.user_ids}).write_parquet(tmp / "users.parquet")


def load_shard(folder: Path, mmap: bool = True) -> EncodedSequences:
    """A shard as :class:`EncodedSequences` (arrays memory-mapped unless ``mmap=False``)."""
    mode: Literal["r"] | None = "r" if mmap else None
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode=mode) for name in ("offsets", *_DTYPES)}
    users = pl.read_parquet(folder / "users.parquet")["user_id"].to_list()
    return EncodedSequences(users, arrays["offsets"], arrays["items"], arrays["actions"], arrays["gaps"])


T = TypeVar("T")


def _readable(path: Path, read: Callable[[Path], T]) -> T:
    """``read(path)``, a missing or damaged file named in one line."""
    try:
        return read(path)
    except FileNotFoundError:
        raise ModelFormatError(
            f"{path} is missing; the prepared folder is incomplete: run behaviorlm prepare again"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = " ".join(str(e).split())[:160]
        raise ModelFormatError(f"{path} is damaged ({type(e).__name__}: {why}): run behaviorlm prepare again") from None


def _check_shard(folder: Path, entry: dict[str, Any]) -> None:
    """Every file of a shard present, its arrays as long as the manifest says (headers only)."""
    offsets = _readable(folder / "offsets.npy", lambda p: np.load(p, mmap_mode="r"))
    if len(offsets) != entry["users"] + 1 or int(offsets[-1]) != entry["tokens"]:
        raise ModelFormatError(f"{folder / 'offsets.npy'} does not match the manifest: run behaviorlm prepare again")
    for name in ("ranks", *_DTYPES):
        arr = _readable(folder / f"{name}.npy", lambda p: np.load(p, mmap_mode="r"))
        want = entry["users"] if name == "ranks" else entry["tokens"]
        if len(arr) != want:
            raise ModelFormatError(f"{folder / name}.npy holds {len(arr)} values, the manifest {want}: prepare again")
    _readable(folder / "users.parquet", lambda p: pl.read_parquet_schema(p))


def write_manifest(out: Path, shards: list[dict[str, Any]], report: dict[str, Any]) -> Path:
    body = {"format_version": FORMAT_VERSION, "shards": shards, "report": report}
    return write_text_atomic(json.dumps(body, indent=2, default=str), out / MANIFEST)


@dataclass
class PreparedShards:
    """A complete prepared folder: its tokenizer, schema, shard list and validation report."""

    folder: Path
    tokenizer: ActionTokenizer
    schema: InputSchema
    shards: list[dict[str, Any]]
    report: dict[str, Any]

    @classmethod
    def open(cls, folder: str | Path) -> PreparedShards:
        """A complete prepared folder, checked: every file there and readable, every shard's
        arrays of the length its manifest entry says (read from the array headers, memory-mapped:
        no data is loaded). A missing or damaged file is one :class:`ModelFormatError` naming it."""
        root = Path(folder)
        if not (root / MANIFEST).is_file():
            raise ModelFormatError(f"{root}: not a complete prepared folder (no {MANIFEST}); run behaviorlm prepare")
        manifest = _readable(root / MANIFEST, lambda p: json.loads(p.read_text()))
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ModelFormatError(
                f"{root}: prepared format {manifest.get('format_version')!r}; this behaviorlm reads {FORMAT_VERSION}: "
                "run behaviorlm prepare again"
            )
        tokenizer = _readable(root / TOKENIZER, ActionTokenizer.load)
        schema = _readable(root / SCHEMA, lambda p: InputSchema.from_dict(json.loads(p.read_text())))
        for shard in manifest["shards"]:
            _check_shard(root / shard["name"], shard)
        return cls(root, tokenizer, schema, manifest["shards"], manifest["report"])

    @property
    def n_users(self) -> int:
        return sum(s["users"] for s in self.shards)

    @property
    def n_tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)

    def user_ids(self, shard: dict[str, Any]) -> pl.Series:
        """A shard's user ids, in shard order, in their original type."""
        return pl.read_parquet(self.folder / shard["name"] / "users.parquet")["user_id"]

    def sample(self, n: int, max_len: int, seed: int = 0) -> EncodedSequences:
        """``n`` users of the first shard drawn at random (seeded), their newest ``max_len``
        tokens each: a model's own users for calibrating its retrieval when it was trained from
        this folder and keeps no histories."""
        enc = load_shard(self.folder / self.shards[0]["name"])
        rows = np.sort(np.random.default_rng(seed).permutation(len(enc))[:n])
        return enc.newest(rows, max_len)

    def corpus(self) -> Corpus:
        """Every shard memory-mapped, users in global rank order: what training reads."""
        parts = [load_shard(self.folder / s["name"]) for s in self.shards]
        ranks = [np.load(self.folder / s["name"] / "ranks.npy") for s in self.shards]
        return Corpus.from_parts(parts, ranks)

    def __iter__(self) -> Iterator[EncodedSequences]:
        """Each shard in order, memory-mapped."""
        for shard in self.shards:
            yield load_shard(self.folder / shard["name"])
