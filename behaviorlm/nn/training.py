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
* **One data source** (:class:`~behaviorlm.sequence.corpus.Corpus`) for sequences in memory and
  memory-mapped shards, in a canonical user order: the same seed gives the same batches either way.
* **On the device asked for** (:mod:`behaviorlm.nn.device`): the model moves there for the run
  and back to the CPU at the end (the weights a model saves and fine-tunes); batches are built on
  the CPU and cross pinned; on CUDA the transformer runs under bf16 autocast and the losses in fp32.
* **Resumable and data-parallel**: :mod:`behaviorlm.nn.checkpoint` restores every RNG and the
  position in the epoch; under DDP (:mod:`behaviorlm.nn.distributed`) each rank takes its share
  of the same global batch and losses are divided by global token counts, so N processes follow
  the one-process loss curve.
"""

from __future__ import annotations

import copy
import math
import os
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from behaviorlm.errors import ConfigurationError, InputDataError
from behaviorlm.nn import checkpoint, device, distributed
from behaviorlm.nn.checkpoint import Checkpointing
from behaviorlm.nn.copy_head import COPY_FLOOR, COPY_LR_MULT, gate_logps
from behaviorlm.nn.gap_head import FIRST_GAP, gap_nll
from behaviorlm.nn.model import BehaviorTransformer
from behaviorlm.nn.optim import SPARSE_MODES, Optimizers, clip_grad_norm_, use_sparse_items
from behaviorlm.recipes import BASE_PARAMS
from behaviorlm.sequence.corpus import Corpus
from behaviorlm.sequence.tokenizer import N_SPECIAL, PAD, UNK, EncodedSequences


@dataclass
class TrainConfig:
    # the defaults are the recipes' base parameters: one source (behaviorlm.recipes)
    epochs: int = BASE_PARAMS["epochs"]
    batch_size: int = BASE_PARAMS["batch_size"]
    lr: float = BASE_PARAMS["lr"]
    weight_decay: float = BASE_PARAMS["weight_decay"]
    warmup_frac: float = BASE_PARAMS["warmup_frac"]
    min_lr_frac: float = BASE_PARAMS["min_lr_frac"]
    grad_clip: float = BASE_PARAMS["grad_clip"]
    loss: str = BASE_PARAMS["loss"]  # "full" | "sampled" | "auto" (full up to AUTO_FULL_MAX_ITEMS items, else sampled)
    n_negatives: int = BASE_PARAMS["n_negatives"]
    action_loss_weight: float = BASE_PARAMS["action_loss_weight"]
    gap_loss_weight: float = BASE_PARAMS["gap_loss_weight"]  # the gap head's term (nn.gap_head), when it has one
    patience: int = BASE_PARAMS["patience"]  # epochs without validation improvement before stopping
    validate_every: int = BASE_PARAMS["validate_every"]
    seed: int = BASE_PARAMS["seed"]
    progress: bool = BASE_PARAMS["progress"]
    max_time_s: float | None = BASE_PARAMS["max_time_s"]  # stop (keeping the best) once training exceeds this
    max_steps: int | None = BASE_PARAMS["max_steps"]  # stop after this many optimizer steps (benchmarks, resumable)
    # row-sparse item-table updates (nn.optim): auto = with the sampled loss, off under NCCL
    sparse_embeddings: str = BASE_PARAMS["sparse_embeddings"]
    # where the steps run (nn.device): auto = a GPU when present; bf16 autocast there, fp32 on the CPU
    device: str = BASE_PARAMS["device"]

    def __post_init__(self) -> None:
        if self.loss not in ("full", "sampled", "auto"):
            raise ConfigurationError(f"loss must be 'full', 'sampled' or 'auto', got {self.loss!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigurationError("epochs and batch_size must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigurationError("max_steps must be >= 1 (or None)")
        device.check_name(self.device)
        if self.sparse_embeddings not in SPARSE_MODES:
            raise ConfigurationError(
                f"sparse_embeddings must be one of {list(SPARSE_MODES)}, got {self.sparse_embeddings!r}",
                cli_hint=f"--sparse-embeddings must be one of {list(SPARSE_MODES)}",
            )

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
    processes: int = 1
    allreduce_bytes_per_step: float | None = None  # what DDP sent per step and rank (None: one process)
    sparse_embeddings: bool = False  # whether the item table trained row-sparse (nn.optim)
    rss_start_mb: float | None = None  # resident memory when training began (data and model built)
    rss_first_step_mb: float | None = None  # ... after the first step (gradients, optimizer state)


@dataclass
class Windows:
    """Training examples: inputs are tokens[s:e], targets are tokens[s+1:e+1] (global positions).

    ``censor``: per window, where the silence after the user's last event ends on the gap head's
    bucket axis when the window ends with that event as an input (a censored "when"), else PAD."""

    starts: np.ndarray
    ends: np.ndarray
    censor: np.ndarray | None = None


def make_windows(corpus: Corpus, max_len: int, censor: np.ndarray | None = None) -> Windows:
    """Cut each user's span (BOS + events) into windows of <= max_len inputs, newest first.

    Vectorised over users (3M users take well under a second); windows are listed in the
    corpus's canonical user order, so the batches do not depend on how the data is stored.
    ``censor`` (per user, canonical order: where the time from their last event to the
    observation end falls on the gap-bucket axis, PAD where unknown) makes a user's last event
    an input too, whose only target is that censored silence.
    """
    lo, hi = corpus.starts, corpus.ends - 1  # the last token has no target ...
    if censor is not None:
        hi = hi + (censor >= FIRST_GAP)  # ... but a censored silence after it
    n = np.maximum(0, -(-(hi - lo) // max_len))
    user = np.repeat(np.arange(len(lo)), n)
    k = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    ends = hi[user] - k * max_len
    starts = np.maximum(lo[user], ends - max_len).astype(np.int64)
    per_window = None
    if censor is not None:
        per_window = np.where((k == 0) & (censor[user] >= FIRST_GAP), censor[user], PAD).astype(np.float64)
    return Windows(starts, ends.astype(np.int64), per_window)


def batch_from_windows(
    corpus: Corpus, starts: np.ndarray, ends: np.ndarray, censor: np.ndarray | None = None
) -> dict[str, torch.Tensor]:
    """Right-padded input/target tensors for a set of windows (``censor``: :class:`Windows`'s)."""
    lens = ends - starts
    n, width = len(lens), int(lens.max())
    idx = starts[:, None] + np.arange(width)[None, :]
    valid = np.arange(width)[None, :] < lens[:, None]
    idx = np.where(valid, idx, 0)
    tgt_idx = np.where(valid, np.minimum(idx + 1, corpus.n_tokens - 1), 0)
    tgt_valid = valid.copy()
    censored = np.zeros((n, width), np.float64)
    if censor is not None:  # the last input of a censored window has no next token
        rows = np.flatnonzero(censor >= FIRST_GAP)
        tgt_valid[rows, lens[rows] - 1] = False
        censored[rows, lens[rows] - 1] = censor[rows]

    def take(name: str, ix: np.ndarray, where: np.ndarray = valid) -> torch.Tensor:
        return torch.from_numpy(np.where(where, corpus.take(name, ix), PAD))

    batch = {
        "items": take("items", idx),
        "actions": take("actions", idx),
        "gaps": take("gaps", idx),
        "target_items": take("items", tgt_idx, tgt_valid),
        "target_actions": take("actions", tgt_idx, tgt_valid),
        "target_gaps": take("gaps", tgt_idx, tgt_valid),
        "censor": torch.from_numpy(censored),
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


class SequenceLoss(nn.Module):
    """The training objective as a module (so DDP can wrap it): summed next-item CE (given the
    true next action) and summed next-action CE, with their target counts.

    Sums, not means: the caller divides by the *global* counts, which makes 1 and N processes
    compute the same gradient. Padding (and UNK item targets) are ignored.
    """

    def __init__(self, model: BehaviorTransformer, cfg: TrainConfig, gen: torch.Generator | None = None):
        super().__init__()
        self.model, self.cfg, self.gen = model, cfg, gen

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        model, cfg = self.model, self.cfg
        with device.autocast(batch["items"].device):  # bf16 on CUDA; the losses below run in fp32
            h = model(batch["items"], batch["actions"], batch["gaps"])
        h = h.float()
        tgt_i, tgt_a = batch["target_items"], batch["target_actions"]
        mask = tgt_i != PAD
        n_item = int(mask.sum())
        if model.copy_head is not None:
            item_sum = -_mixture_target_logp(model, h, batch, mask, cfg, self.gen).sum()
        elif cfg.loss == "full":
            q = model.item_query(h[mask], tgt_a[mask])
            item_sum = FusedLinearCrossEntropy.apply(q, model.item_matrix(), tgt_i[mask], 2048) * max(n_item, 1)
        else:
            item_sum = _sampled_softmax_loss(model, h[mask], tgt_a[mask], tgt_i[mask], cfg.n_negatives, self.gen)
        a_logits = model.action_logits(h)
        action_sum = F.cross_entropy(
            a_logits.reshape(-1, a_logits.shape[-1]), tgt_a.reshape(-1), ignore_index=PAD, reduction="sum"
        )
        gap_sum, n_gap = h.new_zeros(()), 0
        if model.gap_head is not None and "target_gaps" in batch:
            tgt_g = batch["target_gaps"] % model.config.n_gaps  # values packed above the gap id dropped
            gap_sum, n_gap = gap_nll(model.gap_head.log_joint(h), tgt_a, tgt_g, batch["censor"])
        counts = torch.tensor([n_item, int((tgt_a != PAD).sum()), n_gap], dtype=torch.float64, device=h.device)
        return torch.stack([item_sum, action_sum, gap_sum]), counts


def sequence_loss(
    model: BehaviorTransformer, batch: dict[str, torch.Tensor], cfg: TrainConfig, gen: torch.Generator | None = None
) -> tuple[torch.Tensor, int]:
    """Mean next-item CE + ``action_loss_weight`` x mean next-action CE on one batch, and the
    number of item target tokens (the one-process objective)."""
    sums, counts = SequenceLoss(model, cfg, gen)(batch)
    return objective(sums, counts, cfg), int(counts[0])


def objective(sums: torch.Tensor, counts: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Item CE, action CE and gap-head NLL sums -> mean next-item CE + weighted means of the
    other two, the means taken over ``counts`` (the batch's own, or the global ones under DDP)."""
    n_item, n_action, n_gap = (max(float(c), 1.0) for c in counts)
    return sums[0] / n_item + cfg.action_loss_weight * sums[1] / n_action + cfg.gap_loss_weight * sums[2] / n_gap


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
            p[torch.arange(len(tc), device=tc.device), tc] -= 1.0
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


class FusedTargetLogProb(torch.autograd.Function):
    """Per-row ``log softmax(h @ E.T)[target]`` in row chunks, for losses that weight rows
    unequally (the copy mixture). Like :class:`FusedLinearCrossEntropy` nothing of size
    tokens x catalog is kept: the forward keeps each row's log-normaliser and the backward
    recomputes its chunk's logits (twice the matmuls, flat memory). Specials excluded."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, emb: torch.Tensor, target: torch.Tensor, chunk: int) -> torch.Tensor:
        out, lse = h.new_empty(len(target)), h.new_empty(len(target))
        for s in range(0, len(target), chunk):
            logits = _chunk_logits(h[s : s + chunk], emb)
            lse[s : s + chunk] = torch.logsumexp(logits, 1)
            out[s : s + chunk] = logits.gather(1, target[s : s + chunk, None]).squeeze(1) - lse[s : s + chunk]
        ctx.save_for_backward(h, emb, target, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        h, emb, target, lse = ctx.saved_tensors
        grad_h, grad_e = torch.empty_like(h), torch.zeros_like(emb)
        for s in range(0, len(target), ctx.chunk):
            hc, tc = h[s : s + ctx.chunk], target[s : s + ctx.chunk]
            p = (_chunk_logits(hc, emb) - lse[s : s + ctx.chunk, None]).exp_().neg_()
            p[torch.arange(len(tc), device=tc.device), tc] += 1.0  # d log p_target / d logits = onehot - p
            p.mul_(grad_out[s : s + ctx.chunk, None])
            grad_h[s : s + ctx.chunk] = p @ emb
            grad_e.addmm_(p.T, hc)
        return grad_h, grad_e, None, None


def _chunk_logits(hc: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    logits = hc @ emb.T
    logits[:, :N_SPECIAL] = float("-inf")
    return logits


def _mixture_target_logp(
    model: BehaviorTransformer,
    h: torch.Tensor,
    batch: dict[str, torch.Tensor],
    mask: torch.Tensor,
    cfg: TrainConfig,
    gen: torch.Generator | None,
) -> torch.Tensor:
    """``log(g P_copy + (1-g) P_gen)`` of every item target (the ``mask``ed positions), for a
    repeat-aware model (:mod:`behaviorlm.nn.copy_head`). The catalog part is the full softmax,
    or the sampled one with its log-normaliser corrected for the sampling rate (logQ), so that
    the gate weighs two comparable probabilities rather than an inflated sampled one."""
    assert model.copy_head is not None
    tgt_i, tgt_a = batch["target_items"], batch["target_actions"]
    q = model.item_query(h[mask], tgt_a[mask])
    if cfg.loss == "full":
        gen_lp = FusedTargetLogProb.apply(q, model.item_matrix(), tgt_i[mask], 2048)
    else:
        gen_lp = -_sampled_softmax_ce(model, q, tgt_i[mask], cfg.n_negatives, gen, corrected=True)
    items = batch["items"]
    log_alpha = model.copy_log_alpha(h, items, batch["actions"])  # (B, T, L)
    same = items[:, None, :] == tgt_i[:, :, None]
    # probabilities, not a logsumexp over -inf rows (NaN gradients); log(0) clamps to a tiny floor
    copy_p = (log_alpha.exp() * same).sum(-1)[mask]
    has_copy = torch.isfinite(log_alpha).any(-1)[mask]
    log_g, log_1mg = gate_logps(model.copy_head.gate_logits(q, shifted=False), has_copy)
    return torch.logaddexp(log_g + copy_p.clamp_min(COPY_FLOOR).log(), log_1mg + gen_lp)


def _sampled_softmax_ce(model, q, target, n_neg, gen, corrected: bool = False) -> torch.Tensor:
    """Per-row CE over [positive, shared uniform negatives]; negatives equal to the positive
    are masked. ``corrected`` scales the negatives to the catalog (+ log((V-1)/n)), making
    ``-CE`` an estimate of the full-softmax log-probability rather than an inflated one."""
    n_items = model.config.n_items
    # drawn by the CPU generator, then moved: the same negatives on any device
    neg = torch.randint(N_SPECIAL, n_items, (n_neg,), generator=gen).to(q.device)
    pos_logit = (q * model.item_vectors(target)).sum(-1, keepdim=True)
    neg_logit = q @ model.item_vectors(neg).T
    if corrected:
        neg_logit = neg_logit + math.log(max(n_items - N_SPECIAL - 1, 1) / n_neg)
    neg_logit = neg_logit.masked_fill(neg[None, :] == target[:, None], float("-inf"))
    logits = torch.cat([pos_logit, neg_logit], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(target), dtype=torch.long, device=q.device), reduction="none")


def _sampled_softmax_loss(model, h, next_action, target, n_neg, gen) -> torch.Tensor:
    """Summed CE over [positive, shared uniform negatives] (the plain model's sampled loss)."""
    return _sampled_softmax_ce(model, model.item_query(h, next_action), target, n_neg, gen).sum()


def _optimizer(model: BehaviorTransformer, cfg: TrainConfig, sparse_items: bool = False) -> Optimizers:
    """AdamW; weight decay on matrices only (not on biases, LayerNorms or embeddings). With
    ``sparse_items`` the item table goes to SparseAdam instead (:mod:`behaviorlm.nn.optim`)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    fast: list[torch.nn.Parameter] = []  # the copy head's scalars (nn.copy_head.COPY_LR_MULT)
    sparse: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if sparse_items and name == "item_emb.weight":
            sparse.append(p)
        elif name.startswith(("copy_head.recency_bias", "copy_head.action_bias", "copy_head.gate", "copy_head.since")):
            fast.append(p)
        else:
            (decay if p.dim() >= 2 and "emb" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if fast:
        groups.append({"params": fast, "weight_decay": 0.0, "lr": cfg.lr * COPY_LR_MULT})
    return Optimizers(groups, sparse, cfg.lr, (0.9, 0.98))  # a group's own "lr" wins


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
    data: EncodedSequences | Corpus,
    cfg: TrainConfig,
    validate: Callable[[BehaviorTransformer], float] | None = None,
    log: Callable[[dict], None] | None = None,
    *,
    checkpoint: Checkpointing | None = None,
    on_step: Callable[[int, float], None] | None = None,
    censor: np.ndarray | None = None,
) -> TrainHistory:
    """Train in place; with ``validate`` keep the best epoch's weights and stop early.

    ``data`` is an in-memory :class:`EncodedSequences` or a :class:`Corpus` (memory-mapped
    prepared shards): the same windows, batches and losses either way. Under a distributed
    launcher (see :mod:`behaviorlm.nn.distributed`) each process trains on its share of every
    global batch. ``checkpoint`` saves every ``every_steps`` steps and at the end, and resumes
    from a checkpoint found there; ``on_step(step, loss)`` sees every step's global loss.
    ``censor``: per user (the corpus's order), where the silence from their last event to the
    end of observation falls on the gap-bucket axis -- the silence a gap head learns from (:func:`make_windows`).
    """
    corpus = data if isinstance(data, Corpus) else Corpus.from_sequences(data)
    trainer = _Trainer(model, corpus, cfg.resolved(model.config.n_items), checkpoint, censor)
    return trainer.run(validate, log, on_step)


class _Trainer:
    """One training run's moving parts; ``run`` is the loop, the rest are its steps."""

    def __init__(
        self,
        model: BehaviorTransformer,
        corpus: Corpus,
        cfg: TrainConfig,
        ckpt: Checkpointing | None,
        censor: np.ndarray | None = None,
    ):
        self.model, self.corpus, self.cfg, self.ckpt = model, corpus, cfg, ckpt
        self.dist = distributed.current()
        self.device = distributed.rank_device(cfg.device)  # under DDP on GPUs: this rank's own GPU
        if self.device.type == "cuda":  # the catalog softmax stays fp32: let it use TF32 tensor cores
            torch.set_float32_matmul_precision("high")
        model.to(self.device)
        seed_everything(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.windows = make_windows(corpus, model.config.max_len, censor if model.gap_head is not None else None)
        if len(self.windows.starts) == 0:
            raise InputDataError("no training examples: every user needs at least one event")
        self.steps_per_epoch = math.ceil(len(self.windows.starts) / cfg.batch_size)
        # row-sparse item gradients must be switched on before DDP sees the model (it buckets them apart)
        sparse = use_sparse_items(cfg.sparse_embeddings, cfg.loss, model.config.n_items, self.dist.backend)
        model.item_emb.sparse = sparse
        self.opt = _optimizer(model, cfg, sparse)
        self.sched = self.opt.schedules(lr_lambda(cfg.epochs * self.steps_per_epoch, cfg))
        self.loss = self.dist.wrap(SequenceLoss(model, cfg, self.gen))
        self.fingerprint = {
            "windows": len(self.windows.starts),
            "tokens": corpus.n_tokens,
            "n_items": model.config.n_items,
            "world": self.dist.world,
            # where it runs is not what it learns: a run may resume on another device
            "config": {
                k: v for k, v in asdict(cfg).items() if k not in ("progress", "max_steps", "max_time_s", "device")
            },
        }
        restored = checkpoint.restore(ckpt, model, self.opt, self.sched, self.gen, self.fingerprint) if ckpt else None
        self.state = restored or checkpoint.TrainState()
        self.hist = TrainHistory(**self.state.history) if self.state.history else TrainHistory()

    def run(self, validate, log, on_step) -> TrainHistory:
        self.t_start = t_start = time.perf_counter() - self.state.elapsed_s
        partial = False
        self.hist.rss_start_mb, self._steps_here = current_rss_mb(), 0
        stop = False
        while self.state.epoch <= self.cfg.epochs and not stop and not self._steps_spent():
            if not self._epoch(on_step):  # max_steps reached mid-epoch
                partial = True
                break
            stats = self._end_epoch(validate)
            self.hist.epochs.append(stats)
            if log and self.dist.is_main:
                log(stats)
            stop = self.state.bad_epochs >= self.cfg.patience or self._out_of_time(t_start)
            self.hist.stopped_early = stop
            self.state.epoch += 1
        self.hist.train_time_s = self.state.elapsed_s = time.perf_counter() - t_start
        self.hist.processes = self.dist.world
        if self.dist.active and self.state.step:
            self.hist.allreduce_bytes_per_step = self.dist.counter.bytes / max(1, self._steps_here)
        self._save()
        if partial:  # reported, not checkpointed: a resumed run completes this epoch itself
            self.hist.epochs.append({**self._epoch_stats(), "partial": True})
        if self.state.best_state is not None:
            self.model.load_state_dict(self.state.best_state)
        self.model.item_emb.sparse = False  # a training-time switch: inference and later stages read the table densely
        self.model.to("cpu")  # inference chooses its own device (BehaviorLM.use_device); weights are saved from here
        self.hist.sparse_embeddings = self.opt.sparse
        self.model.eval()
        return self.hist

    def _steps_spent(self) -> bool:
        return self.cfg.max_steps is not None and self.state.step >= self.cfg.max_steps

    def _epoch(self, on_step) -> bool:
        """Run the rest of the epoch in progress; False when ``max_steps`` stopped it mid-way."""
        st, cfg = self.state, self.cfg
        if st.epoch_rng is None:
            st.epoch_rng = dict(copy.deepcopy(self.rng.bit_generator.state))
        else:  # a resumed (or continued) epoch draws its batch order again from the saved state
            self.rng.bit_generator.state = copy.deepcopy(st.epoch_rng)
        batches = list(iterate_batches(self.windows, cfg.batch_size, self.rng))
        self.model.train()
        bar = tqdm(total=len(batches), initial=st.batch, desc=f"epoch {st.epoch}", disable=not cfg.progress)
        t0 = time.perf_counter()
        for idx in batches[st.batch :]:
            loss, n_tok = self._step(idx)
            st.batch, st.step, self._steps_here = st.batch + 1, st.step + 1, self._steps_here + 1
            if self._steps_here == 1:
                self.hist.rss_first_step_mb = current_rss_mb()
            st.epoch_loss, st.epoch_tokens = st.epoch_loss + loss * n_tok, st.epoch_tokens + n_tok
            if on_step is not None:
                on_step(st.step, loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if self.ckpt and st.step % self.ckpt.every_steps == 0:
                st.epoch_seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                self._save()
            if self._steps_spent():
                break
        st.epoch_seconds += time.perf_counter() - t0
        bar.close()
        return st.batch == len(batches)

    def _step(self, idx: np.ndarray) -> tuple[float, int]:
        """One optimizer step on a global batch; returns its global loss and item-token count."""
        mine = self.dist.share(idx)
        empty = len(mine) == 0  # a tiny last batch can leave a rank without windows
        sel = idx[:1] if empty else mine
        censor = None if self.windows.censor is None else self.windows.censor[sel]
        batch = batch_from_windows(self.corpus, self.windows.starts[sel], self.windows.ends[sel], censor)
        if empty:
            for key in ("target_items", "target_actions", "target_gaps", "censor"):
                batch[key].fill_(PAD)
        batch = device.to_device(batch, self.device)
        sums, counts = self.loss(batch)
        totals = self.dist.all_reduce_sum(torch.cat([sums.detach().double(), counts]))
        n = len(sums)
        loss = objective(sums, totals[n:], self.cfg) * self.dist.world  # DDP averages gradients over ranks
        self.opt.zero_grad()
        loss.backward()
        if self.cfg.grad_clip:
            clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        return float(objective(totals[:n], totals[n:], self.cfg)), int(totals[n])

    def _epoch_stats(self) -> dict:
        st = self.state
        return {
            "epoch": st.epoch,
            "loss": st.epoch_loss / max(st.epoch_tokens, 1),
            "tokens": st.epoch_tokens,
            "seconds": st.epoch_seconds,
            "tokens_per_s": st.epoch_tokens / max(st.epoch_seconds, 1e-9),
            "lr": self.sched.get_last_lr()[0],
            "peak_rss_mb": peak_rss_mb(),
        }

    def _end_epoch(self, validate) -> dict:
        st = self.state
        stats = self._epoch_stats()
        if validate is not None and (st.epoch % self.cfg.validate_every == 0 or st.epoch == self.cfg.epochs):
            self.model.eval()
            score = self.dist.broadcast(float(validate(self.model)) if self.dist.is_main else None)
            stats["val_score"] = score
            if self.hist.best_score is None or score > self.hist.best_score:
                self.hist.best_score, self.hist.best_epoch, st.bad_epochs = score, st.epoch, 0
                st.best_state = copy.deepcopy(self.model.state_dict())
            else:
                st.bad_epochs += 1
        st.batch, st.epoch_rng, st.epoch_loss, st.epoch_tokens, st.epoch_seconds = 0, None, 0.0, 0, 0.0
        return stats

    def _out_of_time(self, t_start: float) -> bool:
        limit = self.cfg.max_time_s
        return limit is not None and time.perf_counter() - t_start > limit

    def _save(self) -> None:
        """Checkpoint (rank 0 writes; every rank waits, so none runs ahead of a file being written)."""
        if self.ckpt is None:
            return
        if self.dist.is_main:
            self.state.elapsed_s = time.perf_counter() - self.t_start
            self.state.history = asdict(self.hist)
            checkpoint.save(self.ckpt, self.state, self.model, self.opt, self.sched, self.gen, self.fingerprint)
        self.dist.barrier()


def current_rss_mb() -> float | None:
    """This process's resident memory now (Linux ``/proc``; None elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
