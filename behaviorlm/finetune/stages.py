"""Preference and reward fine-tuning of a pretrained network toward purchases.

One loop serves the stages of :mod:`behaviorlm.nn.preference`, on the contexts of a
:class:`~behaviorlm.finetune.pairs.PreferenceSet`:

* ``dpo`` / ``sdpo`` -- the bought item over the rejected ones, against the frozen pretrained
  model (the reference), pairwise or in one softmax;
* ``sft`` -- cross-entropy on the bought item at the same contexts, batches and steps: the
  control a preference stage has to beat to be worth its machinery;
* ``grpo`` -- the verifiable-reward stage: K slates of N items are drawn from the policy's own
  ``P(item | next action = purchase)`` (without replacement: a recommendation list is the
  model's "answer"), rewarded 1 when they hold the item the user really bought next and
  ``soft_reward`` when they hold only an item the user had carted in that window, and updated
  with group-relative advantages and a KL penalty to the reference.

Why dropout is off throughout: the DPO loss equals ``log 2`` at the reference only if the
policy computes what the reference computed; with dropout each step would start from a noisy
copy of it (TRL disables dropout for the same reason).

Rejected items: ``window`` (what the user touched around the purchase and never bought),
``topk`` (random picks from the reference's own top-K for the action, not bought by the
user: RoDPO found those better than the hardest), ``hard`` (the reference's top-ranked ones),
``mixed`` (window items first, topped up from the top-K). Validation (a callable the estimator
supplies: purchase-target NDCG on held-out purchases) runs before training and after every
epoch; the best state is kept, so a stage that does not help returns the reference unchanged.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from behaviorlm.errors import ConfigurationError, InputDataError
from behaviorlm.finetune.pairs import PreferenceSet
from behaviorlm.nn.model import BehaviorTransformer
from behaviorlm.nn.preference import (
    dpo_loss,
    group_advantages,
    kl_to_reference,
    plackett_luce_logp,
    sdpo_loss,
    sft_loss,
)
from behaviorlm.sequence.tokenizer import N_SPECIAL, PAD

METHODS = ("dpo", "sdpo", "sft", "grpo")
NEGATIVES = ("window", "topk", "hard", "mixed")
#: default learning rates, chosen on RetailRocket's validation purchases (benchmarks/RESULTS.md section 25):
#: GRPO's gradient is a rare reward's, so it needs a larger step than the dense pairwise losses
LEARNING_RATES = {"dpo": 3e-4, "sdpo": 3e-4, "sft": 3e-4, "grpo": 3e-3}


@dataclass
class StageConfig:
    method: str = "dpo"
    beta: float = 0.1  # DPO temperature: how far the policy may move from the reference
    negatives: str = "mixed"
    n_rejected: int = 8  # rejected items per context
    top_k: int = 50  # the reference's top-K that model-drawn negatives come from
    epochs: int = 6
    batch_size: int = 64
    lr: float | None = None  # None: LEARNING_RATES[method]
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    group_size: int = 16  # GRPO: slates drawn per context
    slate: int = 1  # GRPO: items per slate (a longer slate nearly always holds the purchase: no signal)
    kl_coef: float = 0.01  # GRPO: weight of the KL penalty to the reference
    soft_reward: float = 0.25  # GRPO: reward of a slate holding only a carted item
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigurationError(
                f"method must be one of {METHODS}, got {self.method!r}", cli_hint=f"--method one of {METHODS}"
            )
        if self.negatives not in NEGATIVES:
            raise ConfigurationError(
                f"negatives must be one of {NEGATIVES}, got {self.negatives!r}",
                cli_hint=f"--negatives one of {NEGATIVES}",
            )
        for name in ("epochs", "batch_size", "group_size", "slate", "top_k"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr is None:
            self.lr = LEARNING_RATES[self.method]
        if self.beta <= 0 or self.lr <= 0:
            raise ConfigurationError(f"beta and lr must be > 0, got beta={self.beta}, lr={self.lr}")


@dataclass
class StageHistory:
    method: str
    config: dict
    contexts: int
    pairs: int
    epochs: list[dict] = field(default_factory=list)
    reference_score: float | None = None
    best_epoch: int = 0  # 0: the reference itself was best on validation
    best_score: float | None = None
    train_time_s: float = 0.0


def finetune(
    model: BehaviorTransformer,
    data: PreferenceSet,
    action_id: int,
    cfg: StageConfig,
    validate: Callable[[BehaviorTransformer], float] | None = None,
) -> StageHistory:
    """Fine-tune ``model`` in place on ``data`` for next action ``action_id``; returns the history
    (with validation, the best epoch's weights -- possibly the reference's -- are kept)."""
    if len(data) == 0:
        raise InputDataError("no purchase contexts to fine-tune on (every purchase needs an event before it)")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    model.eval()  # dropout off (module docstring)
    if cfg.method in ("dpo", "sdpo") and cfg.negatives != "window":
        data = data.with_rejected(model_negatives(reference, data, action_id, cfg, rng))
    if cfg.method in ("dpo", "sdpo"):
        data = data.keep(np.flatnonzero(data.n_rejected > 0))
        if len(data) == 0:
            raise InputDataError("no context has a rejected item: try --negatives topk or a wider --window")
    hist = StageHistory(cfg.method, asdict(cfg), len(data), int(data.n_rejected.sum()))
    ref_lp = _reference_logps(reference, data, action_id) if cfg.method != "grpo" else None
    lr = cfg.lr if cfg.lr is not None else LEARNING_RATES[cfg.method]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=cfg.weight_decay)
    best_state = copy.deepcopy(model.state_dict()) if validate else None
    if validate:
        hist.reference_score = hist.best_score = float(validate(model))
    t0 = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        losses = _epoch(model, reference, data, ref_lp, action_id, cfg, opt, rng, epoch)
        stats = {"epoch": epoch, **losses, "seconds": time.perf_counter() - t0}
        if validate:
            stats["val_score"] = score = float(validate(model))
            if hist.best_score is None or score > hist.best_score:
                hist.best_score, hist.best_epoch, best_state = score, epoch, copy.deepcopy(model.state_dict())
        hist.epochs.append(stats)
    hist.train_time_s = time.perf_counter() - t0
    if best_state is not None:
        model.load_state_dict(best_state)
    return hist


def _epoch(model, reference, data, ref_lp, action_id, cfg, opt, rng, epoch) -> dict[str, float]:
    order = rng.permutation(len(data))
    totals: dict[str, float] = {}
    bar = tqdm(range(0, len(order), cfg.batch_size), desc=f"{cfg.method} epoch {epoch}", disable=not cfg.progress)
    for s in bar:
        rows = order[s : s + cfg.batch_size]
        batch = data.batch(rows)
        if cfg.method == "grpo":
            loss, parts = _grpo_loss(model, reference, batch, data, rows, action_id, cfg)
        else:
            loss, parts = _preference_loss(model, batch, ref_lp[rows], action_id, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        for k, v in parts.items():
            totals[k] = totals.get(k, 0.0) + v * len(rows)
        bar.set_postfix(loss=f"{parts['loss']:.4f}")
    return {k: v / len(order) for k, v in totals.items()}


def _columns(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen | rejected) columns per row, padding replaced by the chosen id (its value is
    masked out: a PAD column is -inf under both heads, whose mixture has no gradient), and the
    validity mask of the rejected part."""
    rejected = batch["rejected"]
    valid = rejected != PAD
    cols = torch.cat([batch["chosen"][:, None], torch.where(valid, rejected, batch["chosen"][:, None])], 1)
    return cols, valid


def _policy_logps(model: BehaviorTransformer, batch: dict[str, torch.Tensor], cols: torch.Tensor, action_id: int):
    state = model(batch["items"], batch["actions"], batch["gaps"], last=batch["last"])
    actions = torch.full((len(state),), action_id, dtype=torch.long)
    return model.item_logp_columns(state, actions, cols)


@torch.no_grad()
def _reference_logps(reference: BehaviorTransformer, data: PreferenceSet, action_id: int, chunk: int = 256):
    """The reference's log-probabilities of every context's (chosen | rejected) columns, once."""
    out = []
    for s in range(0, len(data), chunk):
        batch = data.batch(np.arange(s, min(s + chunk, len(data))))
        out.append(_policy_logps(reference, batch, _columns(batch)[0], action_id))
    return torch.cat(out)


def _preference_loss(model, batch, ref, action_id, cfg) -> tuple[torch.Tensor, dict[str, float]]:
    cols, valid = _columns(batch)
    lp = _policy_logps(model, batch, cols, action_id)
    if cfg.method == "sft":
        loss = sft_loss(lp[:, 0])
    else:
        fn = dpo_loss if cfg.method == "dpo" else sdpo_loss
        loss = fn(lp[:, 0], lp[:, 1:], ref[:, 0], ref[:, 1:], cfg.beta, valid)
    with torch.no_grad():
        margin = ((lp[:, :1] - ref[:, :1]) - (lp[:, 1:] - ref[:, 1:]))[valid]
        won = float((margin > 0).float().mean()) if margin.numel() else float("nan")
    return loss, {"loss": loss.item(), "chosen_logp": lp[:, 0].mean().item(), "reward_accuracy": won}


def _grpo_loss(model, reference, batch, data, rows, action_id, cfg) -> tuple[torch.Tensor, dict[str, float]]:
    state = model(batch["items"], batch["actions"], batch["gaps"], last=batch["last"])
    actions = torch.full((len(state),), action_id, dtype=torch.long)
    with torch.no_grad():
        slates = _sample_slates(model.item_logp(state.detach(), actions), cfg.group_size, cfg.slate)  # (B, K, N)
        rewards = slate_rewards(slates, batch["chosen"], [data.carted[r] for r in rows], cfg.soft_reward)
        ref_state = reference(batch["items"], batch["actions"], batch["gaps"], last=batch["last"])
        ref_lp = reference.item_logp_columns(ref_state, actions, slates.flatten(1)).view_as(slates)
    lp = model.item_logp_columns(state, actions, slates.flatten(1)).view_as(slates)
    adv = group_advantages(rewards)
    policy_term = -(adv * plackett_luce_logp(lp) / cfg.slate).mean()
    kl = kl_to_reference(lp, ref_lp).mean()
    loss = policy_term + cfg.kl_coef * kl
    return loss, {"loss": loss.item(), "reward": rewards.mean().item(), "kl": kl.item()}


def _sample_slates(logp: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """K slates of N distinct items per row, drawn without replacement from ``exp(logp)``
    (Gumbel top-N: the same law as drawing one item at a time and removing it)."""
    g = -torch.log(-torch.log(torch.rand(logp.shape[0], k, logp.shape[1]).clamp_min(1e-20)))
    return torch.topk(logp[:, None, :] + g, n, dim=-1).indices


def slate_rewards(slates: torch.Tensor, chosen: torch.Tensor, carted: list[np.ndarray], soft: float) -> torch.Tensor:
    """1 for a slate holding the item bought; ``soft`` for one holding only a carted item; else 0."""
    hit = (slates == chosen[:, None, None]).any(-1).float()
    soft_hit = torch.zeros_like(hit)
    for r, items in enumerate(carted):
        if len(items):
            soft_hit[r] = torch.isin(slates[r], torch.from_numpy(items)).any(-1).float()
    return torch.maximum(hit, soft * soft_hit)


@torch.no_grad()
def model_negatives(
    reference: BehaviorTransformer, data: PreferenceSet, action_id: int, cfg: StageConfig, rng: np.random.Generator
) -> np.ndarray:
    """Rejected items drawn from the reference's top-K for the action: random (``topk``), the
    highest-ranked (``hard``), or after the window's own (``mixed``); never an item the user
    bought in the period."""
    out = np.full((len(data), cfg.n_rejected), PAD, np.int64)
    actions_for = lambda n: torch.full((n,), action_id, dtype=torch.long)  # noqa: E731
    for s in range(0, len(data), 256):
        rows = np.arange(s, min(s + 256, len(data)))
        batch = data.batch(rows)
        state = reference(batch["items"], batch["actions"], batch["gaps"], last=batch["last"])
        logp = reference.item_logp(state, actions_for(len(rows)))
        top = torch.topk(logp, min(cfg.top_k + 1, logp.shape[1] - N_SPECIAL), -1).indices.numpy()
        for i, r in enumerate(rows):
            bought = data.bought[data.users[r]]
            cand = top[i][(top[i] >= N_SPECIAL) & ~np.isin(top[i], bought) & (top[i] != data.chosen[r])]
            out[r] = _pick(cand, data.rejected[r], cfg, rng)
    return out


def _pick(cand: np.ndarray, window: np.ndarray, cfg: StageConfig, rng: np.random.Generator) -> np.ndarray:
    n = cfg.n_rejected
    row = np.full(n, PAD, np.int64)
    if cfg.negatives == "hard":
        pick = cand[:n]
    elif cfg.negatives == "topk":
        pick = rng.choice(cand, min(n, len(cand)), replace=False) if len(cand) else cand
    else:  # mixed: the window's own first
        own = window[window != PAD]
        rest = cand[~np.isin(cand, own)]
        extra = (
            rng.choice(rest, min(n - len(own), len(rest)), replace=False) if len(own) < n and len(rest) else rest[:0]
        )
        pick = np.concatenate([own, extra])[:n]
    row[: len(pick)] = pick
    return row
