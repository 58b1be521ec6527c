"""Training checkpoints that resume *exactly*: the owner of ``checkpoint.pt``.

A checkpoint holds everything the next step depends on: weights, AdamW moments, the scheduler's
step, the negative-sampling generator, torch's global RNG (dropout), the numpy generator state
at the start of the epoch in progress (the epoch's batch order is drawn from it, so it is drawn
again identically) and how many batches of that epoch are done, plus the history, the best
weights so far and the early-stopping counter. A run resumed from it produces the same losses,
step for step, as one that never stopped (tested).

A fingerprint of the training data and configuration is stored too: resuming onto other data
or another configuration is refused with a message rather than silently continuing.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from behaviorlm.data.io import atomic_path
from behaviorlm.errors import ConfigurationError

FILENAME = "checkpoint.pt"


@dataclass
class Checkpointing:
    """Where and how often to checkpoint; ``resume`` continues from a checkpoint found there."""

    folder: Path
    every_steps: int = 1000
    resume: bool = True

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        if self.every_steps < 1:
            raise ConfigurationError("checkpoint every_steps must be >= 1", cli_hint="--checkpoint-every must be >= 1")

    @property
    def path(self) -> Path:
        return self.folder / FILENAME


@dataclass
class TrainState:
    """Where training stands: the epoch in progress and what has been accumulated so far."""

    epoch: int = 1
    batch: int = 0  # batches of `epoch` already done
    step: int = 0  # optimizer steps in all
    epoch_rng: dict[str, Any] | None = None  # numpy generator state when `epoch` began
    epoch_loss: float = 0.0  # token-weighted loss sum over the batches done in `epoch`
    epoch_tokens: int = 0
    epoch_seconds: float = 0.0
    elapsed_s: float = 0.0  # training seconds before this process (for max_time_s)
    bad_epochs: int = 0
    history: dict[str, Any] = field(default_factory=dict)
    best_state: dict[str, torch.Tensor] | None = None


def save(
    ckpt: Checkpointing,
    state: TrainState,
    model: torch.nn.Module,
    opt: Any,  # anything with state_dict / load_state_dict: nn.optim.Optimizers
    sched: Any,
    gen: torch.Generator,
    fingerprint: dict[str, Any],
) -> Path:
    """Write the checkpoint atomically (a kill mid-write leaves the previous one intact)."""
    body = {
        "state": {k: v for k, v in asdict(state).items() if k != "best_state"},
        "best_state": state.best_state,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,  # dropout on a GPU
        "fingerprint": fingerprint,
    }
    ckpt.folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(ckpt.path) as tmp:  # the io helper: its temp file is removed on failure too
        torch.save(body, tmp)
    return ckpt.path


def restore(
    ckpt: Checkpointing,
    model: torch.nn.Module,
    opt: Any,  # anything with state_dict / load_state_dict: nn.optim.Optimizers
    sched: Any,
    gen: torch.Generator,
    fingerprint: dict[str, Any],
) -> TrainState | None:
    """Load the checkpoint into the objects given and return the state; ``None`` when there is none."""
    if not (ckpt.resume and ckpt.path.is_file()):
        return None
    body = torch.load(ckpt.path, weights_only=True, map_location="cpu")  # a GPU run's checkpoint resumes anywhere
    if body["fingerprint"] != fingerprint:
        diff = sorted(k for k in fingerprint if body["fingerprint"].get(k) != fingerprint[k])
        raise ConfigurationError(
            f"{ckpt.path} was written for other training data or settings (differs in {diff}); "
            "remove it or use another checkpoint folder",
            cli_hint=f"--checkpoint-dir {ckpt.folder} holds a checkpoint of another run (differs in {diff})",
        )
    model.load_state_dict(body["model"])
    opt.load_state_dict(body["optimizer"])
    sched.load_state_dict(body["scheduler"])
    gen.set_state(body["generator"])
    torch.set_rng_state(body["torch_rng"])
    if body.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(body["cuda_rng"])
    return TrainState(**body["state"], best_state=copy.deepcopy(body["best_state"]))
