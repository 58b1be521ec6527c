"""Named, versioned training recipes: the one place a benchmarked configuration lives.

``BehaviorLM()`` is the ``ml-1m`` recipe; ``BehaviorLM(recipe="clickstream-small")``,
``behaviorlm train --recipe clickstream-small``, the benchmarks and the pipelines all read the
same table, and any parameter given explicitly overrides the recipe's value. A recipe changes
only by a new version (``name@2``); the plain name means its latest version, and a saved model
records which version it came from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from behaviorlm.errors import ConfigurationError

#: Every estimator parameter and its value when no recipe sets it.
BASE_PARAMS: Mapping[str, Any] = MappingProxyType(
    {
        "max_len": 200,
        "dim": 64,
        "n_layers": 2,
        "n_heads": 2,
        "ffn_mult": 1,
        "dropout": 0.1,
        "copy_head": False,  # repeat-aware output: catalog softmax mixed with a copy over the context
        "copy_since": False,  # the copy head also sees "touched again since, with action a" per context item
        "gap_head": False,  # also predict when: a softmax over (next action, time-gap bucket) pairs
        "positions": "learned",  # or "rope": rotary position embeddings in every attention layer
        "ffn": "gelu",  # or "swiglu": the gated feed-forward
        "time_context": "history",  # or "request": a prediction also sees the time from the last event to the request
        "min_item_count": 1,
        "n_time_buckets": 24,
        "value_buckets": 0,  # per-event amount/quantity buckets (0: off); see the tokenizer
        "side_features": (),  # item table columns summed into the item token, e.g. ("category",)
        "epochs": 30,
        "batch_size": 128,
        "lr": 2e-3,
        "weight_decay": 0.1,
        "warmup_frac": 0.05,
        "min_lr_frac": 0.1,
        "grad_clip": 1.0,
        "loss": "full",
        "n_negatives": 1024,
        "action_loss_weight": 0.5,
        "gap_loss_weight": 0.5,  # weight of the gap head's likelihood (a model with gap_head)
        "patience": 5,
        "validate_every": 1,
        "seed": 42,
        "progress": True,
        "max_time_s": None,
        "max_steps": None,
        "sparse_embeddings": "auto",  # row-sparse item-table updates: auto (with the sampled loss) | on | off
        "device": "auto",  # where training and scoring run: auto (a GPU when present) | cpu | cuda | cuda:N | mps
    }
)


@dataclass(frozen=True)
class Recipe:
    """A named training configuration and the evidence behind it."""

    name: str
    version: int
    description: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    evidence: str = ""
    #: a version under evaluation: used only when named with its version, never as the plain name's latest
    preview: bool = False

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def params(self) -> dict[str, Any]:
        """Every estimator parameter under this recipe."""
        return {**BASE_PARAMS, **self.overrides}


_CLICKSTREAM_SMALL = {
    "max_len": 100,
    "epochs": 40,
    "batch_size": 32,
    "loss": "auto",
    "n_negatives": 4096,
    "patience": 8,
}

_RECIPES: tuple[Recipe, ...] = (
    Recipe(
        "ml-1m",
        1,
        "SASRec-sized model with full softmax, for catalogs up to ~20k items and long histories "
        "(MovieLens-like data). The library default.",
        {},
        "benchmarks/RESULTS.md section 1: ML-1M leave-one-out NDCG@10 0.1812, 30 epochs, 25.8 min on 2 cores",
    ),
    Recipe(
        "ml-1m",
        2,
        "ml-1m@1 with rotary position embeddings (positions='rope') and batches of 64 (twice the "
        "optimiser steps per epoch), 28 epochs so that training and validation fit in 30 minutes on 2 "
        "cores: at equal epochs both converge faster (the ML-1M sprint's ablations).",
        {"positions": "rope", "batch_size": 64, "epochs": 28},
        "benchmarks/RESULTS.md section 27 (make bench-ml1m, make bench-peer-rectools)",
        preview=True,
    ),
    Recipe(
        "clickstream-small",
        1,
        "Multi-action clickstreams with a catalog much larger than the user base (Taobao sample: 814 "
        "users, 55k items): short windows, small batches for enough optimiser steps, sampled softmax "
        "above 20k items, patience for a slow start.",
        _CLICKSTREAM_SMALL,
        "benchmarks/RESULTS.md section 1b: Taobao leave-one-out NDCG@10 0.0440 vs co-occurrence 0.0325",
    ),
    Recipe(
        "clickstream-quick",
        1,
        "clickstream-small on a demo budget: 15 epochs at a higher learning rate, so the whole batch "
        "pipeline runs in under 4 minutes on 2 cores. It does not reach the full recipe's quality.",
        # validating every 5 epochs: one full-catalog validation costs half a training epoch here
        {**_CLICKSTREAM_SMALL, "epochs": 15, "lr": 5e-3, "validate_every": 5},
        "benchmarks/RESULTS.md section 12: make demo (Taobao sample) NDCG@10 0.0088 vs co-occurrence 0.0325, "
        "significantly worse; lr 5e-3 chosen over 2e-3 (12 epochs: 0.0118 vs 0.0077 with min_item_count 2)",
    ),
    Recipe(
        "clickstream-small",
        2,
        "clickstream-small@1 with the repeat-aware output (copy_head): the next-item distribution mixes "
        "the catalog softmax with a copy over the user's own context, so items the user touched are "
        "ranked from their place in the history. Beats recent / repeat / session-kNN on the clickstreams.",
        {**_CLICKSTREAM_SMALL, "copy_head": True},
        "benchmarks/RESULTS.md section 20 (make bench-clickstream)",
    ),
    Recipe(
        "clickstream-quick",
        2,
        "clickstream-small@2 on a demo budget (make demo, under 5 minutes on 2 cores): its validation "
        "NDCG peaks within the first 2-4 epochs on the Taobao sample, after which the catalog softmax "
        "memorises the training sequences, so 8 epochs with patience 3 lose nothing.",
        {**_CLICKSTREAM_SMALL, "copy_head": True, "epochs": 8, "patience": 3},
        "benchmarks/RESULTS.md section 20: make demo",
    ),
    Recipe(
        "clickstream-small",
        3,
        "clickstream-small@2 whose copy head also sees, for each item of the context, whether the user "
        "touched it again later and with which action (a cart later bought, a view later carted): what the "
        "shop's 'in your cart' rule knows, which attention over item and action vectors cannot see.",
        {**_CLICKSTREAM_SMALL, "copy_head": True, "copy_since": True},
        "benchmarks/RESULTS.md section 25 (make bench-finetune): not yet better than @2 beyond the noise",
        preview=True,
    ),
    Recipe(
        "quick",
        1,
        "A minutes-long model for demos, notebooks and tests: fewer epochs, small batches.",
        {"epochs": 25, "batch_size": 32, "patience": 8, "dropout": 0.2},
        "README quick start: MovieLens-100K NDCG@10 0.085 vs popularity 0.043 in about 2 minutes",
    ),
)
#: every version of every recipe, by ``name@version`` (a saved model names the one it came from)
ALL_RECIPES: Mapping[str, Recipe] = MappingProxyType({r.ref: r for r in _RECIPES})
#: the latest version of each recipe that is not a preview, by name
RECIPES: Mapping[str, Recipe] = MappingProxyType(
    {r.name: r for r in sorted(_RECIPES, key=lambda r: (r.name, r.version)) if not r.preview}
)
DEFAULT_RECIPE = "ml-1m"


def get_recipe(ref: str | Recipe) -> Recipe:
    """A recipe by ``name`` (latest version) or ``name@version``."""
    if isinstance(ref, Recipe):
        return ref
    name, _, version = str(ref).partition("@")
    recipe = RECIPES.get(name)
    if recipe is None:
        raise ConfigurationError(
            f"unknown recipe {ref!r}; choose one of {sorted(RECIPES)}", cli_hint=f"--recipe one of {sorted(RECIPES)}"
        )
    if version and version != str(recipe.version):
        older = ALL_RECIPES.get(f"{name}@{version}")
        if older is None:
            known = sorted(r.ref for r in _RECIPES if r.name == name)
            raise ConfigurationError(f"recipe {name!r} has no version {version!r}; known: {known}")
        return older
    return recipe
