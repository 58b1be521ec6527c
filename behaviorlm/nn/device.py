"""Where tensors live: choosing the accelerator, and the few rules for crossing to it.

One place decides, so training, DDP, scoring, the service and ONNX agree:

* ``auto`` (the default everywhere) is CUDA when a GPU is visible, else Apple's MPS, else the
  CPU; ``cpu``, ``cuda``, ``cuda:N`` and ``mps`` are taken as asked, and one that is not present
  is a :class:`~behaviorlm.errors.ConfigurationError` naming what is (never a silent CPU run);
* **bf16 autocast on CUDA** for the transformer's matmuls (:func:`autocast`): ampere and later
  run bf16 at twice fp32's throughput or more, and bf16 needs no loss scaling; the loss and the
  softmax over the catalog stay in fp32 (autocast's own rules), the weights stay fp32;
* **batches cross pinned and non-blocking** (:func:`to_device`): the next batch's indices are
  built on the CPU while the GPU still runs the last step;
* **DDP's backend follows the device**: NCCL between GPUs, gloo on CPUs (:func:`ddp_backend`);
* everything that leaves a model for numpy, polars or an ANN index crosses back with
  ``.cpu()``: on the CPU that is free (the same tensor), so one code path serves both.

Tests run on the CPU (``device="cpu"`` explicitly, and ``auto`` on a machine without a GPU);
``make gpu-check`` (benchmarks/gpu_check.py) compares CUDA with the CPU when a GPU is present.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch

from behaviorlm.errors import ConfigurationError

#: what ``--device`` and ``device=`` accept (``cuda:N`` also, for one GPU of several)
DEVICES = ("auto", "cpu", "cuda", "mps")


def check_name(name: str) -> str:
    """``name`` if it is a device this library can be asked for, else a clear error (before any work)."""
    base, _, index = str(name).partition(":")
    if base not in DEVICES or (index and (base != "cuda" or not index.isdigit())):
        raise ConfigurationError(
            f"device must be one of {', '.join(DEVICES)} (or cuda:N), got {name!r}",
            cli_hint=f"--device must be one of {', '.join(DEVICES)} (or cuda:N), got {name!r}",
        )
    return name


def available() -> list[str]:
    """The devices present on this machine, best first (``cpu`` always)."""
    found = []
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        found.append("mps")
    return [*found, "cpu"]


def resolve(name: str = "auto") -> torch.device:
    """The :class:`torch.device` for ``name``; ``auto`` picks CUDA, then MPS, then the CPU."""
    check_name(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    dev = torch.device(name)
    missing = (
        dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count())
    ) or (dev.type == "mps" and not _mps_available())
    if missing:
        have = ", ".join(available())
        raise ConfigurationError(
            f"device {name!r} asked for, but this machine has {have}",
            cli_hint=f"--device {name}: this machine has {have} (--device auto takes the best of them)",
        )
    return dev


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on a CUDA device that supports it; a no-op anywhere else: on this project's
    2-core AVX2 box a training step of the ml-1m recipe under CPU bf16 autocast took 2.5x the fp32
    step (RESULTS.md section 29), and MPS' autocast is partial."""
    if enabled and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch of CPU tensors on ``device``: pinned and non-blocking to CUDA, as is on the CPU."""
    if device.type == "cpu":
        return dict(batch)
    pin = device.type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=pin) for k, v in batch.items()}


def ddp_backend(device: torch.device) -> str:
    """NCCL between GPUs, gloo for CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def synchronized(device: torch.device) -> Iterator[None]:
    """Wait for the device's queued work on exit, so a wall-clock timing around it is honest."""
    try:
        yield
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
