"""The model directory: one owner for the on-disk contract of a trained model.

A model directory holds everything needed to score without the training data, and describes
itself::

    estimator.json      manifest: format_version, behaviorlm_version, recipe, params,
                        input_schema (columns, action map, unknown-action policy, time unit),
                        training history, model_version (:func:`model_version`), provenance
    config.json         network shape            weights.pt   state dict (loaded weights_only)
    tokenizer.json      vocabularies             histories.parquet / seen.parquet   known users
    items.parquet       item metadata, when the model was fitted with it
    context.parquet     events remembered after training, not trained on (``BehaviorLM.remember``),
                        when there are any
    adapters/NAME/      low-rank adapters trained on this model (``BehaviorLM.fit_adapter``):
                        adapter.json (name, base_version, rank, alpha, targets, what it was
                        trained on) and adapter.pt (the adapter's tensors only, weights_only)

It is written atomically (a temporary folder renamed into place), so a reader never sees a
half-written model. Older formats are migrated on load -- 1 (behaviorlm 0.1: no format
version, no input schema) and 2 (before the repeat-aware output: its ``config.json`` has no
``copy_head``, which reads as off) --; a newer format is refused with both versions named.
Format 3 (0.7) may hold a copy head (``copy_head`` in the config, its weights and the
validation-fitted ``copy_head.gate_shift`` in the state dict).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import polars as pl
import torch

from behaviorlm import __version__
from behaviorlm.data.io import atomic_dir
from behaviorlm.data.schema import InputSchema
from behaviorlm.errors import ModelFormatError
from behaviorlm.nn.model import BehaviorTransformer
from behaviorlm.sequence.tokenizer import ActionTokenizer

T = TypeVar("T")

FORMAT_VERSION = 3
MANIFEST = "estimator.json"
WEIGHTS = "weights.pt"


@dataclass
class ModelFiles:
    """The parts of a model directory, in memory."""

    network: BehaviorTransformer
    tokenizer: ActionTokenizer
    histories: pl.DataFrame
    seen: pl.DataFrame
    items: pl.DataFrame | None
    manifest: dict[str, Any]
    context: pl.DataFrame | None = None
    adapters: dict[str, Adapter] = field(default_factory=dict)

    @property
    def input_schema(self) -> InputSchema:
        return InputSchema.from_dict(self.manifest["input_schema"])


@dataclass
class Adapter:
    """A low-rank adapter: its tensors and its description (``base_version`` names the weights
    it was trained on; :func:`check_adapter` refuses it on any other)."""

    state: dict[str, torch.Tensor]
    meta: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.meta["name"])


ADAPTERS = "adapters"
ADAPTER_META, ADAPTER_WEIGHTS = "adapter.json", "adapter.pt"
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=-]{0,99}$")


def check_adapter_name(name: str) -> str:
    """Adapter names become folder names: letters, digits and ``_ . = -``, at most 100."""
    if not isinstance(name, str) or not ADAPTER_NAME.match(name):
        raise ModelFormatError(
            f"adapter name {name!r} is not usable: letters, digits and _ . = - only (e.g. 'segment=high')"
        )
    return name


def check_adapter(adapter: Adapter, base_version: str) -> Adapter:
    """``adapter`` if it was trained on the weights ``base_version`` names; else a clear refusal."""
    trained_on = adapter.meta.get("base_version")
    if trained_on != base_version:
        raise ModelFormatError(
            f"adapter {adapter.name!r} was trained on base model {trained_on}, not on this model "
            f"({base_version}): an adapter only works on the weights it was trained with"
        )
    return adapter


def write_adapter(directory: str | Path, adapter: Adapter) -> Path:
    """One adapter folder (atomically): ``adapter.json`` and ``adapter.pt``."""
    path = Path(directory)
    with atomic_dir(path, ADAPTER_META, "adapter folder") as tmp:
        torch.save(adapter.state, tmp / ADAPTER_WEIGHTS)
        (tmp / ADAPTER_META).write_text(json.dumps(adapter.meta, indent=2, default=str))
    return path


def read_adapter(directory: str | Path) -> Adapter:
    d = Path(directory)
    meta = _read(d, ADAPTER_META, lambda: json.loads((d / ADAPTER_META).read_text()))
    state = _read(d, ADAPTER_WEIGHTS, lambda: torch.load(d / ADAPTER_WEIGHTS, weights_only=True, map_location="cpu"))
    return Adapter(state, meta)


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file() and (Path(path) / WEIGHTS).is_file()


def write_model_dir(directory: str | Path, files: ModelFiles, force: bool = False) -> dict[str, Any]:
    """Write ``files`` to ``directory`` atomically; returns the manifest as written. An existing
    ``directory`` is replaced only if it is a model folder (or empty), unless ``force``."""
    with atomic_dir(directory, MANIFEST, "model folder", force) as tmp:
        files.network.save(tmp)
        files.tokenizer.save(tmp / "tokenizer.json")
        files.histories.write_parquet(tmp / "histories.parquet")
        files.seen.write_parquet(tmp / "seen.parquet")
        if files.items is not None:
            files.items.write_parquet(tmp / "items.parquet")
        if files.context is not None and files.context.height:
            files.context.write_parquet(tmp / "context.parquet")
        for name, adapter in files.adapters.items():
            write_adapter(tmp / ADAPTERS / check_adapter_name(name), adapter)
        manifest = {
            **files.manifest,
            "format_version": FORMAT_VERSION,
            "behaviorlm_version": __version__,
            "model_version": model_version(files.network),
            "version_of": "tensors",  # what model_version digests (0.7 and older: the weights file)
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest, migrated to the current format; refuses what this version cannot read."""
    d = Path(directory)
    if not is_model_dir(d):
        raise ModelFormatError(f"{d} is not a behaviorlm model directory (no {MANIFEST} and {WEIGHTS})")
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        raise ModelFormatError(f"{d / MANIFEST} is not valid JSON ({e}); the directory is damaged") from None
    version = manifest.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        writer = manifest.get("behaviorlm_version", "a newer behaviorlm")
        raise ModelFormatError(
            f"{d} has model format version {version!r} (written by behaviorlm {writer}); this behaviorlm "
            f"{__version__} reads format versions 1 to {FORMAT_VERSION}: upgrade behaviorlm to load it"
        )
    return _migrate(manifest, version)


def _migrate(manifest: dict[str, Any], version: int) -> dict[str, Any]:
    """Bring an older manifest up to :data:`FORMAT_VERSION`, one version step at a time."""
    if version == 1:  # behaviorlm 0.1 trained on canonical columns and had no schema record
        manifest = {**manifest, "input_schema": InputSchema().to_dict(), "recipe": None, "format_version": 2}
        version = 2
    if version == 2:  # no copy head: the network config's default (copy_head=False) reads it as is
        manifest = {**manifest, "format_version": 3}
    return manifest


def read_model_dir(directory: str | Path) -> ModelFiles:
    """The parts of a model directory, checked: every file readable (a missing or damaged one is
    a :class:`ModelFormatError` naming it), vocabulary and weights of the same shape, and the
    weights the ones the manifest's version names (a ``weights.pt`` copied from another model is
    refused, instead of scoring under this model's name)."""
    d = Path(directory)
    manifest = read_manifest(d)
    network = _read(d, WEIGHTS, lambda: BehaviorTransformer.load(d))
    tokenizer = _read(d, "tokenizer.json", lambda: ActionTokenizer.load(d / "tokenizer.json"))
    _check_weights(d, manifest, network, tokenizer)
    has_items, has_context = (d / "items.parquet").exists(), (d / "context.parquet").exists()
    return ModelFiles(
        network=network,
        tokenizer=tokenizer,
        histories=_read(d, "histories.parquet", lambda: pl.read_parquet(d / "histories.parquet")),
        seen=_read(d, "seen.parquet", lambda: pl.read_parquet(d / "seen.parquet")),
        items=_read(d, "items.parquet", lambda: pl.read_parquet(d / "items.parquet")) if has_items else None,
        manifest=manifest,
        context=_read(d, "context.parquet", lambda: pl.read_parquet(d / "context.parquet")) if has_context else None,
        adapters={p.name: read_adapter(p) for p in sorted((d / ADAPTERS).glob("*")) if (p / ADAPTER_META).is_file()},
    )


def _read(d: Path, name: str, read: Callable[[], T]) -> T:
    """``read()``, with a missing or unreadable file of the folder named in one line (never the
    reader's own advice: torch's suggests unpickling, which a damaged folder must not get)."""
    try:
        return read()
    except FileNotFoundError as e:
        missing = Path(e.filename).name if e.filename else name
        raise ModelFormatError(f"{d}: {missing} is missing; the model folder is incomplete") from None
    except Exception as e:  # noqa: BLE001 - any reader's failure on a damaged file is the same message
        raise ModelFormatError(
            f"{d}: {name} is damaged and cannot be read ({type(e).__name__}); save or copy the model again"
        ) from None


def _check_weights(d: Path, manifest: dict[str, Any], network: BehaviorTransformer, tok: ActionTokenizer) -> None:
    cfg = network.config
    if (tok.n_items, tok.n_actions) != (cfg.n_items, cfg.n_actions):
        raise ModelFormatError(
            f"{d}: tokenizer.json has {tok.n_items:,} items and {tok.n_actions} actions but the weights "
            f"{cfg.n_items:,} and {cfg.n_actions}: the files come from different models"
        )
    recorded = manifest.get("model_version")
    if recorded is None:
        return
    found = model_version(network)
    if manifest.get("version_of") != "tensors" and found != recorded:
        # no record of what was digested: 0.7 and older digested the weights file, and folders
        # written while 0.8 was made digested the tensors without saying so; either names these weights
        found = _file_digest(d / WEIGHTS)
    if found != recorded:
        raise ModelFormatError(
            f"{d}: {WEIGHTS} is not the model this folder describes (weights digest {found}, "
            f"estimator.json names {recorded}); copy the whole model folder, not its weights alone"
        )


def _file_digest(path: Path) -> str:
    """The version a model saved before 0.8 recorded: a digest of its weights file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def model_version(network: torch.nn.Module) -> str:
    """The model version: a short digest of the weights' names, types, shapes and values.

    The one definition, used by ``fit`` (before any save) and by :func:`write_model_dir`, so
    that scores, segments and ``parent_version`` written before a save name the version the
    saved model carries. It digests tensors, not the weights file, whose bytes could change
    with the serialiser while the weights do not."""
    h = hashlib.sha256()
    for name, t in network.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]
