"""Atomic file writes: a reader (or a rerun after a crash) never sees a half-written output."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl

from behaviorlm.errors import ConfigurationError


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


def file_digest(path: str | Path) -> str:
    """sha256 of a file, read in chunks (about 1 s per GB). Folders that hand files to a
    native loader (an ANN graph, an ONNX model) record it, so a damaged or swapped file is
    refused before the loader sees it."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def check_output_dir(path: str | Path, marker: str, what: str, force: bool = False) -> Path:
    """``path`` if a folder of kind ``what`` may be written there, replacing what is there.

    An output never deletes what the project did not write: ``path`` must be absent, an empty
    folder, or a folder holding ``marker`` (the file this kind of folder always has: a model's
    ``estimator.json``, an export's ``export.json``); anything else is refused unless ``force``.
    Never, ``force`` or not: an empty name, ``.``, ``..``, the filesystem root, the current
    folder or one above it, the home folder, or an existing file.
    """
    given = str(path)
    p = Path(path)
    resolved = p.resolve()
    cwd = Path.cwd().resolve()
    if not given.strip() or p.name in ("", ".", "..") or resolved == cwd or resolved in cwd.parents:
        raise ConfigurationError(
            f"{what}: {given!r} names the current folder or one above it; name a new folder for the output",
            cli_hint=f"--out {given!r} names the current folder or one above it; name a new folder",
        )
    if resolved == Path(resolved.anchor) or resolved == Path.home().resolve():
        raise ConfigurationError(
            f"{what}: refusing to replace {resolved}", cli_hint=f"--out {given}: name a new folder"
        )
    if resolved.exists() and not resolved.is_dir():
        raise ConfigurationError(f"{what}: {p} is a file, not a folder", cli_hint=f"--out {p} is a file; name a folder")
    if resolved.is_dir() and not force and not (resolved / marker).is_file() and any(resolved.iterdir()):
        raise ConfigurationError(
            f"{what}: {p} exists and is not one (no {marker}); writing there would delete what it holds",
            hint="choose another folder, or pass force=True to replace it",
            cli_hint="choose another --out, or pass --force to replace it",
        )
    return p


@contextmanager
def atomic_dir(
    path: str | Path, marker: str | None = None, what: str = "output folder", force: bool = False
) -> Iterator[Path]:
    """Yield an empty temporary sibling folder to fill; on success it replaces ``path``.

    An existing ``path`` is first renamed aside and removed only after the new folder is in
    place, so a reader sees the old complete folder or the new one, never a half-written mix;
    on failure the temporary folder is removed and ``path`` is untouched. With ``marker``, the
    folder replaced must be one of its kind (:func:`check_output_dir`).
    """
    if marker is not None:
        check_output_dir(path, marker, what, force)
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
