"""The causal transformer over action sequences, in one readable file (after nanoGPT).

Each position sums four embeddings -- item, action type, time-gap bucket, learned position --
(plus, when the tokenizer has them, one per per-event value bucket unpacked from the gap id, and
one per item side feature added to the item's own) and a stack of pre-LayerNorm blocks with
causal ``scaled_dot_product_attention`` turns it into a hidden state ``h_t`` that summarises
events ``<= t``. Two heads read it:

* ``action_logits(h)``: the next action type, ``P(a_{t+1} | <=t)``;
* ``item_logits(h, a)``: the next item given that next action, ``P(i_{t+1} | <=t, a)``. The
  query is ``h + E_act_out[a]`` and the output matrix is the *input item embedding* (tied), so
  items share one representation and the head adds only ``n_actions x dim`` parameters.

Sequences are right-padded: with causal attention no real position can see a pad, so padding
cannot change any real logit, and positions count from the first token of the window, so no
position id leaks how many events come later.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from behaviorlm.errors import ConfigurationError
from behaviorlm.nn.copy_head import MAX_COPY_ITEMS, CopyHead, CopyState, gate_logps, mix
from behaviorlm.nn.gap_head import GapHead
from behaviorlm.recipes import BASE_PARAMS
from behaviorlm.sequence.tokenizer import N_SPECIAL, PAD

#: what a prediction may know about time: the gaps between past events only, or also the gap
#: from the last event to the moment the prediction is asked for (the request time)
TIME_CONTEXTS = ("history", "request")
#: how a position knows where it is: a learned vector added to its input (SASRec), or rotary
#: embeddings (RoPE, Su et al. 2021) turning every layer's queries and keys by their position, so
#: attention reads how far apart two events are rather than where each sits in the window
POSITIONS = ("learned", "rope")
#: the feed-forward: a GELU MLP, or SwiGLU (Shazeer 2020), the gated form LLaMA-style models use
FFNS = ("gelu", "swiglu")


@dataclass
class ModelConfig:
    n_items: int  # item vocabulary size, specials included
    n_actions: int  # action vocabulary size, specials included
    n_gaps: int  # time-gap buckets, pad and "none" included
    # the defaults are the recipes' base parameters: one source (behaviorlm.recipes)
    max_len: int = BASE_PARAMS["max_len"]
    dim: int = BASE_PARAMS["dim"]
    n_layers: int = BASE_PARAMS["n_layers"]
    n_heads: int = BASE_PARAMS["n_heads"]
    ffn_mult: int = BASE_PARAMS["ffn_mult"]
    dropout: float = BASE_PARAMS["dropout"]
    # Dropout on attention weights forces SDPA's unfused math path on CPU; off by default.
    attn_dropout: float = 0.0
    value_sizes: tuple[int, ...] = ()  # per-event value buckets packed into the gap id (tokenizer)
    side_sizes: tuple[int, ...] = ()  # item side-feature vocabularies (category, brand, ...)
    # repeat-aware output: mix the catalog softmax with a copy over the context (nn.copy_head)
    copy_head: bool = BASE_PARAMS["copy_head"]
    # the copy head also sees whether each context item was touched again since, by action (nn.copy_head)
    copy_since: bool = BASE_PARAMS["copy_since"]
    # "request": each position also embeds the time from its event to the one it predicts -- at
    # serving, the request time -- so a model knows *when* it is asked (see request_vectors)
    time_context: str = BASE_PARAMS["time_context"]
    # a head over (next action, next time-gap bucket) pairs: when, not only what (nn.gap_head)
    gap_head: bool = BASE_PARAMS["gap_head"]
    positions: str = BASE_PARAMS["positions"]  # POSITIONS
    ffn: str = BASE_PARAMS["ffn"]  # FFNS

    def __post_init__(self) -> None:
        self.value_sizes, self.side_sizes = tuple(self.value_sizes), tuple(self.side_sizes)  # from JSON lists
        if self.dim % self.n_heads:
            raise ConfigurationError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        for name in ("n_items", "n_actions", "n_gaps", "max_len", "dim", "n_layers", "n_heads"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigurationError(f"dropout must be in [0, 1), got {self.dropout}")
        for name, allowed in (("positions", POSITIONS), ("ffn", FFNS)):
            if getattr(self, name) not in allowed:
                raise ConfigurationError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.positions == "rope" and (self.dim // self.n_heads) % 2:
            raise ConfigurationError(
                f"positions='rope' needs an even head width, got dim/n_heads = {self.dim // self.n_heads}"
            )
        if self.time_context not in TIME_CONTEXTS:
            raise ConfigurationError(f"time_context must be one of {TIME_CONTEXTS}, got {self.time_context!r}")
        if self.gap_head and self.time_context == "request":  # its input would be the gap head's target
            raise ConfigurationError(
                "gap_head and time_context='request' cannot be combined: in training a position's request time "
                "is its next event's time, exactly what the gap head must predict"
            )
        if self.copy_head and self.n_items >= MAX_COPY_ITEMS:
            raise ConfigurationError(
                f"copy_head supports catalogs below {MAX_COPY_ITEMS:,} items, got {self.n_items:,}"
            )


def at_positions(x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """``x[b, last[b]]`` for every row: (B, L, d) -> (B, d). A gather rather than advanced
    indexing with ``arange(B)``, so an exported graph (ONNX) keeps the batch size dynamic."""
    return x.gather(1, last[:, None, None].expand(-1, 1, x.shape[-1])).squeeze(1)


class Rotary(nn.Module):
    """Rotary position embedding (RoPE): rotates each pair of a head's channels ``(x_i,
    x_{i+d/2})`` by ``pos * base^(-2i/d)``, so that ``q_s . k_t`` depends on ``s - t`` only. The
    angles are a fixed table (not saved: rebuilt from the config)."""

    cos: torch.Tensor  # buffers
    sin: torch.Tensor

    def __init__(self, head_dim: int, max_len: int, base: float = 10_000.0):
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (L, d/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, heads, n, d) rotated by positions ``0..n-1``, or, with ``pos`` (B,) and n = 1,
        by each row's own position."""
        if pos is None:
            cos, sin = self.cos[: x.shape[2]], self.sin[: x.shape[2]]
        else:
            cos, sin = self.cos[pos][:, None, None, :], self.sin[pos][:, None, None, :]
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class SwiGLU(nn.Module):
    """``silu(a) * b`` of the two halves of the input (the gate and the value of SwiGLU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = x.chunk(2, dim=-1)
        return F.silu(gate) * value


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.attn_dropout = cfg.attn_dropout
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.rotary = Rotary(cfg.dim // cfg.n_heads, cfg.max_len) if cfg.positions == "rope" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (t.view(b, n, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.attn_dropout if self.training else 0.0
        )
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, n, d)))

    def forward_at(self, x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Attention output for one query per row (position ``last``) over keys ``<= last``."""
        b, n, d = x.shape
        x_last = at_positions(x, last)
        if isinstance(self.qkv, nn.Linear):  # keys/values everywhere, the query at `last` only
            w, bias = self.qkv.weight, self.qkv.bias
            q = F.linear(x_last, w[:d], bias[:d])[:, None]  # (b, 1, d)
            k, v = F.linear(x, w[d:], bias[d:]).split(d, dim=2)
        else:  # a quantised Linear cannot be sliced
            q, k, v = self.qkv(x).split(d, dim=2)
            q = at_positions(q, last)[:, None]
        heads = lambda t: t.view(b, t.shape[1], self.n_heads, d // self.n_heads).transpose(1, 2)  # noqa: E731
        q, k, v = heads(q), heads(k), heads(v)
        if self.rotary is not None:
            q, k = self.rotary(q, last), self.rotary(k)
        visible = (torch.arange(n, device=x.device)[None, :] <= last[:, None])[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        return self.proj(y.transpose(1, 2).reshape(b, d))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.dim)
        hidden, swiglu = cfg.ffn_mult * cfg.dim, cfg.ffn == "swiglu"
        # the same module names either way (mlp.0 in, mlp.2 out: what LoRA adapts); SwiGLU's
        # first layer computes gate and value at once
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, 2 * hidden if swiglu else hidden),
            SwiGLU() if swiglu else nn.GELU(),
            nn.Linear(hidden, cfg.dim),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))

    def forward_at(self, x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The block's output at position ``last`` of each row only: (b, dim)."""
        y = at_positions(x, last) + self.attn.forward_at(self.ln1(x), last)
        return y + self.mlp(self.ln2(y))


class BehaviorTransformer(nn.Module):
    """Decoder-only transformer with a next-action head and a tied, action-conditioned item head."""

    item_sides: torch.Tensor  # a registered buffer

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.item_emb = nn.Embedding(cfg.n_items, cfg.dim, padding_idx=PAD)
        self.action_emb = nn.Embedding(cfg.n_actions, cfg.dim, padding_idx=PAD)
        self.gap_emb = nn.Embedding(cfg.n_gaps, cfg.dim, padding_idx=PAD)
        self.request_emb = nn.Embedding(cfg.n_gaps, cfg.dim, padding_idx=PAD) if cfg.time_context == "request" else None
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.dim) if cfg.positions == "learned" else None
        self.value_embs = nn.ModuleList(nn.Embedding(n, cfg.dim, padding_idx=0) for n in cfg.value_sizes)
        self.side_embs = nn.ModuleList(nn.Embedding(n, cfg.dim, padding_idx=0) for n in cfg.side_sizes)
        # each item's side-feature ids (n_items, n_sides): vocabulary, saved in the state dict
        self.register_buffer("item_sides", torch.zeros(cfg.n_items, len(cfg.side_sizes), dtype=torch.long))
        self._matrix_cache: torch.Tensor | None = None
        self._padded_cache: torch.Tensor | None = None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.dim)
        self.action_head = nn.Linear(cfg.dim, cfg.n_actions)
        self.next_action_emb = nn.Embedding(cfg.n_actions, cfg.dim)
        self.copy_head = CopyHead(cfg.dim, cfg.n_actions, cfg.copy_since) if cfg.copy_head else None
        self.gap_head = GapHead(cfg.dim, cfg.n_actions, cfg.n_gaps) if cfg.gap_head else None
        self.state_layout = CopyState(cfg.dim, cfg.max_len) if cfg.copy_head else None
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()

    def forward(
        self,
        items: torch.Tensor,
        actions: torch.Tensor,
        gaps: torch.Tensor,
        last: torch.Tensor | None = None,
        inputs: torch.Tensor | None = None,
        request: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, L) token ids -> (B, L, dim) hidden states; row t depends only on tokens <= t
        (and, for a request-time model, on the time of event t + 1: :meth:`request_vectors`).

        With ``last`` (one position per row) only those positions' states are returned, and the
        final block computes queries, attention and MLP for them alone -- what scoring needs, at
        a fraction of the cost. The result is the *inference state*: the hidden state (B, dim),
        followed, for a repeat-aware model, by the copy part (:class:`CopyState`), so that
        :meth:`item_logp` needs nothing else. ``inputs`` replaces :meth:`input_vectors` (the
        token content the transformer reads; gradient attribution scales it), the ids still
        naming what the copy head can copy. ``request``: each row's request-gap bucket, which a
        request-time model needs with ``last``.
        """
        if last is None:
            return self.hidden_states(items, actions, gaps, inputs=inputs)
        h = self.hidden_states(items, actions, gaps, last, inputs, request)
        if self.copy_head is None or self.state_layout is None:
            return h
        log_alpha = self.copy_head.position_logits_at(h, self.event_vectors(items, actions), items, actions, last)
        return self.state_layout.pack(h, log_alpha, items)

    def hidden_states(
        self,
        items: torch.Tensor,
        actions: torch.Tensor,
        gaps: torch.Tensor,
        last: torch.Tensor | None = None,
        inputs: torch.Tensor | None = None,
        request: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The transformer proper: (B, L, dim), or (B, dim) at the positions ``last``."""
        n = items.shape[1]
        if n > self.config.max_len:
            raise ValueError(f"sequence length {n} exceeds max_len {self.config.max_len}")
        pos = torch.arange(n, device=items.device)
        content = self.input_vectors(items, actions, gaps) if inputs is None else inputs
        if self.request_emb is not None:
            content = content + self.request_vectors(gaps, last, request)
        x = self.drop(content if self.pos_emb is None else content + self.pos_emb(pos))
        if last is None:
            for block in self.blocks:
                x = block(x)
            return self.ln_f(x)
        for block in self.blocks[:-1]:
            x = block(x)
        last_block: Block = self.blocks[-1]  # type: ignore[assignment]  # ModuleList indexes as Module
        return self.ln_f(last_block.forward_at(x, last))

    def input_vectors(self, items: torch.Tensor, actions: torch.Tensor, gaps: torch.Tensor) -> torch.Tensor:
        """What each token tells the transformer before its position is added: the item, the
        action and the time gap (with any per-event values), (B, L, dim)."""
        return self.item_vectors(items) + self.action_emb(actions) + self.context_vectors(gaps)

    def request_vectors(
        self, gaps: torch.Tensor, last: torch.Tensor | None, request: torch.Tensor | None
    ) -> torch.Tensor:
        """The request-time input of a ``time_context="request"`` model, (B, L, dim): at each
        position the gap bucket from its event to the event it predicts -- in training the next
        token's own gap (the target's timestamp plays the request time), at ``last`` the
        request's (``request``: (B,) buckets from the tokenizer's ``gap_bucket``).

        Causal by construction: position t gets the gap of token t + 1, which every later
        position already reads as that token's gap input, and it carries a time only -- never
        the next item, action or value (the values packed above the gap id are dropped)."""
        n_gaps = self.config.n_gaps
        after = torch.cat([gaps[:, 1:] % n_gaps, torch.full_like(gaps[:, :1], PAD)], 1)
        if last is not None:
            if request is None:
                raise ConfigurationError(
                    "this model was trained with time_context='request': scoring it needs the request "
                    "time (as_of=...; the CLI's --as-of, the API's request time)"
                )
            after = after.scatter(1, last[:, None], request[:, None].to(after.dtype))
        return self.request_emb(after)  # type: ignore[misc]  # only called when it exists

    def event_vectors(self, items: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """What each context event was (item + action), the copy head's keys."""
        return self.item_vectors(items) + self.action_emb(actions)

    def copy_log_alpha(self, h: torch.Tensor, items: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Copy log-weights of every position over the earlier context positions, (B, L, L)."""
        assert self.copy_head is not None
        return self.copy_head.position_logits(h, self.event_vectors(items, actions), items, actions)

    def hidden(self, state: torch.Tensor) -> torch.Tensor:
        """The hidden state part of an inference state (the user embedding)."""
        return state if self.state_layout is None else self.state_layout.hidden(state)

    @property
    def state_width(self) -> int:
        """Width of the inference state :meth:`forward` returns with ``last``."""
        return self.config.dim if self.state_layout is None else self.state_layout.width

    def item_logp(self, state: torch.Tensor, next_action: torch.Tensor, new_items: bool = False) -> torch.Tensor:
        """``log P(item | next action)`` over the vocabulary (specials -inf): the catalog
        softmax, mixed with the copy distribution for a repeat-aware model. ``new_items`` adds
        ``max_len`` columns after the vocabulary for the row's new items (:meth:`extended_width`)."""
        h = self.hidden(state)
        if self.copy_head is None or self.state_layout is None:
            return torch.log_softmax(self.item_logits(h, next_action), -1)
        lay = self.state_layout
        width = self.extended_width if new_items else self.config.n_items
        logits = self.item_logits(h, next_action, width)
        log_g, log_1mg = gate_logps(self.copy_head.gate_logits(self.item_query(h, next_action)), lay.has_copy(state))
        # log(1-g) + log-softmax (torch's fused log_softmax: measured 1.3x faster on CPU than
        # logsumexp and an in-place subtraction), then only the context columns change
        shifted = torch.log_softmax(logits, -1).add_(log_1mg[:, None])
        return lay.add_copy(shifted, log_g, state)

    def item_logp_columns(self, state: torch.Tensor, next_action: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``log P(item | next action)`` at given columns per row, (B, C) for ``cols`` (B, C):
        what :meth:`item_logp` holds there, without materialising the catalog's log-softmax (one
        logsumexp per row) and out of place, so autograd can go through it. A column past the
        vocabulary names a row's new item as the state does (``n_items`` + its first position)."""
        h = self.hidden(state)
        logits = self.item_logits(h, next_action)
        n_items = self.config.n_items
        picked = logits.gather(1, cols.clamp(max=n_items - 1)) - torch.logsumexp(logits, -1, keepdim=True)
        gen = picked.masked_fill(cols >= n_items, float("-inf"))
        if self.copy_head is None or self.state_layout is None:
            return gen
        lay = self.state_layout
        log_g, log_1mg = gate_logps(self.copy_head.gate_logits(self.item_query(h, next_action)), lay.has_copy(state))
        return mix(gen, lay.copy_logp_columns(state, cols), log_g, log_1mg)

    @property
    def extended_width(self) -> int:
        """Columns of a ranking with new items: the vocabulary, then one per context position
        (a repeat-aware model; the vocabulary alone otherwise)."""
        return self.config.n_items + (self.config.max_len if self.copy_head is not None else 0)

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """Item embeddings plus their side features' (the one item representation: inputs, the
        tied output matrix, sampled negatives and the retrieval index all read it)."""
        x = self.item_emb(items)
        for k, emb in enumerate(self.side_embs):
            x = x + emb(self.item_sides[items, k])
        return x

    def item_matrix(self) -> torch.Tensor:
        """(n_items, dim): :meth:`item_vectors` of the whole vocabulary. In eval mode without
        gradients it is computed once and reused by every scoring batch; ``train()``/``eval()``,
        loading weights and new side ids clear it (edit weights in place? call ``eval()`` again)."""
        if not len(self.side_embs):
            return self.item_emb.weight
        rows = torch.arange(self.config.n_items, device=self.item_emb.weight.device)
        if self.training or torch.is_grad_enabled():
            return self.item_vectors(rows)
        if self._matrix_cache is None:
            self._matrix_cache = self.item_vectors(rows)
        return self._matrix_cache

    def train(self, mode: bool = True) -> BehaviorTransformer:
        self._matrix_cache = self._padded_cache = None
        return super().train(mode)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._matrix_cache = self._padded_cache = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def context_vectors(self, gaps: torch.Tensor) -> torch.Tensor:
        """Embedding of each position's context id: the time-gap bucket, plus each per-event value
        bucket the tokenizer packed above it (``gap + n_gaps * (v_0 + n_0 * v_1 ...)``)."""
        if not len(self.value_embs):
            return self.gap_emb(gaps)
        x, rest = self.gap_emb(gaps % self.config.n_gaps), gaps // self.config.n_gaps
        for emb, size in zip(self.value_embs, self.config.value_sizes, strict=True):
            x = x + emb(rest % size)
            rest = rest // size
        return x

    def set_item_sides(self, ids: torch.Tensor | None) -> None:
        """Install the tokenizer's item side-feature ids (after fit, or after the vocabulary grew)."""
        if ids is not None and len(self.side_embs):
            self.item_sides.copy_(torch.as_tensor(ids, dtype=torch.long))
            self._matrix_cache = self._padded_cache = None

    def action_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Next-action logits from hidden states or inference states."""
        return self.action_head(self.hidden(h))

    def item_query(self, h: torch.Tensor, next_action: torch.Tensor) -> torch.Tensor:
        """The item head's query ``h + e_a`` (from hidden or inference states)."""
        return self.hidden(h) + self.next_action_emb(next_action)

    def item_logits(self, h: torch.Tensor, next_action: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """Full-catalog logits over the item vocabulary (special tokens set to -inf); with a
        ``width`` past the vocabulary, -inf columns follow (the new items' places), computed in
        the same matmul against a zero-padded matrix rather than by copying the result."""
        matrix = self.item_matrix()
        if width is not None and width > matrix.shape[0]:
            matrix = self._padded_matrix(width)
        logits = self.item_query(h, next_action) @ matrix.T
        logits[..., :N_SPECIAL] = float("-inf")
        logits[..., self.config.n_items :] = float("-inf")
        return logits

    def _padded_matrix(self, width: int) -> torch.Tensor:
        """:meth:`item_matrix` with zero rows up to ``width`` (cached like it in eval mode)."""
        if self._padded_cache is not None and self._padded_cache.shape[0] == width:
            return self._padded_cache
        m = self.item_matrix()
        padded = torch.cat([m, m.new_zeros(width - m.shape[0], m.shape[1])])
        if not (self.training or torch.is_grad_enabled()):
            self._padded_cache = padded
        return padded

    def grown(self, n_items: int, n_actions: int) -> BehaviorTransformer:
        """A copy with room for a larger vocabulary: every existing weight is kept exactly, and
        the new item and action rows (embeddings, action head, next-action query) are initialised
        like a fresh model's. Incremental training starts from it when new items appear."""
        if n_items < self.config.n_items or n_actions < self.config.n_actions:
            raise ConfigurationError("a vocabulary can only grow: new sizes must be >= the current ones")
        bigger = BehaviorTransformer(replace(self.config, n_items=n_items, n_actions=n_actions))
        with torch.no_grad():
            mine = self.state_dict()
            for name, target in bigger.state_dict().items():
                old = mine[name]
                (target[: old.shape[0]] if old.dim() else target).copy_(
                    old
                )  # vocabulary-sized tensors grow along dim 0
        return bigger.train(self.training)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> None:
        """``config.json`` + ``weights.pt`` (a plain state dict, loadable with weights_only)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(asdict(self.config), indent=2))
        torch.save(self.state_dict(), d / "weights.pt")

    @classmethod
    def load(cls, directory: str | Path) -> BehaviorTransformer:
        d = Path(directory)
        cfg = ModelConfig(**json.loads((d / "config.json").read_text()))
        model = cls(cfg)
        model.load_state_dict(torch.load(d / "weights.pt", weights_only=True, map_location="cpu"))
        return model.eval()
