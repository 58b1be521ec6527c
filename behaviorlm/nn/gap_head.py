"""When, not only what: a head over (next action, time-gap bucket) pairs.

The language-model objective says *what* comes next; a propensity question ("will this
customer buy within 13 weeks?") is about *when*. This head reads the hidden state ``h_t`` and
gives one softmax over every pair ``(a, b)`` of a real next action ``a`` and the log2 time-gap
bucket ``b`` of the next event (the tokenizer's own buckets: what the next token's gap id says),
so ``P(next event is a purchase within x)`` is a sum over its cells -- a zero-shot propensity
score from the pretrained model, with no labels.

Training sees each event's next (action, gap) pair, and -- where the data's observation end is
known (``BehaviorLM.fit(..., observed_until=...)``) -- each user's *silence* after their last
event as a censored observation: "no event within the time to the observation end", whose
likelihood is the mass past that point (:func:`gap_nll`). Without it the head would
learn only from users who came back (on CDNOW most never do) and overstate every return.

Bucket ``b`` (ids ``FIRST_GAP..n_gaps-1``) holds gaps ``s`` with ``log2(1 + s)`` in
``[b - FIRST_GAP, b - FIRST_GAP + 1)``; the last bucket is open-ended. Inside a bucket the
probability is spread uniformly in ``log2(1 + s)`` (:func:`gap_cdf`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from behaviorlm.sequence.tokenizer import GAP_NONE, N_SPECIAL, PAD

#: the first real gap-bucket id (below it: padding and "no previous event")
FIRST_GAP = GAP_NONE + 1


class GapHead(nn.Module):
    """``log P(next action, next gap bucket | h)``: one linear layer, a joint softmax."""

    cells: torch.Tensor  # registered buffers
    span_s: torch.Tensor

    def __init__(self, dim: int, n_actions: int, n_gaps: int):
        super().__init__()
        self.n_actions, self.n_gaps = n_actions, n_gaps
        self.proj = nn.Linear(dim, n_actions * n_gaps)
        cells = torch.zeros(n_actions, n_gaps, dtype=torch.bool)
        cells[N_SPECIAL:, FIRST_GAP:] = True
        self.register_buffer("cells", cells, persistent=False)
        # the longest gap the training data could show (its observation span, seconds; set by
        # fit): past it the head's mass is unidentified -- censoring says only "later" -- so
        # :func:`within` does not count it (saved with the weights)
        self.register_buffer("span_s", torch.tensor(float("inf"), dtype=torch.float64))

    def log_joint(self, h: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., n_actions, n_gaps) log-probabilities; special cells are -inf."""
        logits = self.proj(h).view(*h.shape[:-1], self.n_actions, self.n_gaps)
        logits = logits.masked_fill(~self.cells, float("-inf"))
        flat = torch.log_softmax(logits.flatten(-2), -1)
        return flat.view_as(logits)


def gap_nll(
    log_joint: torch.Tensor, target_actions: torch.Tensor, target_gaps: torch.Tensor, censor: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood and observation count of one batch.

    ``log_joint``: (B, L, A, G); ``target_actions`` / ``target_gaps``: (B, L) the next token's
    action and gap bucket (PAD where none); ``censor``: (B, L) where the silence after a user's
    last event ends on the bucket axis (:func:`censor_positions`; PAD elsewhere): the next event,
    if any, came after it. Its likelihood is :func:`gap_cdf`'s survival at that point -- the
    mass of later buckets plus the part of its own bucket past it -- so mass a model puts
    *inside* the silence is penalised, not only mass in earlier buckets.
    """
    seen = (target_actions != PAD) & (target_gaps >= FIRST_GAP)
    cells = target_actions[seen] * log_joint.shape[-1] + target_gaps[seen]
    total = -log_joint[seen].flatten(-2).gather(1, cells[:, None]).sum()
    cut = censor >= FIRST_GAP
    if cut.any():
        lj = log_joint[cut]  # (n, A, G)
        past = survival_weights(censor[cut], lj.shape[-1]).to(lj.dtype)  # (n, G)
        total = total - torch.logsumexp((lj + past[:, None, :]).flatten(1), 1).sum()
    return total, int(seen.sum()) + int(cut.sum())


def survival_weights(position: torch.Tensor, n_gaps: int) -> torch.Tensor:
    """(n, G) log of the share of each bucket's mass that lies past ``position`` on the bucket
    axis: 0 for later buckets, log(1 - fraction) for its own (0 for the open last one), -inf
    before -- the within-bucket spread of :func:`gap_cdf`."""
    bucket, frac = bucket_fraction(position.double().clamp(max=float(n_gaps) - 1e-9), n_gaps)
    cols = torch.arange(n_gaps, device=position.device)[None, :]
    share = (cols > bucket[:, None]).double()
    share = torch.where(cols == bucket[:, None], (1.0 - frac)[:, None].clamp(min=1e-9), share)
    return share.log()


def censor_positions(seconds: np.ndarray, n_gaps: int) -> np.ndarray:
    """Where silences (seconds from a user's last event to the end of observation) end on the
    bucket axis, ``FIRST_GAP + log2(1 + s)`` capped inside the open last bucket: what
    :func:`gap_nll` reads as a censored observation."""
    return log_bucket_position(torch.from_numpy(np.asarray(seconds, np.float64)), n_gaps).numpy()


def log_bucket_position(seconds: torch.Tensor, n_gaps: int) -> torch.Tensor:
    """Where a gap falls on the bucket axis: ``FIRST_GAP + log2(1 + s)``, the integer part its
    bucket id and the fraction how far into it (the last, open bucket absorbs everything past)."""
    u = torch.log2(1.0 + seconds.clamp(min=0).double())
    return (FIRST_GAP + u).clamp(max=float(n_gaps) - 1e-9)


def bucket_fraction(position: torch.Tensor, n_gaps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A bucket-axis position as (bucket id, how far into it): the fraction is 0 in the open last
    bucket, whose mass never counts as lying before any point (:func:`gap_cdf`, :func:`gap_nll`)."""
    bucket = position.floor().long()
    return bucket, (position - bucket).where(bucket < n_gaps - 1, torch.zeros_like(position))


def gap_cdf(p_gaps: torch.Tensor, seconds: torch.Tensor) -> torch.Tensor:
    """``P(gap <= seconds)`` per row from bucket probabilities ``p_gaps`` (B, G) -- mass spread
    uniformly in ``log2(1 + s)`` inside a bucket; the open last bucket counts only as far as a
    gap provably lies in it (its lower edge), i.e. its mass counts as *beyond* any horizon."""
    n_gaps = p_gaps.shape[-1]
    bucket, frac = bucket_fraction(log_bucket_position(seconds, n_gaps), n_gaps)
    below = torch.arange(n_gaps, device=p_gaps.device)[None, :] < bucket[:, None]
    p = p_gaps.double()
    return (p * below).sum(1) + p.gather(1, bucket[:, None]).squeeze(1) * frac


def within(
    log_joint: torch.Tensor,
    action: int | None,
    elapsed_s: torch.Tensor,
    horizon_s: float,
    span_s: float = float("inf"),
) -> torch.Tensor:
    """``P(the next event is `action` (any, with None) within horizon_s after now | nothing
    happened in the elapsed_s since the last event)``, (B,) from ``log_joint`` (B, A, G).

    The survival form: ``(F_a(elapsed + h) - F_a(elapsed)) / (1 - F(elapsed))`` with ``F_a``
    the gap CDF of events of action ``a`` and ``F`` that of any event (the silence so far rules
    out every action's earlier events). The window is cut at ``span_s``, the longest gap the
    training data could show: beyond it the head only knows "later" (a censored silence), and
    counting the mass it parks there would call the longest-silent customers likely returners."""
    p = log_joint.exp().double()
    p_any = p.sum(1)
    p_act = p_any if action is None else p[:, action]
    elapsed = elapsed_s.double()
    stop = (elapsed + horizon_s).clamp(max=span_s)
    start, end = gap_cdf(p_act, elapsed.clamp(max=span_s)), gap_cdf(p_act, stop)
    alive = (1.0 - gap_cdf(p_any, elapsed)).clamp(min=1e-12)
    return ((end - start) / alive).clamp(0.0, 1.0)
