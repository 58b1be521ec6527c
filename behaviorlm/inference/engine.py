"""The inference engine: the one path from a trained network and its vocabulary to scores.

Every consumer -- ``BehaviorLM.recommend``, batch scoring, the online service, decoding,
segment embeddings, the propensity scorers and evaluation -- goes through
:class:`InferenceEngine`, so encoding, padding, the two heads, the marginal over next actions,
masking (specials, seen items, allow-lists), top-k and the output frame with original ids exist
once. A new way to score (quantised weights, an exported graph, approximate retrieval) is a
new engine or a new method here, and every consumer gets it.

The model predicts the next step as a pair, ``P(action, item) = P(action) * P(item | action)``:
:meth:`InferenceEngine.item_logp` ranks items either given one next action or marginalised
over the action types seen in training.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import polars as pl
import torch

from behaviorlm.data.events import Events
from behaviorlm.errors import ConfigurationError, InputDataError
from behaviorlm.inference.retrieval import ItemIndex, two_stage_top_k
from behaviorlm.nn import device as devices
from behaviorlm.nn.gap_head import within as gap_within
from behaviorlm.nn.model import BehaviorTransformer
from behaviorlm.sequence.tokenizer import N_SPECIAL, ActionTokenizer, EncodedSequences

#: (row, vocabulary index) of every seen (user, item) pair, sorted by row.
SeenPairs = tuple[np.ndarray, np.ndarray]
NO_SEEN: SeenPairs = (np.zeros(0, np.int64), np.zeros(0, np.int64))
QUANTIZE_MODES = (None, "none", "int8")
FRAME_SCHEMA = {"user_id": pl.Null, "item_id": pl.Null, "score": pl.Float32, "rank": pl.Int32}


class InferenceEngine:
    """A network in eval mode plus the tokenizer that maps original ids to its vocabulary.

    ``version`` names the weights (a digest), so every output can say which model produced it.

    The network may live on an accelerator (:meth:`on`, :mod:`behaviorlm.nn.device`); the
    engine's tensors in and out are CPU tensors whatever the device, so no caller changes: inputs
    cross to the device in :meth:`heads_from_tensors`, the catalog-sized work (item log-probs,
    masks, top-k) stays there, and results cross back. Code that reaches into the network itself
    (attribution, ONNX export) asks for the CPU twin with ``on("cpu")``.
    """

    def __init__(
        self, network: BehaviorTransformer, tokenizer: ActionTokenizer, version: str, index: ItemIndex | None = None
    ):
        self.network = network.eval()
        self.tokenizer = tokenizer
        self.version = version
        self.index = index  # ANN candidates for top-k (None: rank the full catalog)
        self._real_actions = torch.arange(N_SPECIAL, tokenizer.n_actions)
        self._twins: dict[str, InferenceEngine] = {}  # this engine on other devices (:meth:`on`)

    def with_index(self, index: ItemIndex | None) -> InferenceEngine:
        """This engine ranking through ``index`` (two-stage retrieval), or exactly with ``None``."""
        return InferenceEngine(self.network, self.tokenizer, self.version, index)

    @property
    def device(self) -> torch.device:
        """Where the network runs (its item table's device: read on every call, so it follows a
        network that training moved; an attribute read, not a walk over the parameters)."""
        return self.network.item_emb.weight.device

    def on(self, device: str | torch.device) -> InferenceEngine:
        """This engine with its network on ``device``: itself when it is there already, else a
        copy there (the weights here stay where they are), kept for the next call."""
        dev = devices.resolve(device) if isinstance(device, str) else device
        if _same_device(self.device, dev):
            return self
        if self.is_compiled:
            raise ConfigurationError(f"choose the device before compiling: this compiled engine runs on {self.device}")
        if str(dev) not in self._twins:
            twin = copy.copy(self)
            twin.network = copy.deepcopy(self.network).to(dev).eval()
            twin._twins = {str(self.device): self}
            self._twins[str(dev)] = twin
        return self._twins[str(dev)]

    def compiled(self) -> InferenceEngine:
        """This engine with the transformer's forward compiled by ``torch.compile`` (dynamic
        shapes: one graph for any batch size and length above one), sharing the weights.

        Measured on the service's path (RESULTS.md section 29): on 2 CPU cores the forward of one
        50-event request fell from ~1.15 ms to ~0.70 ms and of 8 batched ones from ~0.26 to
        ~0.18 ms per request, after ~35 s of compiling on the first call -- so it is an option
        (``serve --compile``, :meth:`warm` before going live), not the default."""
        if self.is_compiled:
            return self
        twin = copy.copy(self)
        twin.network = copy.copy(self.network)  # a shallow module copy: the same parameters
        twin.network.forward = torch.compile(self.network.forward, dynamic=True)  # type: ignore[method-assign]
        twin._twins = {}
        return twin

    @property
    def is_compiled(self) -> bool:
        """Whether :meth:`compiled` made this engine (its network's forward is an instance attribute)."""
        return "forward" in vars(self.network)

    def warm(self, lengths: Sequence[int] = (2, 7), batch_sizes: Sequence[int] = (1, 3)) -> None:
        """Run the forward once per (batch size, length) shape class, so that a compiled engine
        compiles now (before a service reports ready) instead of in a user's request."""
        with torch.inference_mode():
            for b in batch_sizes:
                for n in lengths:
                    tokens = torch.full((b, n), N_SPECIAL, dtype=torch.long)  # the first real item and action
                    request = torch.zeros(b, dtype=torch.long) if self.time_context == "request" else None
                    self.heads_from_tensors(tokens, tokens, torch.zeros_like(tokens), torch.full((b,), n - 1), request)

    def renamed(self, version: str) -> InferenceEngine:
        """This engine -- the same runtime, session and index -- under another version name."""
        other = copy.copy(self)
        other.version, other._twins = version, {}
        return other

    # ------------------------------------------------------------------ sizes
    @property
    def n_items(self) -> int:
        return self.tokenizer.n_items

    @property
    def max_len(self) -> int:
        return self.network.config.max_len

    @property
    def dim(self) -> int:
        return self.network.config.dim

    @property
    def state_width(self) -> int:
        """Width of the per-user inference state the heads return (the hidden state, plus the
        copy part of a repeat-aware model): what a cache of states must hold."""
        return self.network.state_width

    @property
    def retrieval_name(self) -> str:
        """How the service finds top-k lists: ``exact`` (the full catalog) or the ANN index's name."""
        return self.retrieval_for("online")

    def retrieval_for(self, path: str) -> str:
        """How ``path`` (``online`` or ``batch``) finds top-k lists, and why when the cost chose."""
        if self.device.type != "cpu":  # the index searches on the CPU; an accelerator ranks it all
            return f"exact (on {self.device})"
        return "exact" if self.index is None else self.index.route_name(path)

    @property
    def real_actions(self) -> torch.Tensor:
        """Vocabulary ids of the action types seen in training (the specials excluded)."""
        return self._real_actions

    @property
    def action_names(self) -> list[str]:
        return list(self.tokenizer.actions_)

    def quantized(self, mode: str | None) -> InferenceEngine:
        """This engine with the transformer's Linear layers dynamically quantised (or itself).

        The tied item head is a matmul with the embedding matrix, not a Linear, and stays fp32,
        so ranking precision at the output is unchanged.
        """
        if mode not in QUANTIZE_MODES:
            raise ConfigurationError(f"quantize must be 'int8' or None, got {mode!r}", cli_hint="use --quantize int8")
        if mode in (None, "none"):
            return self
        if self.device.type != "cpu":
            raise ConfigurationError(
                f"int8 dynamic quantisation runs on the CPU; this engine runs on {self.device}",
                cli_hint=f"--quantize int8 runs on the CPU: add --device cpu (the model was on {self.device})",
            )
        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():  # torch.ao quantisation is deprecated in favour of torchao
            warnings.simplefilter("ignore")
            net = quantize_dynamic(copy.deepcopy(self.network), {torch.nn.Linear}, dtype=torch.qint8)
        return InferenceEngine(net, self.tokenizer, f"{self.version}-int8", self.index)

    # ------------------------------------------------------------------ encoding
    def encode(self, events: Events, truncate: bool = True) -> EncodedSequences:
        """Validated events -> token sequences (the newest ``max_len`` tokens with ``truncate``)."""
        return self.tokenizer.encode(events, truncate=truncate) if len(events) else EncodedSequences.empty()

    def action_id(self, action: str | None) -> int | None:
        """Vocabulary id of a next-action name; ``None`` stays ``None`` (marginal over actions)."""
        if action is None:
            return None
        if action not in self.tokenizer.actions_:
            raise InputDataError(
                f"unknown action {action!r}; this model knows {self.tokenizer.actions_}",
                cli_hint=f"--action must be one of {self.tokenizer.actions_}",
            )
        return int(self.tokenizer.action_index([action])[0])

    # ------------------------------------------------------------------ heads
    @torch.inference_mode()
    def heads_from_tensors(
        self,
        items: torch.Tensor,
        actions: torch.Tensor,
        gaps: torch.Tensor,
        last: torch.Tensor,
        request: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference state at each row's position ``last`` (the hidden state, plus the copy part of
        a repeat-aware model: :mod:`behaviorlm.nn.copy_head`), and next-action log-probs (specials
        -inf). ``request``: each row's request-gap bucket (a request-time model only)."""
        dev = self.device
        items, actions, gaps, last = (t.to(dev, non_blocking=True) for t in (items, actions, gaps, last))
        request = None if request is None else request.to(dev, non_blocking=True)
        h = self.network(items, actions, gaps, last=last, request=request)
        a_logits = self.network.action_logits(h)
        a_logits[:, :N_SPECIAL] = float("-inf")
        return h.cpu(), torch.log_softmax(a_logits, -1).cpu()

    def heads(self, enc: EncodedSequences, rows: slice | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`heads_from_tensors` at each user's last token, for some rows of ``enc``; for a
        repeat-aware model the context's new items (outside the vocabulary) are named by their
        first position, so the copy part can rank them (:meth:`item_logp` with ``new_items``)."""
        items, actions, gaps, last = (torch.from_numpy(a) for a in enc.padded(rows))
        state, a_logp = self.heads_from_tensors(items, actions, gaps, last, request=self.request_gaps(enc, rows))
        layout, codes = self.network.state_layout, enc.padded_new_codes(rows)
        if layout is None or codes is None or not (codes >= 0).any():
            return state, a_logp
        first = np.full((len(codes), self.max_len), -1, np.int64)
        first[:, : codes.shape[1]] = first_positions(codes)
        return layout.with_new_items(state, torch.from_numpy(first), self.n_items), a_logp

    @property
    def time_context(self) -> str:
        """``"request"`` when the network reads the request time (:meth:`request_gaps`), else ``"history"``."""
        return self.network.config.time_context

    def request_gaps(self, enc: EncodedSequences, rows: slice | np.ndarray) -> torch.Tensor | None:
        """Gap buckets from each row's last event to its request time (``enc.request_times``,
        default now) for a request-time model; ``None`` for any other."""
        if self.time_context != "request":
            return None
        return torch.from_numpy(self.tokenizer.gap_bucket(self._silence_s(enc, rows)))

    @staticmethod
    def _silence_s(enc: EncodedSequences, rows: slice | np.ndarray) -> np.ndarray:
        """Seconds from each row's last event to its request time (``enc.request_times``, default
        now): what a request-time model and the gap head read of the clock."""
        if enc.last_times is None:
            raise ConfigurationError(
                "this model reads the time since each user's last event, and this path does not carry "
                "event times (encode the users' events with the tokenizer)"
            )
        last = enc.last_times[rows]
        now = enc.request_times[rows] if enc.request_times is not None else np.full(len(last), time.time())
        return now - last

    @torch.inference_mode()
    def item_logp(
        self, h: torch.Tensor, a_logp: torch.Tensor, action_id: int | None = None, new_items: bool = False
    ) -> torch.Tensor:
        """``log P(item | next action)`` with ``action_id``, else ``log sum_a P(a) P(item | a)``;
        ``new_items``: plus the row's new context items after the vocabulary (:meth:`decode_new`)."""
        return self._item_logp_here(h, a_logp, action_id, new_items).cpu()

    def _item_logp_here(
        self, h: torch.Tensor, a_logp: torch.Tensor, action_id: int | None = None, new_items: bool = False
    ) -> torch.Tensor:
        """:meth:`item_logp` left on the network's device (for a top-k taken there)."""
        h, a_logp = h.to(self.device), a_logp.to(self.device)
        if action_id is not None:
            return self.network.item_logp(h, torch.full((len(h),), action_id, device=h.device), new_items)
        return self._over_next_actions(a_logp, lambda actions: self.network.item_logp(h, actions, new_items))

    @torch.inference_mode()
    def item_logp_columns(self, h: torch.Tensor, a_logp: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """:meth:`item_logp` at given columns per row only, (B, C) for ``cols`` (B, C): for
        callers that read a few items of many rows (attribution), without a (rows x catalog)
        log-probability matrix per next action."""
        h, a_logp, cols = h.to(self.device), a_logp.to(self.device), cols.to(self.device)
        return self._over_next_actions(a_logp, lambda actions: self.network.item_logp_columns(h, actions, cols)).cpu()

    def _over_next_actions(self, a_logp: torch.Tensor, given: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``log sum_a P(a) exp(given(a))`` over the real next actions, ``given`` taking one next
        action per row; one real action needs no sum."""
        real = self._real_actions.to(a_logp.device)
        if len(real) == 1:
            return given(real.expand(len(a_logp)))
        # accumulated pairwise: 3x faster on CPU than logsumexp over a stacked (actions, B, items) tensor
        total: torch.Tensor | None = None
        for a in real:
            part = given(a.expand(len(a_logp))).add_(a_logp[:, a, None])
            total = part if total is None else torch.logaddexp(total, part)
        assert total is not None
        return total

    @torch.inference_mode()
    def item_logp_given(self, h: torch.Tensor, next_actions: torch.Tensor, new_items: bool = False) -> torch.Tensor:
        """``log P(item | next action)`` with one next action per row (specials -inf)."""
        dev = self.device
        return self.network.item_logp(h.to(dev), next_actions.to(dev), new_items).cpu()

    def iter_scores(
        self, enc: EncodedSequences, action: str | None = None, batch_size: int = 128, new_items: bool = False
    ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
        """Yield (row slice, item log-probs (B, n_items, or the extended width with
        ``new_items``), action log-probs (B, n_actions))."""
        a_id = self.action_id(action)
        for rows in self._batches(enc, batch_size):
            h, a_logp = self.heads(enc, rows)
            yield rows, self.item_logp(h, a_logp, a_id, new_items), a_logp

    @staticmethod
    def _batches(enc: EncodedSequences, batch_size: int) -> Iterator[slice]:
        for start in range(0, len(enc), batch_size):
            yield slice(start, min(start + batch_size, len(enc)))

    @torch.inference_mode()
    def joint_step_logp(self, enc: EncodedSequences) -> torch.Tensor:
        """``(sequences, A * I)`` log-probs of the next (action, item) pair, real tokens only.

        Candidate ``c`` is action ``c // I`` and item ``c % I`` (offsets past the specials).
        """
        h, a_logp = self.heads(enc, slice(0, len(enc)))
        per_action = [
            a_logp[:, a, None] + self.item_logp_given(h, a.expand(len(h)))[:, N_SPECIAL:] for a in self._real_actions
        ]
        return torch.cat(per_action, 1)

    def embeddings(self, enc: EncodedSequences, batch_size: int = 256) -> np.ndarray:
        """L2-normalised hidden state after each user's latest event, (users, dim)."""
        if not len(enc):
            return np.zeros((0, self.dim), np.float32)
        parts = [self.network.hidden(self.heads(enc, rows)[0]) for rows in self._batches(enc, batch_size)]
        return torch.nn.functional.normalize(torch.cat(parts), dim=1).numpy()

    def within(
        self, enc: EncodedSequences, horizon_s: float, action: str | None = None, batch_size: int = 256
    ) -> np.ndarray:
        """Zero-shot ``P(next event -- of ``action``, or any -- within horizon_s after the request
        time | no event since the user's last)`` per user, from the gap head
        (:func:`behaviorlm.nn.gap_head.within`); the request time is ``enc.request_times`` (default now)."""
        head = self.network.gap_head
        if head is None:
            raise ConfigurationError(
                "this model has no gap head: train it with gap_head=True (behaviorlm train --gap-head)"
            )
        a_id, out = self.action_id(action), []
        for rows in self._batches(enc, batch_size):
            state, _ = self.heads(enc, rows)
            elapsed = torch.from_numpy(np.maximum(self._silence_s(enc, rows), 0.0))
            with torch.inference_mode():
                lj = head.log_joint(self.network.hidden(state.to(self.device))).cpu()
                out.append(gap_within(lj, a_id, elapsed, horizon_s, float(head.span_s)).numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def action_proba(self, enc: EncodedSequences, batch_size: int = 128) -> np.ndarray:
        """``P(next action)`` per user over :attr:`action_names`, (users, actions)."""
        blocks = [self.heads(enc, rows)[1][:, N_SPECIAL:].exp().numpy() for rows in self._batches(enc, batch_size)]
        return np.concatenate(blocks) if blocks else np.zeros((0, len(self.action_names)), np.float32)

    # ------------------------------------------------------------------ masks and top-k
    def allowed_mask(self, item_ids: Sequence[Any] | None) -> torch.Tensor | None:
        """Boolean vocabulary mask of an allow-list (``None``: the whole catalog)."""
        if item_ids is None:
            return None
        idx = self.tokenizer.item_index(list(item_ids))
        idx = idx[idx >= N_SPECIAL]
        if len(idx) == 0:
            raise InputDataError("allowed_items: none of the given items is in the model's catalog")
        mask = torch.zeros(self.n_items, dtype=torch.bool)
        mask[torch.from_numpy(idx)] = True
        return mask

    def seen_pairs(self, seen: pl.DataFrame, user_ids: list[Any]) -> SeenPairs:
        """(row in ``user_ids``, vocabulary index) of every seen (user, item) pair, sorted by row.

        Vectorised so that masking seen items costs one indexing op per batch, for one user or all.
        """
        rows_of = pl.DataFrame(
            {"user_id": pl.Series(user_ids, dtype=seen["user_id"].dtype), "__row": np.arange(len(user_ids))}
        )
        pairs = seen.select("user_id", "item_id").join(rows_of, on="user_id", how="inner")
        rows, cols = pairs["__row"].to_numpy(writable=True), self.tokenizer.item_index(pairs["item_id"])
        keep = cols >= N_SPECIAL
        order = np.argsort(rows[keep], kind="stable")
        return rows[keep][order], cols[keep][order]

    @torch.inference_mode()
    def top_k(
        self,
        logp: torch.Tensor,
        rows: slice,
        k: int,
        seen: SeenPairs = NO_SEEN,
        allowed: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` (values, vocabulary indices) of a batch covering ``rows`` after masking, in place,
        specials, items outside ``allowed`` (one mask, or one per row) and each row's ``seen`` items;
        masked entries come back as -inf."""
        logp[:, :N_SPECIAL] = float("-inf")
        if allowed is not None:  # an allow-list names catalog items: new items are outside it
            allowed = torch.nn.functional.pad(
                allowed.to(logp.device), (0, logp.shape[1] - allowed.shape[-1]), value=False
            )
            logp.masked_fill_(~allowed if allowed.dim() == 2 else ~allowed[None, :], float("-inf"))
        mask_seen_(logp, rows, seen)
        val, idx = torch.topk(logp, min(k, logp.shape[1] - N_SPECIAL), dim=1)
        return val.cpu(), idx.cpu()

    @torch.inference_mode()
    def rank(
        self,
        h: torch.Tensor,
        a_logp: torch.Tensor,
        rows: slice,
        k: int,
        seen: SeenPairs = NO_SEEN,
        allowed: torch.Tensor | None = None,
        action_id: int | None = None,
        new_items: bool = False,
        path: str = "online",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` (log-probs, vocabulary indices) for a batch of heads covering ``rows``:
        over the full catalog, or -- with an index that serves ``path`` (``online``: a few
        requests; ``batch``: :meth:`top_k_all`) -- over its candidates, re-scored exactly
        (:mod:`behaviorlm.inference.retrieval`). Masked or missing slots are -inf. With
        ``new_items`` a repeat-aware model may also return the row's new context items, as
        ``n_items + first position`` (:meth:`top_k_all` names them)."""
        # the index searches on the CPU: a network on an accelerator ranks the whole catalog there
        if self.index is None or not self.index.serves(path) or self.device.type != "cpu":
            return self.top_k(self._item_logp_here(h, a_logp, action_id, new_items), rows, k, seen, allowed)
        return two_stage_top_k(self, h, a_logp, rows, k, seen, allowed, action_id, new_items)

    def top_k_all(
        self,
        enc: EncodedSequences,
        k: int,
        seen: SeenPairs = NO_SEEN,
        allowed: torch.Tensor | None = None,
        action: str | None = None,
        batch_size: int = 128,
        new_items: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` log-probs and indices for every user of ``enc``, (users, k) each: vocabulary
        indices, and -- with ``new_items`` -- ``n_items + code`` for a new item of ``enc.new_ids``."""
        vals, idxs = [], []
        a_id = self.action_id(action)
        for rows in self._batches(enc, batch_size):
            h, a_logp = self.heads(enc, rows)
            val, idx = self.rank(h, a_logp, rows, k, seen, allowed, a_id, new_items, path="batch")
            vals.append(val.numpy())
            idxs.append(self.codes_of_new(idx.numpy(), enc.padded_new_codes(rows)))
        if not vals:
            return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int64)
        return np.concatenate(vals), np.concatenate(idxs)

    def codes_of_new(self, idx: np.ndarray, codes: np.ndarray | None) -> np.ndarray:
        """Top-k indices (rows x k) with each ``n_items + first position`` renamed ``n_items +
        code``, from the rows' new-item codes by position (rows x positions): the names
        :meth:`decode` reads."""
        new = idx >= self.n_items
        if not new.any():
            return idx
        assert codes is not None  # positions were named only where codes exist
        r, c = np.nonzero(new)
        out = idx.copy()
        out[r, c] = self.n_items + codes[r, idx[r, c] - self.n_items]
        return out

    def popularity_logp(self) -> torch.Tensor:
        """Log training share of every vocabulary entry (specials -inf): the cold-start scores."""
        counts = torch.zeros(self.n_items)
        counts[N_SPECIAL:] = torch.tensor(self.tokenizer.item_counts_, dtype=torch.float32)
        return (counts / counts.sum()).log()

    # ------------------------------------------------------------------ frames
    def frame(
        self,
        user_ids: Sequence[Any],
        logp: np.ndarray,
        idx: np.ndarray,
        user_dtype: pl.DataType | None = None,
        item_dtype: pl.DataType | None = None,
        new_ids: pl.Series | None = None,
    ) -> pl.DataFrame:
        """``user_id, item_id, score (probability), rank`` with original ids from a top-k
        (``new_ids`` names the new items of :meth:`top_k_all` with ``new_items``).

        Masked (-inf) slots are dropped, so a user who has seen almost everything gets fewer
        than k rows.
        """
        if len(user_ids) == 0 or logp.size == 0:
            return pl.DataFrame(schema=FRAME_SCHEMA)
        kk = logp.shape[1]
        keep = np.isfinite(logp).ravel()
        users = np.repeat(np.arange(len(user_ids)), kk)[keep]
        items = self.decode(idx.ravel()[keep], new_ids)
        return pl.DataFrame(
            {
                "user_id": pl.Series([user_ids[i] for i in users], dtype=user_dtype),
                "item_id": _as_dtype(pl.Series(items), item_dtype),
                "score": np.exp(logp.ravel()[keep]).astype(np.float32),
                "rank": np.tile(np.arange(1, kk + 1, dtype=np.int32), len(user_ids))[keep],
            }
        )

    def decode(self, idx: np.ndarray, new_ids: pl.Series | np.ndarray | None = None) -> list[Any]:
        """Original item ids of top-k indices: the vocabulary's, and ``new_ids[i - n_items]``
        (a Series, or an object array: what a per-request caller indexes fastest)."""
        new = idx >= self.n_items
        if not new.any():
            return self.tokenizer.decode_items(idx).tolist()
        if new_ids is None:
            raise ValueError("new-item indices need the encoding's new_ids to be named")
        out = np.empty(len(idx), dtype=object)
        out[~new] = self.tokenizer.decode_items(idx[~new])
        at = idx[new] - self.n_items
        out[new] = new_ids[at] if isinstance(new_ids, np.ndarray) else new_ids.gather(at).to_list()
        return out.tolist()

    def recommend(
        self,
        enc: EncodedSequences,
        k: int,
        seen: SeenPairs = NO_SEEN,
        allowed: torch.Tensor | None = None,
        action: str | None = None,
        batch_size: int = 128,
        new_items: bool = False,
    ) -> pl.DataFrame:
        """Top-``k`` frame for every user of ``enc`` (``new_items``: see :meth:`rank`)."""
        val, idx = self.top_k_all(enc, k, seen, allowed, action, batch_size, new_items)
        return self.frame(enc.user_ids, val, idx, new_ids=enc.new_ids)

    def popular(self, user_ids: Sequence[Any], k: int, allowed: torch.Tensor | None = None) -> pl.DataFrame:
        """Cold start: the most popular training items for each user, scored by their training share."""
        if not user_ids:
            return pl.DataFrame(schema=FRAME_SCHEMA)
        val, idx = self.top_k(self.popularity_logp()[None, :].clone(), slice(0, 1), k, NO_SEEN, allowed)
        return self.frame(list(user_ids), val.expand(len(user_ids), -1).numpy(), idx.expand(len(user_ids), -1).numpy())


def seen_pairs_of(columns: Sequence[np.ndarray]) -> SeenPairs:
    """:data:`SeenPairs` from one array of seen columns per row (row order kept)."""
    lengths = np.array([len(c) for c in columns], dtype=np.int64)
    if not lengths.sum():
        return NO_SEEN
    return np.repeat(np.arange(len(columns)), lengths), np.concatenate(columns).astype(np.int64)


def mask_seen_(scores: torch.Tensor, rows: slice, seen: SeenPairs) -> None:
    """Set each row's seen columns to -inf, in place, for a batch covering ``rows`` of ``seen``
    (sorted by row). The one seen-item mask: the engine's top-k (recommend, batch scoring, the
    service) and the evaluation's ranking both run it."""
    seen_rows, seen_cols = seen
    a, b = np.searchsorted(seen_rows, [rows.start, rows.stop])
    r, c = (torch.from_numpy(x).to(scores.device) for x in (seen_rows[a:b] - rows.start, seen_cols[a:b]))
    scores[r, c] = float("-inf")


def first_positions(codes: np.ndarray) -> np.ndarray:
    """For (B, W) new-item codes (-1: none), each position's first position in its row holding
    the same code (-1 where none): the name a new item goes by within its row."""
    b, w = codes.shape
    flat = np.flatnonzero(codes.ravel() >= 0)
    out = np.full(b * w, -1, np.int64)
    if len(flat):
        key = (flat // w) * (int(codes.max()) + 1) + codes.ravel()[flat]
        _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        out[flat] = flat[first][inverse] % w
    return out.reshape(b, w)


def _as_dtype(ids: pl.Series, dtype: pl.DataType | None) -> pl.Series:
    """The model's item ids in the caller's id type where that is lossless (ints as text, ints
    as another int width); otherwise the model's own ids as they are, never a failed cast."""
    if dtype is None or ids.dtype == dtype:
        return ids
    if dtype == pl.String or (ids.dtype.is_integer() and dtype.is_integer()):
        return ids.cast(dtype)
    return ids


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` (the current GPU) are one device."""
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
