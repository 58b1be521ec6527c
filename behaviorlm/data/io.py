"""Atomic file writes: a reader (or a rerun after a crash) never sees a half-written output."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; rename it over ``path`` on success.

    The rename is atomic on one filesystem; on failure the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write(path: str | Path, writer: Callable[[Path], object]) -> Path:
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_parquet_atomic(df: pl.DataFrame, path: str | Path, compression: str = "zstd") -> Path:
    """``compression="lz4"`` for scratch files read back once: faster to write, larger on disk."""
    return _write(path, lambda p: df.write_parquet(p, compression=compression))  # type: ignore[arg-type]


def write_text_atomic(text: str, path: str | Path) -> Path:
    return _write(path, lambda p: p.write_text(text))


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling folder to fill; on success it replaces ``path``.

    An existing ``path`` is first renamed aside and removed only after the new folder is in
    place, so a reader sees the old complete folder or the new one, never a half-written mix;
    on failure the temporary folder is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    old = path.with_name(f".{path.name}.{os.getpid()}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
