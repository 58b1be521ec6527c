"""Atomic file writes: a reader (or a rerun after a crash) never sees a half-written output."""

from __future__ import annotations

import os
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


def write_parquet_atomic(df: pl.DataFrame, path: str | Path) -> Path:
    return _write(path, df.write_parquet)


def write_text_atomic(text: str, path: str | Path) -> Path:
    return _write(path, lambda p: p.write_text(text))
