"""The repeat-aware output: a pointer over the user's own context mixed with the catalog softmax.

Why: on multi-action clickstreams a third to two thirds of next events touch an item the user
already touched, and most of those items are seen once or twice in training, so their
embeddings are barely trained and the catalog softmax cannot rank them. "Show the user what
they touched most recently" beats a plain transformer there by 1.4-2.2x. A copy distribution
over the context positions (RepeatNet's repeat mode, Ren et al. AAAI 2019; a pointer-generator
mixture) ranks such an item from its *place in the history* -- how recently, with which action,
how often -- rather than from its embedding, and a learned gate decides how much mass goes to
repeating versus exploring:

    P(i | <=t, a) = g_a(h_t) * P_copy(i | <=t) + (1 - g_a(h_t)) * P_gen(i | <=t, a)

* ``P_copy(i) = sum_{j <= t, item_j = i} alpha_tj``: attention of the query ``h_t`` over the
  context events' *input* vectors (item + action), plus a learned bias per recency bucket
  (``t - j`` in events) and per context action. Repeats of an item add up, so frequency
  is counted as well as recency.
* ``g_a``: a sigmoid of ``h_t + e_a`` (the next-action query), so a purchase query can lean
  on the cart while a view query explores.
* Positions that cannot be copied (BOS, pad, ``[UNK]``) get no copy mass; where none is left
  the gate is closed, so the mixture is a proper distribution at every position.

At inference the engine carries the copy part beside the hidden state in one *state* tensor
(:class:`CopyState`: ``[h | log alpha over max_len positions | their vocabulary ids]``), so
every consumer -- top-k, ANN retrieval (the context items are added to its candidates), ONNX,
the API's cache of known users, decoding -- passes it along without knowing the layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from behaviorlm.sequence.tokenizer import N_SPECIAL, UNK

#: recency buckets of the distance ``t - j`` in events: exact up to 7, then half-octaves
N_RECENCY = 16
#: vocabulary ids ride in a float32 tensor: exact below 2**24
MAX_COPY_ITEMS = 2**24
#: copy probability floor where a log's gradient would be taken at 0 (see copy_logp_columns)
COPY_FLOOR = 1e-30


def recency_bucket(distance: torch.Tensor) -> torch.Tensor:
    """Distance in events (>= 0) -> bucket id in ``[0, N_RECENCY)``."""
    d = distance.clamp(min=0).float()
    far = 8 + torch.floor(2 * torch.log2((d + 1) / 8).clamp(min=0)).long()
    return torch.where(d < 8, d.long(), far).clamp(max=N_RECENCY - 1)


def recency_prior(half_life: float = 8.0) -> torch.Tensor:
    """Initial recency bias: a copy weight halving every ``half_life`` events, what a
    "recently viewed" rule assumes; training moves it (at :data:`COPY_LR_MULT` x the rate)."""
    b = torch.arange(N_RECENCY, dtype=torch.float32)
    distance = torch.where(b < 8, b, 8 * torch.pow(2.0, (b - 8) / 2))
    return -distance * math.log(2.0) / half_life


#: learning-rate multiplier of the copy head's few scalars (recency and action biases, gate): at
#: the base rate Adam moves each by at most ``lr`` per step, too slow for a few hundred steps
COPY_LR_MULT = 10.0


def copyable(items: torch.Tensor) -> torch.Tensor:
    """Positions whose item can be copied: real vocabulary items, and ``[UNK]`` -- an item the
    vocabulary lacks (new since training, or rare), which the engine re-identifies by its
    original id so that the copy part can return it (:meth:`CopyState.with_new_items`)."""
    return (items >= N_SPECIAL) | (items == UNK)


class CopyHead(nn.Module):
    """Copy attention over context positions and the repeat/explore gate."""

    def __init__(self, dim: int, n_actions: int, since: bool = False):
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        # vectors, not embeddings: no weight decay pulls them to 0, and they start from a prior
        self.recency_bias = nn.Parameter(recency_prior())
        self.action_bias = nn.Parameter(torch.zeros(n_actions))
        self.gate = nn.Linear(dim, 1)
        # "touched again since": a bias per action for a position whose item the user touched again
        # later (before the query) with that action -- a cart later bought, a view later carted;
        # what the "in your cart" rule knows and attention over item + action vectors cannot see
        self.since_bias = nn.Parameter(torch.zeros(n_actions)) if since else None
        self.scale = 1.0 / math.sqrt(dim)
        # added to the gate logit; 0 in training, fitted on validation afterwards (calibrate_gate)
        self.gate_shift: torch.Tensor
        self.register_buffer("gate_shift", torch.zeros(()))

    @torch.no_grad()
    def warm_start(self, half_life: float, action_weights: torch.Tensor) -> None:
        """Start the copy distribution at the "buy again" rule ``sum_e w[action_e] *
        0.5 ** (age_e / half_life)`` (``action_weights`` indexed by action id): with the
        attention term near zero at initialisation, the copy part then *is* that rule fitted
        on the training events, and training starts from the baseline instead of a guess."""
        self.recency_bias.copy_(recency_prior(half_life))
        self.action_bias.copy_(action_weights.to(self.action_bias.dtype).clamp_min(1e-6).log())

    def position_logits(
        self, h: torch.Tensor, context: torch.Tensor, items: torch.Tensor, actions: torch.Tensor
    ) -> torch.Tensor:
        """Copy log-weights (log alpha) of every query over every context position, causal.

        ``h``: (B, T, d) queries at positions ``0..T-1``; ``context``: (B, L, d) the context
        events' input vectors; ``items``/``actions``: (B, L). Returns (B, T, L) log-softmax
        over positions ``j <= t`` that can be copied; -inf elsewhere (a row with none is all -inf).
        """
        t_pos = torch.arange(h.shape[1], device=h.device)
        return self._log_alpha(h, context, items, actions, t_pos)

    def position_logits_at(
        self,
        h: torch.Tensor,
        context: torch.Tensor,
        items: torch.Tensor,
        actions: torch.Tensor,
        last: torch.Tensor,
    ) -> torch.Tensor:
        """:meth:`position_logits` for one query per row, at position ``last``: (B, L)."""
        return self._log_alpha(h[:, None, :], context, items, actions, last[:, None]).squeeze(1)

    def _log_alpha(self, h, context, items, actions, t_pos) -> torch.Tensor:
        scores = torch.einsum("btd,bld->btl", self.query(h), self.key(context)) * self.scale
        j = torch.arange(items.shape[1], device=items.device)
        dist = (t_pos[..., :, None] - j).expand(scores.shape)  # (B, T, L)
        scores = scores + self.recency_bias[recency_bucket(dist)]
        scores = scores + self.action_bias[actions][:, None, :]
        if self.since_bias is not None:
            scores = scores + self.touched_since(items, actions, t_pos)
        ok = (dist >= 0) & copyable(items)[:, None, :]
        scores = scores.masked_fill(~ok, float("-inf"))
        # rows without a copyable position: a softmax of all -inf is NaN; keep them -inf instead
        any_ok = ok.any(-1, keepdim=True)
        return torch.where(any_ok, torch.log_softmax(scores.masked_fill(~any_ok, 0.0), -1), scores)

    def touched_since(self, items: torch.Tensor, actions: torch.Tensor, t_pos: torch.Tensor) -> torch.Tensor:
        """``sum_a since_bias[a] * [item_j touched again with action a at some k, j < k <= t]``
        for every query position ``t`` and context position ``j``: (B, T, L). Causal: only events
        up to the query count. Specials and ``[UNK]`` (different items under one id) never match."""
        bias = self.since_bias
        assert bias is not None, "a copy head built with since=True"
        n = items.shape[1]
        pos = torch.arange(n, device=items.device)
        real = items >= N_SPECIAL
        again = (items[:, :, None] == items[:, None, :]) & (pos[:, None] < pos[None, :]) & real[:, :, None]  # (B, j, k)
        by_action = nn.functional.one_hot(actions, bias.shape[0]).bool()  # (B, k, A)
        hit = again[..., None] & by_action[:, None, :, :]  # (B, j, k, A)
        first = torch.where(hit, pos[None, None, :, None], n).amin(2)  # (B, j, A): first k, or n for none
        seen = first[:, None, :, :] <= t_pos[..., :, None, None]  # (B, T, j, A)
        return (seen.to(bias.dtype) * bias).sum(-1)

    def gate_logits(self, query: torch.Tensor, shifted: bool = True) -> torch.Tensor:
        """Logit of the copy gate for next-action queries ``h + e_a`` (..., d) -> (...); the
        training loss asks for it without the validation-fitted shift (``shifted=False``)."""
        logit = self.gate(query).squeeze(-1)
        return logit + self.gate_shift if shifted else logit


#: gate shifts tried on validation, in logits: 0 keeps the trained gate, larger ones trust the copy more
GATE_SHIFTS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0)
#: the coarser grid tried at every validation during training (so early stopping compares epochs
#: at their best gate, not at a gate the memorising catalog softmax has pulled away)
GATE_SHIFTS_COARSE = (0.0, 2.0, 8.0)


def calibrate_gate(
    head: CopyHead, score: Callable[[], float], shifts: tuple[float, ...] = GATE_SHIFTS
) -> tuple[float, float]:
    """Fit :attr:`CopyHead.gate_shift` on held-out users; returns (shift kept, its score).

    Why: the gate is trained on the training sequences, where the catalog softmax has
    memorised what came next; on a sparse catalog (Taobao: 55k items, 814 users) it is far
    less sure on new users than on those sequences, so the trained gate trusts it too much and
    its confident guesses push the user's own items out of the top-k. One scalar, chosen by
    the validation metric ``score()`` (higher is better), corrects that without touching the
    test users; ties keep the smaller shift.
    """
    results = {}
    buffer = head.gate_shift
    for shift in shifts:
        buffer.fill_(shift)
        results[shift] = score()
    best = max(results, key=lambda s: (results[s], -s))
    buffer.fill_(best)
    return best, results[best]


def gate_logps(gate_logit: torch.Tensor, has_copy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log g, log(1 - g)); closed (g = 0) where nothing can be copied."""
    log_g = nn.functional.logsigmoid(gate_logit)
    log_1mg = nn.functional.logsigmoid(-gate_logit)
    return log_g.masked_fill(~has_copy, float("-inf")), log_1mg.masked_fill(~has_copy, 0.0)


def mix(gen_logp: torch.Tensor, copy_logp: torch.Tensor, log_g: torch.Tensor, log_1mg: torch.Tensor) -> torch.Tensor:
    """``log(g * P_copy + (1 - g) * P_gen)``; gate terms broadcast over the last dimension."""
    return torch.logaddexp(log_g[..., None] + copy_logp, log_1mg[..., None] + gen_logp)


@dataclass(frozen=True)
class CopyState:
    """Layout of the inference state ``[h (dim) | log alpha (L) | vocabulary ids (L)]``.

    One tensor, so engines, caches and exported graphs carry it unchanged; ids are exact in
    float32 below :data:`MAX_COPY_ITEMS`.
    """

    dim: int
    max_len: int

    @property
    def width(self) -> int:
        return self.dim + 2 * self.max_len

    def pack(self, h: torch.Tensor, log_alpha: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(B, d), (B, L'), (B, L') with L' <= max_len -> (B, width); slots that cannot be copied
        (past the scoring position, specials, padding) are -inf / PAD, so the state depends on
        nothing after the scoring position."""
        items = items.masked_fill(~torch.isfinite(log_alpha), 0)
        pad = self.max_len - log_alpha.shape[1]
        log_alpha = nn.functional.pad(log_alpha, (0, pad), value=float("-inf"))
        items = nn.functional.pad(items, (0, pad), value=0)
        return torch.cat([h, log_alpha, items.to(h.dtype)], dim=1)

    def hidden(self, state: torch.Tensor) -> torch.Tensor:
        return state[..., : self.dim]

    def log_alpha(self, state: torch.Tensor) -> torch.Tensor:
        return state[..., self.dim : self.dim + self.max_len]

    def items(self, state: torch.Tensor) -> torch.Tensor:
        return state[..., self.dim + self.max_len :].round().long()

    def has_copy(self, state: torch.Tensor) -> torch.Tensor:
        return torch.isfinite(self.log_alpha(state)).any(-1)

    def copy_logp_catalog(self, state: torch.Tensor, width: int) -> torch.Tensor:
        """``log P_copy`` over the vocabulary -- and, with ``width = n_items + max_len``, the
        row's new items at ``n_items + first position`` -- (B, width): repeated items add up.
        Mass of a new item not re-identified stays on ``[UNK]``, a special column."""
        alpha = self.log_alpha(state).exp()
        ids = self.items(state)
        alpha = alpha.masked_fill(ids >= width, 0.0)  # new items when only the vocabulary is asked for
        p = torch.zeros(len(state), width, dtype=state.dtype, device=state.device)
        return p.scatter_add_(1, ids.masked_fill(ids >= width, 0), alpha).log()

    def add_copy(self, shifted: torch.Tensor, log_g: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """``shifted = log(1-g) + log P_gen`` (B, width; modified in place) -> the mixture's log
        probability: only the row's (at most ``max_len``) context columns change, to
        ``log(g P_copy + (1-g) P_gen)`` -- repeats of an item summed over positions by an
        (L x L) comparison, not a width-sized scatter -- so the full width is touched once.
        Equal to ``mix(gen, copy_logp_catalog(...))`` (tested); ids past the width (new items
        when only the vocabulary is asked for) are dropped."""
        width = shifted.shape[-1]
        ids = self.items(state)
        alpha = self.log_alpha(state).exp().masked_fill(ids >= width, 0.0)
        ids = ids.masked_fill(ids >= width, 0)  # PAD: -inf whatever is written there
        copy_p = ((ids[:, :, None] == ids[:, None, :]) * alpha[:, None, :]).sum(-1)  # (B, L): per distinct id
        value = torch.logaddexp(log_g[:, None] + copy_p.log(), shifted.gather(1, ids))
        return shifted.scatter_(1, ids, value.masked_fill(ids == 0, float("-inf")))

    def with_new_items(self, state: torch.Tensor, first_pos: torch.Tensor, n_items: int) -> torch.Tensor:
        """The state with each ``[UNK]`` slot whose original item is known (``first_pos`` >= 0:
        the row's first position holding that item) renamed ``n_items + first_pos``."""
        ids = self.items(state)
        new = (ids == UNK) & (first_pos >= 0)
        ids = torch.where(new, n_items + first_pos, ids)
        out = state.clone()
        out[..., self.dim + self.max_len :] = ids.to(state.dtype)
        return out

    def copy_logp_columns(self, state: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``log P_copy`` of given vocabulary ids per row, (B, C) for ``cols`` (B, C). An item not
        in the context gets a floor of ``log 1e-30`` rather than ``-inf``: the log's gradient at
        0 is infinite, and times the mixture's zero weight it would be NaN for every parameter
        (the training loss floors it the same way); the mixture's value moves by < 1e-30."""
        # the row's ids sorted, each run of one id summed into its group (in position order, as
        # a direct sum would), then each column looked up by binary search: O((L + C) log L) per
        # row, not the (C x L) comparison that was a quarter of two-stage batch scoring at
        # C ~ 300 candidates (RESULTS.md section 28)
        srt, order = self.items(state).sort(dim=1, stable=True)
        alpha = self.log_alpha(state).exp().gather(1, order)
        group = torch.zeros_like(srt)
        group[:, 1:] = (srt[:, 1:] != srt[:, :-1]).cumsum(1)
        sums = torch.zeros_like(alpha).scatter_add_(1, group, alpha)
        at = torch.searchsorted(srt, cols).clamp(max=srt.shape[1] - 1)
        p = sums.gather(1, group.gather(1, at)).masked_fill(srt.gather(1, at) != cols, 0.0)
        return p.clamp_min(COPY_FLOOR).log()

    def without_new_items(self, state: torch.Tensor, n_items: int) -> torch.Tensor:
        """The state with its new items' names dropped (back to ``[UNK]``): for a ranking that
        excludes seen items, which they all are."""
        ids = self.items(state)
        out = state.clone()
        out[..., self.dim + self.max_len :] = ids.masked_fill(ids >= n_items, UNK).to(state.dtype)
        return out

    def context_items(self, state: torch.Tensor) -> torch.Tensor:
        """The copyable vocabulary ids of each row (PAD where a slot holds none), (B, L)."""
        return self.items(state)
