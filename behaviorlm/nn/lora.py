"""Low-rank adapters (LoRA, Hu et al. 2021) on the transformer's projections.

Why: a shop has segments and markets that behave differently, and a full copy of the model per
segment multiplies training time and storage. An adapter adds ``(alpha / r) * B A x`` beside a
frozen projection ``W x`` -- ``A`` (r x in) random, ``B`` (out x r) zero, so at initialisation
the model computes exactly what the base computes -- and trains only ``A`` and ``B``: a few
thousand parameters per segment, saved as a small file beside the base model.

Why not ``peft``: its wheel (0.21.2) requires ``transformers``, ``accelerate``,
``huggingface_hub`` and ``safetensors``, for what is here a dozen lines; the wrapping itself was
not measured, as the dependencies alone rule it out for a core feature. The serving path merges
the adapter into a copy of the weights (:func:`merged`), so an adapted model scores exactly as
fast as the base.

Targets are the attention's ``qkv`` and output projections and the feed-forward's two layers of
every block (names relative to the network, :data:`TARGETS`); embeddings and heads stay shared.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import TypeVar

import torch
from torch import nn

from behaviorlm.errors import ConfigurationError

M = TypeVar("M", bound=nn.Module)

#: module name suffixes (inside each block) that get an adapter
TARGETS = ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")


class LoRALinear(nn.Module):
    """``base(x) + scale * (x A^T) B^T`` with ``base`` frozen; ``B`` starts at zero."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # nn.Linear's own init, as in the paper's code
        self.scale = alpha / rank

    @property
    def weight(self) -> torch.Tensor:
        """The merged weight (what :func:`merged` writes), for code that reads ``.weight``."""
        return self.base.weight + self.scale * self.lora_b @ self.lora_a

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale


def add_adapters(network: nn.Module, rank: int = 8, alpha: float = 16.0, targets: Iterable[str] = TARGETS) -> list[str]:
    """Freeze ``network`` and wrap every Linear whose name ends with one of ``targets`` in a
    :class:`LoRALinear` (in place); returns the wrapped names."""
    if rank < 1:
        raise ConfigurationError(f"rank must be >= 1, got {rank}", cli_hint=f"--rank must be >= 1, got {rank}")
    network.requires_grad_(False)
    suffixes = tuple(targets)
    names = [n for n, m in network.named_modules() if isinstance(m, nn.Linear) and n.endswith(suffixes)]
    if not names:
        raise ConfigurationError(f"no Linear layer matches the adapter targets {suffixes}")
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = network.get_submodule(parent)
        setattr(owner, leaf, LoRALinear(getattr(owner, leaf), rank, alpha))
    return names


def adapter_state(network: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter's tensors (``...lora_a`` / ``...lora_b``): what an adapter file holds."""
    return {k: v.detach().clone() for k, v in network.state_dict().items() if k.endswith((".lora_a", ".lora_b"))}


def load_adapter_state(network: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Install an adapter's tensors into a network that :func:`add_adapters` prepared alike."""
    expected = set(adapter_state(network))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise ConfigurationError(f"adapter tensors do not fit this network (missing {missing}, unexpected {extra})")
    network.load_state_dict(state, strict=False)


def merged(network: M) -> M:
    """A copy of ``network`` with every adapter folded into its Linear (``W + scale B A``): the
    same outputs as the adapted network, at the base's cost."""
    out = copy.deepcopy(network)
    for name, module in list(out.named_modules()):
        if isinstance(module, LoRALinear):
            parent, _, leaf = name.rpartition(".")
            linear = module.base
            with torch.no_grad():
                linear.weight.copy_(module.weight)
            setattr(out.get_submodule(parent), leaf, linear.requires_grad_(False))
    return out


def count(state: dict[str, torch.Tensor]) -> int:
    """Parameters in an adapter state."""
    return sum(t.numel() for t in state.values())
