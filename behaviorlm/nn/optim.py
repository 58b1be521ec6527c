"""The training step's optimisers: AdamW for the network, SparseAdam for a row-sparse item table.

Why two: with a sampled softmax a step reads a few thousand rows of the item table (its tokens,
its targets, its shared negatives), yet a dense embedding gradient is as large as the catalog --
64M floats for 1M items -- and AdamW then updates every row, every step: the reason a 1M-item
model trained ~3x slower per token than a 100k-item one, and 99% of the bytes DDP all-reduced
(benchmarks/RESULTS.md section 14). With ``nn.Embedding(sparse=True)`` the gradient holds only
the rows a step touched; ``torch.optim.SparseAdam`` updates those rows' moments and weights and
leaves the rest alone (a *lazy* Adam: an untouched row does not drift on old momentum, the one
difference from dense AdamW, measured in RESULTS.md section 28); DDP all-reduces sparse
gradients on gloo as (indices, values), so the bytes follow the rows touched, not the catalog.

It is worth it only when a step touches a small part of the table: the full softmax multiplies
by the whole matrix every step (a dense gradient by construction), so ``"auto"`` turns it on
with the sampled loss only, and from :data:`SPARSE_MIN_ITEMS` items up. NCCL cannot all-reduce
sparse tensors, so ``"auto"`` keeps the dense table for multi-GPU jobs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from behaviorlm.errors import ConfigurationError

SPARSE_MODES = ("auto", "on", "off")
#: ``auto`` trains the table row-sparse from this many items up: below it a step's rows are a
#: large share of the table anyway, and the clickstream recipes' figures (Taobao 55k, REES46)
#: were measured with dense AdamW (section 28 compares both).
SPARSE_MIN_ITEMS = 100_000


def use_sparse_items(mode: str, loss: str, n_items: int, backend: str | None = None) -> bool:
    """Whether the item table trains row-sparse: ``mode`` (auto | on | off, checked by the
    training config) for a run over ``n_items`` whose resolved ``loss`` is full or sampled, under the DDP
    ``backend`` (None: one process)."""
    if mode == "on":
        if loss != "sampled":
            raise ConfigurationError(
                "sparse embedding updates need the sampled loss (the full softmax touches every row of the item table)",
                cli_hint="--sparse-embeddings on needs the sampled loss (a clickstream recipe, or over 20,000 items)",
            )
        if backend == "nccl":
            raise ConfigurationError(
                "NCCL cannot all-reduce sparse gradients: train multi-GPU jobs with --sparse-embeddings off"
            )
    auto = loss == "sampled" and n_items >= SPARSE_MIN_ITEMS and backend != "nccl"
    return mode == "on" or (mode == "auto" and auto)


class Optimizers:
    """AdamW over ``dense_groups`` and, when given, SparseAdam over ``sparse_params``, stepped
    and zeroed together; ``state_dict`` is AdamW's own when there is no sparse part, so a dense
    run's checkpoints keep their layout."""

    def __init__(
        self,
        dense_groups: list[dict[str, Any]],
        sparse_params: list[torch.nn.Parameter],
        lr: float,
        betas: tuple[float, float],
    ):
        self.parts: list[torch.optim.Optimizer] = [torch.optim.AdamW(dense_groups, lr=lr, betas=betas)]
        if sparse_params:
            self.parts.append(torch.optim.SparseAdam(sparse_params, lr=lr, betas=betas))

    @property
    def sparse(self) -> bool:
        return len(self.parts) > 1

    def zero_grad(self) -> None:
        for opt in self.parts:
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        for opt in self.parts:
            opt.step()

    def params(self) -> Iterable[torch.nn.Parameter]:
        for opt in self.parts:
            for group in opt.param_groups:
                yield from group["params"]

    def state_dict(self) -> dict[str, Any]:
        if not self.sparse:
            return self.parts[0].state_dict()
        return {"parts": [opt.state_dict() for opt in self.parts]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        parts = state["parts"] if "parts" in state else [state]
        if len(parts) != len(self.parts):
            raise ConfigurationError("the checkpoint's optimizer was for another --sparse-embeddings setting")
        for opt, s in zip(self.parts, parts, strict=True):
            opt.load_state_dict(s)

    def schedules(self, lr_lambda: Callable[[int], float]) -> Schedules:
        """One LambdaLR per optimiser, all on the same schedule."""
        return Schedules([torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda) for opt in self.parts])


class Schedules:
    """The learning-rate schedules of :class:`Optimizers`, stepped and saved together."""

    def __init__(self, parts: list[torch.optim.lr_scheduler.LambdaLR]):
        self.parts = parts

    def step(self) -> None:
        for s in self.parts:
            s.step()

    def get_last_lr(self) -> list[float]:
        return [float(lr) for lr in self.parts[0].get_last_lr()]

    def state_dict(self) -> dict[str, Any]:
        if len(self.parts) == 1:
            return self.parts[0].state_dict()
        return {"parts": [s.state_dict() for s in self.parts]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for s, part in zip(self.parts, state["parts"] if "parts" in state else [state], strict=True):
            s.load_state_dict(part)


@torch.no_grad()
def clip_grad_norm_(params: Iterable[torch.nn.Parameter], max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` (2-norm over every gradient) that also takes sparse
    gradients, which torch's does not: each is coalesced (duplicate rows summed, as the
    optimiser would) and its values enter the norm and the scaling."""
    with_grad = [p for p in params if p.grad is not None]
    if not any(p.grad.is_sparse for p in with_grad if p.grad is not None):  # torch's own: dense runs bit-identical
        return float(torch.nn.utils.clip_grad_norm_(with_grad, max_norm))
    grads = []
    for p in with_grad:
        g = p.grad
        assert g is not None
        if g.is_sparse:
            p.grad = g = g.coalesce()
            grads.append(g.values())
        else:
            grads.append(g)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, 2) for g in grads]), 2)
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale)
    return float(total)
