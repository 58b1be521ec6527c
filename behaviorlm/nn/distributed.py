"""Data-parallel training on ``torch.distributed`` (DDP): who this process is, and how it talks.

Why DDP and not a home-made scheme: gradient all-reduce overlapped with backward, bucketing and
the launchers (``torchrun``, Spark's ``TorchDistributor``) come with torch. This module only says
how behaviorlm uses it:

* **the global batch is fixed**: every rank draws the same seeded batch order over all users'
  windows and takes every ``world``-th window of each batch (what ``DistributedSampler`` does per
  epoch), so the users are sharded by rank and 1 or N processes see the same global batches;
* **losses are normalised by the global token count** (one all-reduce of four numbers per step),
  so the averaged gradient equals the one-process gradient, not a mean of per-rank means;
* **only rank 0 writes** (checkpoints, the model directory, MLflow) and validates; the others
  receive its decision.

Processes find each other through the standard environment (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``), set by ``torchrun``, by ``behaviorlm train --nproc N`` (which
runs torchrun's launcher) or by ``TorchDistributor``. The backend follows the device
(:mod:`behaviorlm.nn.device`): NCCL with one GPU per process, gloo for CPU processes.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from behaviorlm.nn import device


@dataclass
class ByteCounter:
    """Bytes this rank handed to all-reduce, counted by a DDP communication hook."""

    bytes: int = 0
    calls: int = 0


@dataclass
class Dist:
    """This process's place in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    counter: ByteCounter = field(default_factory=ByteCounter)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def backend(self) -> str | None:
        """The process group's backend (``gloo``, ``nccl``), ``None`` for one process."""
        return str(dist.get_backend()) if self.active else None

    def share(self, batch: np.ndarray) -> np.ndarray:
        """This rank's windows of a global batch: every ``world``-th, starting at ``rank``."""
        return batch[self.rank :: self.world]

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            self.counter.bytes += t.numel() * t.element_size()
        return t

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` under DDP (gradients averaged across ranks) when distributed, else as is."""
        if not self.active:
            return module
        ddp = nn.parallel.DistributedDataParallel(module)
        ddp.register_comm_hook(self.counter, _counting_allreduce)
        return ddp


def _counting_allreduce(state, bucket):  # no annotations: DDP checks them, and ours are strings
    """The default all-reduce (sum, then divide by world size), counting the bytes it sends: a
    sparse gradient (a row-sparse item table, nn.optim) coalesced first -- one row per item
    touched, not one per lookup -- and counted as its indices and values."""
    buf = bucket.buffer()
    if buf.is_sparse:
        buf = buf.coalesce()
        state.bytes += buf.values().numel() * buf.element_size() + buf.indices().numel() * 8
    else:
        state.bytes += buf.numel() * buf.element_size()
    state.calls += 1
    fut = dist.all_reduce(buf.div_(dist.get_world_size()), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def current() -> Dist:
    """The running job's ranks, if a process group is up; else one process."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size())
    return Dist()


def init_from_env(device_name: str = "auto") -> Dist:
    """Join the process group the launcher described in the environment (no-op for one process):
    NCCL when the ranks train on GPUs (``device_name`` resolves to CUDA), gloo otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dev = rank_device(device_name)
        dist.init_process_group(backend=device.ddp_backend(dev), device_id=dev if dev.type == "cuda" else None)
    return current()


def rank_device(device_name: str = "auto") -> torch.device:
    """This process's device: under a launcher on GPUs, the GPU of its local rank (``LOCAL_RANK``),
    one per process as DDP expects; otherwise :func:`behaviorlm.nn.device.resolve`."""
    dev = device.resolve(device_name)
    if dev.type == "cuda" and dev.index is None and "LOCAL_RANK" in os.environ:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def launch(nproc: int, module: str, args: list[str]) -> int:
    """Run ``python -m module args`` in ``nproc`` local processes through torchrun's launcher.

    Each process gets ``cores // nproc`` torch threads, so N processes do not oversubscribe the
    machine. Returns the exit status (non-zero when any process failed).
    """
    from torch.distributed.run import get_args_parser, run

    threads = max(1, (os.cpu_count() or 1) // nproc)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    argv = ["--standalone", f"--nproc-per-node={nproc}", "--module", module, *_without_nproc(args)]
    try:
        run(get_args_parser().parse_args(argv))
    except Exception as e:  # torchrun raises ChildFailedError with each rank's traceback printed
        print(f"distributed training failed: {e}", file=sys.stderr)
        return 1
    return 0


def _without_nproc(args: list[str]) -> list[str]:
    """The command's own arguments minus ``--nproc N`` (the children know their rank from the
    environment; torchrun's parser would also take ``--nproc`` for its ``--nproc-per-node``)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out
