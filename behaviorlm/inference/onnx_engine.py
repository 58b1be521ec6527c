"""ONNX export of the scoring graph, and an inference engine that runs it on onnxruntime.

The exported graph is what scoring needs from the transformer: token ids, time-gap ids and
each row's last position in; the hidden state at that position and the next-action
log-probabilities out (``BehaviorTransformer.forward(last=...)`` and the action head). The
item head stays outside the graph on purpose: it is one inner product with the tied item
embeddings, shared with the exact and the ANN path (:mod:`behaviorlm.inference.retrieval`),
so a million-item catalog never becomes a million-column graph output.

:class:`OnnxEngine` is an :class:`~behaviorlm.inference.engine.InferenceEngine` whose
``heads_from_tensors`` runs onnxruntime, so every consumer -- batch scoring, the service,
evaluation -- can run on it (``--engine onnx`` / ``onnx-int8``). ``int8`` is onnxruntime's
dynamic quantisation of the graph's MatMul weights (per-channel int8, activations quantised
on the fly); the figures against torch are in benchmarks/RESULTS.md section 17.

On disk (this module owns the layout)::

    DIR/heads.onnx          fp32 graph            DIR/heads.int8.onnx   its int8 twin (optional)
    DIR/export.json         model_version, shapes, opset, behaviorlm and onnx versions

A model directory keeps its own export in ``onnx/`` (made on first use); an export whose
``model_version`` differs from the model's is refused and made again, never run.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from behaviorlm import __version__
from behaviorlm.data.io import atomic_dir, file_digest
from behaviorlm.errors import ConfigurationError, ModelFormatError
from behaviorlm.extras import missing_extra
from behaviorlm.inference.engine import InferenceEngine
from behaviorlm.sequence.tokenizer import N_SPECIAL

log = logging.getLogger(__name__)

ENGINES = ("torch", "onnx", "onnx-int8")
INPUTS = ("items", "actions", "gaps", "last")
OUTPUTS = ("hidden", "action_logp")
FOLDER = "onnx"
OPSET = 18


class _HeadsGraph(torch.nn.Module):
    """The part of the network that scoring runs per batch, as one traceable module."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, items, actions, gaps, last):  # noqa: ANN001 - traced
        h = self.network(items, actions, gaps, last=last)
        a = self.network.action_logits(h)
        a = torch.cat([torch.full_like(a[:, :N_SPECIAL], float("-inf")), a[:, N_SPECIAL:]], 1)
        return h, torch.log_softmax(a, -1)


def export_onnx(engine: InferenceEngine, out_dir: str | Path, quantize: str | None = None, force: bool = False) -> Path:
    """Write ``heads.onnx`` (and ``heads.int8.onnx`` with ``quantize='int8'``) and ``export.json``
    to ``out_dir`` atomically; the graph keeps batch size and sequence length dynamic. An
    existing ``out_dir`` is replaced only if it is an export (or empty), unless ``force``."""
    onnx, ort = _require()
    if quantize not in (None, "none", "int8"):
        raise ConfigurationError(f"quantize must be 'int8' or None, got {quantize!r}", cli_hint="use --quantize int8")
    net = engine.on("cpu").network  # exported from the CPU: the graph is the same on any device
    if net.config.time_context != "history":
        raise ConfigurationError(
            "ONNX export covers history-only models; this one reads the request time (time_context="
            f"{net.config.time_context!r}): serve it with the torch engine"
        )
    example = tuple(torch.ones(3, 5, dtype=torch.long) for _ in range(3)) + (torch.tensor([4, 2, 0]),)
    batch = torch.export.Dim("batch")
    length = torch.export.Dim("length", min=1, max=net.config.max_len)
    shapes = ({0: batch, 1: length},) * 3 + ({0: batch},)
    with atomic_dir(out_dir, "export.json", "ONNX export", force) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter
        torch.onnx.export(
            _HeadsGraph(net).eval(),
            example,
            str(tmp / "heads.onnx"),
            dynamo=True,
            input_names=list(INPUTS),
            output_names=list(OUTPUTS),
            dynamic_shapes=shapes,
            opset_version=OPSET,
            verbose=False,
        )
        if quantize == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(
                tmp / "heads.onnx",
                tmp / "heads.int8.onnx",
                weight_type=QuantType.QInt8,
                per_channel=True,
                reduce_range=True,  # 7-bit weights: AVX2 (no VNNI) int8 dot products would saturate
                op_types_to_quantize=["MatMul", "Gemm"],  # embeddings (Gather) stay fp32: ids must not blur
            )
        meta = {
            "model_version": engine.version,
            "n_items": engine.n_items,
            "n_actions": engine.tokenizer.n_actions,
            "max_len": engine.max_len,
            "dim": engine.dim,
            "inputs": list(INPUTS),
            "outputs": list(OUTPUTS),
            "opset": OPSET,
            "int8": quantize == "int8",
            "behaviorlm_version": __version__,
            "onnx_version": onnx.__version__,
            "onnxruntime_version": ort.__version__,
            # checked before onnxruntime parses them: a damaged graph is re-exported, not a traceback
            "files": {p.name: file_digest(p) for p in sorted(tmp.iterdir())},
        }
        (tmp / "export.json").write_text(json.dumps(meta, indent=2))
    return Path(out_dir)


def _require() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise missing_extra("onnx", "ONNX export and the onnxruntime engine", exc) from exc
    return onnx, onnxruntime


class OnnxEngine(InferenceEngine):
    """An inference engine whose transformer pass runs on onnxruntime (fp32 or int8)."""

    def __init__(self, base: InferenceEngine, graph: Path | None, label: str, session: Any = None):
        """``base`` on the graph at ``graph`` -- or on an already open ``session`` of it."""
        super().__init__(base.network, base.tokenizer, base.version, base.index)
        self.session = session if session is not None else _session(graph, base.device)
        self.label = label

    def retrieval_for(self, path: str) -> str:
        return f"{super().retrieval_for(path)} ({self.label})"

    def with_index(self, index: Any) -> InferenceEngine:
        """The same session (no second session, no re-export) over another index."""
        return OnnxEngine(super().with_index(index), None, self.label, self.session)

    def quantized(self, mode: str | None) -> InferenceEngine:
        """Itself: onnxruntime has its own int8 graph (``onnx-int8``); torch's dynamic
        quantisation would silently put the transformer back on torch, so it is refused."""
        if mode in (None, "none"):
            return self
        raise ConfigurationError(
            f"quantize={mode!r} is torch's dynamic quantisation; this engine runs on onnxruntime ({self.label}): "
            "use the onnx-int8 engine instead",
            cli_hint="--quantize is torch's int8; with onnxruntime use --engine onnx-int8",
        )

    def heads_from_tensors(
        self,
        items: torch.Tensor,
        actions: torch.Tensor,
        gaps: torch.Tensor,
        last: torch.Tensor,
        request: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        feeds = {name: t.numpy() for name, t in zip(INPUTS, (items, actions, gaps, last), strict=True)}
        h, a_logp = self.session.run(list(OUTPUTS), feeds)
        return torch.from_numpy(h), torch.from_numpy(a_logp)


def _session(graph: Path | None, device: torch.device | None = None) -> Any:
    if graph is None:
        raise ValueError("OnnxEngine needs a graph file or an open session")
    _, ort = _require()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()  # the same thread budget as torch
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(graph), opts, providers=execution_providers(device, ort.get_available_providers()))


def execution_providers(device: torch.device | None, installed: list[str]) -> list[str]:
    """onnxruntime's providers for an engine on ``device``: CUDA's first (its GPU) when the engine
    runs on a GPU and onnxruntime-gpu is installed, the CPU's always (the fallback for any node)."""
    if device is not None and device.type == "cuda" and "CUDAExecutionProvider" in installed:
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]  # type: ignore[list-item]
    return ["CPUExecutionProvider"]


def open_export(folder: str | Path, engine: InferenceEngine) -> dict[str, Any]:
    """``export.json`` of ``folder`` if it was exported from ``engine``'s weights, else
    :class:`ModelFormatError` naming both versions."""
    path = Path(folder) / "export.json"
    if not path.is_file():
        raise ModelFormatError(f"{folder}: no ONNX export (export.json missing)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{path} is damaged ({type(e).__name__})") from None
    if meta.get("model_version") != engine.version or meta.get("n_items") != engine.n_items:
        raise ModelFormatError(
            f"{folder}: the ONNX export is of model {meta.get('model_version')} ({meta.get('n_items')} items), "
            f"not of this model {engine.version} ({engine.n_items} items)"
        )
    if not isinstance(meta.get("files"), dict):
        raise ModelFormatError(f"{folder}: the ONNX export records no file digests (written before 0.9)")
    for name, digest in meta["files"].items():
        graph = Path(folder) / name
        if not graph.is_file() or file_digest(graph) != digest:
            raise ModelFormatError(f"{folder}: {name} is missing or not the file that was exported")
    return meta


def onnx_engine(engine: InferenceEngine, kind: str, model_dir: str | Path | None = None) -> InferenceEngine:
    """``engine`` running on ``kind`` (torch | onnx | onnx-int8). The export kept in the model
    directory is reused when it matches, else made there (or in memory's stead, a temporary
    folder, when the directory is read-only)."""
    if kind not in ENGINES:
        raise ConfigurationError(
            f"engine must be one of {list(ENGINES)}, got {kind!r}", cli_hint=f"--engine must be one of {list(ENGINES)}"
        )
    if kind == "torch":
        return engine
    int8 = kind == "onnx-int8"
    folder = _export_folder(engine, model_dir, int8)
    return OnnxEngine(engine, folder / ("heads.int8.onnx" if int8 else "heads.onnx"), kind)


def _export_folder(engine: InferenceEngine, model_dir: str | Path | None, int8: bool) -> Path:
    if model_dir is not None:
        folder = Path(model_dir) / FOLDER
        try:
            meta = open_export(folder, engine)
            if meta.get("int8") or not int8:
                return folder
        except ModelFormatError as e:
            if (folder / "export.json").is_file():
                log.warning("%s; exporting again", e)
        try:
            return export_onnx(engine, folder, "int8")  # both graphs: the pair costs seconds once
        except OSError as e:
            log.warning("could not store the ONNX export beside the model (%s); using a temporary folder", e)
    import tempfile

    return export_onnx(engine, Path(tempfile.mkdtemp(prefix="behaviorlm-onnx-")) / FOLDER, "int8")


def compare(torch_engine: InferenceEngine, other: InferenceEngine, enc: Any, rows: slice) -> dict[str, float]:
    """Largest absolute differences of hidden states, action log-probs and item logits between two
    engines on the same rows (the export check and the benchmark use it)."""
    torch_engine = torch_engine.on("cpu")  # its network reads CPU states below
    h0, a0 = torch_engine.heads(enc, rows)
    h1, a1 = other.heads(enc, rows)
    actions = torch_engine.real_actions[:1].expand(len(h0))
    with torch.inference_mode():
        l0 = torch_engine.network.item_logits(h0, actions)[:, N_SPECIAL:]
        l1 = torch_engine.network.item_logits(h1, actions)[:, N_SPECIAL:]
    finite = torch.isfinite(a0)
    return {
        "hidden": float((h0 - h1).abs().max()),
        "action_logp": float((a0[finite] - a1[finite]).abs().max()),
        "item_logits": float(np.abs((l0 - l1).numpy()).max()),
    }
