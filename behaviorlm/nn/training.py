"""Pretraining loop: next-token cross-entropy on every position, padding ignored.

Why these choices:
* **Full softmax** over the catalog by default -- on ML-1M it is what lifts SASRec from ~0.13 to
  ~0.18 NDCG@10 (Klenitskiy & Vasilev, RecSys'23); ``loss="sampled"`` (shared uniform
  negatives, accidental hits masked) keeps memory flat for catalogs of millions.
* **Windows, not truncation**: a history longer than ``max_len`` is cut into consecutive
  windows, so every event is a training target once per epoch.
* **Length-bucketed batches**: windows of similar length share a batch, so little compute is
  spent on padding; batch order is shuffled with a seeded generator.
* Early stopping calls a ``validate`` function supplied by the caller (metrics are defined in
  ``evaluation``, not here) and restores the best weights.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from behaviorlm.errors import ConfigurationError, InputDataError
from behaviorlm.nn.model import BehaviorTransformer
from behaviorlm.sequence.tokenizer import N_SPECIAL, PAD, UNK, EncodedSequences


@dataclass
class TrainConfig:
    epochs: int = 50
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.1
    grad_clip: float = 1.0
    loss: str = "full"  # "full" | "sampled" | "auto" (full up to AUTO_FULL_MAX_ITEMS items, else sampled)
    n_negatives: int = 1024
    action_loss_weight: float = 0.5
    patience: int = 5  # epochs without validation improvement before stopping
    validate_every: int = 1
    seed: int = 42
    progress: bool = True
    max_time_s: float | None = None  # stop (keeping the best) once training exceeds this

    def __post_init__(self) -> None:
        if self.loss not in ("full", "sampled", "auto"):
            raise ConfigurationError(f"loss must be 'full', 'sampled' or 'auto', got {self.loss!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigurationError("epochs and batch_size must be >= 1")

    def resolved(self, n_items: int) -> TrainConfig:
        """``loss="auto"`` made concrete for a vocabulary of ``n_items`` items."""
        if self.loss != "auto":
            return self
        return replace(self, loss="full" if n_items <= AUTO_FULL_MAX_ITEMS else "sampled")


#: Above this many items the full softmax's (tokens x catalog) work dominates a CPU epoch, and
#: sampled softmax is the usual trade (what the Taobao recipe, 55k items, was measured with).
AUTO_FULL_MAX_ITEMS = 20_000


@dataclass
class TrainHistory:
    epochs: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    best_score: float | None = None
    stopped_early: bool = False
    train_time_s: float = 0.0


@dataclass
class Windows:
    """Training examples: inputs are tokens[s:e], targets are tokens[s+1:e+1]."""

    starts: np.ndarray
    ends: np.ndarray


def make_windows(seqs: EncodedSequences, max_len: int) -> Windows:
    """Cut each sequence (BOS + events) into windows of <= max_len inputs, newest first."""
    starts, ends = [], []
    for u in range(len(seqs)):
        lo, hi = int(seqs.offsets[u]), int(seqs.offsets[u + 1]) - 1  # last input has a target
        e = hi
        while e > lo:
            s = max(lo, e - max_len)
            starts.append(s)
            ends.append(e)
            e = s
    return Windows(np.asarray(starts, np.int64), np.asarray(ends, np.int64))


def batch_from_windows(seqs: EncodedSequences, starts: np.ndarray, ends: np.ndarray) -> dict[str, torch.Tensor]:
    """Right-padded input/target tensors for a set of windows."""
    lens = ends - starts
    n, width = len(lens), int(lens.max())
    idx = starts[:, None] + np.arange(width)[None, :]
    valid = np.arange(width)[None, :] < lens[:, None]
    idx = np.where(valid, idx, 0)
    tgt_idx = np.where(valid, idx + 1, 0)

    def take(arr: np.ndarray, ix: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.where(valid, arr[ix], PAD))

    batch = {
        "items": take(seqs.items, idx),
        "actions": take(seqs.actions, idx),
        "gaps": take(seqs.gaps, idx),
        "target_items": take(seqs.items, tgt_idx),
        "target_actions": take(seqs.actions, tgt_idx),
    }
    batch["target_items"][batch["target_items"] == UNK] = PAD  # rare items are not targets
    assert batch["items"].shape == (n, width)
    return batch


def iterate_batches(windows: Windows, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Yield index arrays of similar-length windows, in shuffled batch order."""
    lens = windows.ends - windows.starts
    order = np.argsort(lens + rng.random(len(lens)), kind="stable")  # random tie-breaks
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for b in rng.permutation(len(batches)):
        yield batches[b]


def sequence_loss(
    model: BehaviorTransformer, batch: dict[str, torch.Tensor], cfg: TrainConfig, gen: torch.Generator | None = None
) -> tuple[torch.Tensor, int]:
    """Mean CE of next item (given the true next action) + weighted CE of next action.

    Padding (and UNK targets) are ignored through ``ignore_index=PAD``; returns the loss and
    the number of target tokens.
    """
    h = model(batch["items"], batch["actions"], batch["gaps"])
    tgt_i, tgt_a = batch["target_items"], batch["target_actions"]
    mask = tgt_i != PAD
    n_tokens = int(mask.sum())
    if cfg.loss == "full":
        q = model.item_query(h[mask], tgt_a[mask])
        item_loss = FusedLinearCrossEntropy.apply(q, model.item_emb.weight, tgt_i[mask], 2048)
    else:
        item_loss = _sampled_softmax_loss(model, h[mask], tgt_a[mask], tgt_i[mask], cfg.n_negatives, gen)
    a_logits = model.action_logits(h)
    action_loss = F.cross_entropy(a_logits.reshape(-1, a_logits.shape[-1]), tgt_a.reshape(-1), ignore_index=PAD)
    return item_loss + cfg.action_loss_weight * action_loss, n_tokens


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Mean CE of ``softmax(h @ E.T)`` computed in row chunks, gradients included.

    Why: on CPU the (tokens x catalog) logit matrix is memory-bound. Chunks of 2k rows stay in
    cache, and since the gradient ``softmax - onehot`` is known in the forward pass, nothing of
    size tokens x catalog is kept for backward (speed-up measured in benchmarks/RESULTS.md
    section 1; exactness tested against ``F.cross_entropy``). Special-token columns are
    excluded from the softmax.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, emb: torch.Tensor, target: torch.Tensor, chunk: int) -> torch.Tensor:
        grad_h, grad_e = torch.empty_like(h), torch.zeros_like(emb)
        loss = h.new_zeros(())
        n = max(len(target), 1)
        for s in range(0, len(target), chunk):
            hc, tc = h[s : s + chunk], target[s : s + chunk]
            logits = hc @ emb.T
            logits[:, :N_SPECIAL] = float("-inf")
            lse = torch.logsumexp(logits, 1, keepdim=True)
            loss += (lse.squeeze(1) - logits.gather(1, tc[:, None]).squeeze(1)).sum()
            p = (logits - lse).exp_()
            p[torch.arange(len(tc)), tc] -= 1.0
            grad_h[s : s + chunk] = p @ emb
            grad_e.addmm_(p.T, hc)
        ctx.save_for_backward(grad_h, grad_e)
        ctx.n = n
        return loss / n

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_e = ctx.saved_tensors
        scale = grad_out / ctx.n
        return grad_h * scale, grad_e * scale, None, None


def _sampled_softmax_loss(model, h, next_action, target, n_neg, gen) -> torch.Tensor:
    """CE over [positive, shared uniform negatives]; negatives equal to the positive are masked."""
    n_items = model.config.n_items
    neg = torch.randint(N_SPECIAL, n_items, (n_neg,), generator=gen)
    q = model.item_query(h, next_action)
    pos_logit = (q * model.item_emb(target)).sum(-1, keepdim=True)
    neg_logit = q @ model.item_emb(neg).T
    neg_logit = neg_logit.masked_fill(neg[None, :] == target[:, None], float("-inf"))
    logits = torch.cat([pos_logit, neg_logit], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(target), dtype=torch.long))


def _optimizer(model: BehaviorTransformer, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on biases, LayerNorms or embeddings)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "emb" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))


def lr_lambda(total_steps: int, cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to ``min_lr_frac`` of the peak."""
    warmup = max(1, int(cfg.warmup_frac * total_steps))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def train(
    model: BehaviorTransformer,
    seqs: EncodedSequences,
    cfg: TrainConfig,
    validate: Callable[[BehaviorTransformer], float] | None = None,
    log: Callable[[dict], None] | None = None,
) -> TrainHistory:
    """Train in place; with ``validate`` keep the best epoch's weights and stop early."""
    cfg = cfg.resolved(model.config.n_items)
    seed_everything(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    windows = make_windows(seqs, model.config.max_len)
    if len(windows.starts) == 0:
        raise InputDataError("no training examples: every user needs at least one event")
    steps_per_epoch = math.ceil(len(windows.starts) / cfg.batch_size)
    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.epochs * steps_per_epoch, cfg))
    hist, best_state, bad_epochs = TrainHistory(), None, 0
    t_start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        stats = _run_epoch(model, seqs, windows, opt, sched, cfg, rng, gen, epoch)
        if validate is not None and (epoch % cfg.validate_every == 0 or epoch == cfg.epochs):
            model.eval()
            stats["val_score"] = float(validate(model))
            if hist.best_score is None or stats["val_score"] > hist.best_score:
                hist.best_score, hist.best_epoch, bad_epochs = stats["val_score"], epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad_epochs += 1
        hist.epochs.append(stats)
        if log:
            log(stats)
        elapsed = time.perf_counter() - t_start
        if bad_epochs >= cfg.patience:
            hist.stopped_early = True
            break
        if cfg.max_time_s is not None and elapsed > cfg.max_time_s:
            hist.stopped_early = True
            break
    hist.train_time_s = time.perf_counter() - t_start
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return hist


def _run_epoch(model, seqs, windows, opt, sched, cfg, rng, gen, epoch) -> dict:
    model.train()
    t0, total_loss, total_tokens, n_batches = time.perf_counter(), 0.0, 0, 0
    n_batches_epoch = math.ceil(len(windows.starts) / cfg.batch_size)
    bar = tqdm(total=n_batches_epoch, desc=f"epoch {epoch}", disable=not cfg.progress, leave=False)
    for idx in iterate_batches(windows, cfg.batch_size, rng):
        batch = batch_from_windows(seqs, windows.starts[idx], windows.ends[idx])
        loss, n_tok = sequence_loss(model, batch, cfg, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        total_loss += loss.item() * n_tok
        total_tokens += n_tok
        n_batches += 1
        dt = time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{total_tokens / max(dt, 1e-9):,.0f}")
    bar.close()
    dt = time.perf_counter() - t0
    return {
        "epoch": epoch,
        "loss": total_loss / max(total_tokens, 1),
        "tokens": total_tokens,
        "seconds": dt,
        "tokens_per_s": total_tokens / max(dt, 1e-9),
        "lr": sched.get_last_lr()[0],
    }
