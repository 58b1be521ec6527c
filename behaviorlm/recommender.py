"""``BehaviorLM``: the estimator users touch -- fit on events, recommend with original ids.

Shaped after RecTools and scikit-learn: hyper-parameters in ``__init__``, learned state in
attributes with a trailing underscore (``tokenizer_``, ``model_``, ``history_``), and
``recommend`` returning a DataFrame ``user_id, item_id, score, rank`` in the caller's ids.

A fitted model keeps each training user's most recent ``max_len`` events and the set of items
they touched, so ``recommend(users=[...])`` needs no event data; ``recommend(events=...)`` scores
anyone -- including users never seen in training -- straight from raw events. Users with no
events at all get the documented cold-start answer: the most popular training items.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from behaviorlm.evaluation import Holdout, per_user_metrics, rank_targets, seen_lists
from behaviorlm.events import Events, EventsError, as_events, validate_items
from behaviorlm.model import BehaviorTransformer, ModelConfig
from behaviorlm.tokenizer import N_SPECIAL, PAD, ActionTokenizer, EncodedSequences
from behaviorlm.training import TrainConfig, TrainHistory, train

log = logging.getLogger(__name__)

_ARCH_PARAMS = ("dim", "n_layers", "n_heads", "ffn_mult", "dropout")
_TOKENIZER_PARAMS = ("max_len", "min_item_count", "n_time_buckets")
_TRAIN_PARAMS = tuple(TrainConfig.__dataclass_fields__)


class BehaviorLM:
    """Causal transformer recommender over (item, action, time-gap) sequences."""

    name = "behaviorlm"

    def __init__(
        self,
        *,
        max_len: int = 200,
        dim: int = 64,
        n_layers: int = 2,
        n_heads: int = 2,
        ffn_mult: int = 4,
        dropout: float = 0.2,
        min_item_count: int = 1,
        n_time_buckets: int = 24,
        epochs: int = 50,
        batch_size: int = 128,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        warmup_frac: float = 0.05,
        min_lr_frac: float = 0.1,
        grad_clip: float = 1.0,
        loss: str = "full",
        n_negatives: int = 1024,
        action_loss_weight: float = 0.5,
        patience: int = 5,
        validate_every: int = 1,
        seed: int = 42,
        progress: bool = True,
        max_time_s: float | None = None,
    ):
        self.params = {k: v for k, v in locals().items() if k != "self"}
        TrainConfig(**{k: self.params[k] for k in _TRAIN_PARAMS})  # validate early

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        events: Events | Any,
        validation: Holdout | None = None,
        exclude_seen: bool = True,
        k_val: int = 10,
        items: Any = None,
    ) -> BehaviorLM:
        """Pretrain on ``events``; with a ``validation`` holdout, early-stop on its NDCG@k_val.

        ``items`` (optional item metadata: ``item_id`` + title/category/brand/price) is validated
        and kept with the model, so downstream steps (segments, explanations) need no other copy.
        """
        ev = as_events(events)
        self.items_ = validate_items(items) if items is not None else None
        p = self.params
        self.tokenizer_ = ActionTokenizer(**{k: p[k] for k in _TOKENIZER_PARAMS}).fit(ev)
        seqs = self.tokenizer_.encode(ev, truncate=False)
        cfg = ModelConfig(
            self.tokenizer_.n_items,
            self.tokenizer_.n_actions,
            self.tokenizer_.n_gaps,
            max_len=p["max_len"],
            **{k: p[k] for k in _ARCH_PARAMS},
        )
        torch.manual_seed(p["seed"])
        self.model_ = BehaviorTransformer(cfg)
        self.exclude_seen_ = exclude_seen
        validate = None
        if validation is not None and validation.n_users:
            catalog = ev.df["item_id"].unique(maintain_order=True)
            metric = f"ndcg@{k_val}"
            seen = seen_lists(validation.inputs, catalog) if exclude_seen else {}

            def validate(_model: BehaviorTransformer) -> float:
                ranks = rank_targets(self, validation, catalog, k_val, exclude_seen, seen).ranks
                return float(per_user_metrics(ranks, k_val)[metric].mean())

        tcfg = TrainConfig(**{k: p[k] for k in _TRAIN_PARAMS})
        self.history_: TrainHistory = train(self.model_, seqs, tcfg, validate, log=self._log_epoch)
        self._remember_users(ev)
        self.fitted_at_ = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.n_train_events_ = len(ev)
        return self

    @staticmethod
    def _log_epoch(stats: dict) -> None:
        val = f" val={stats['val_score']:.4f}" if "val_score" in stats else ""
        log.info("epoch %d loss=%.4f %.0f tok/s%s", stats["epoch"], stats["loss"], stats["tokens_per_s"], val)

    def _remember_users(self, ev: Events) -> None:
        """Keep what recommend(users=...) needs: recent events and the seen-item sets."""
        df = ev.df
        n = pl.len().over("user_id").cast(pl.Int64)  # UInt32 would underflow for short users
        self.histories_ = df.filter(pl.int_range(pl.len()).over("user_id") >= n - self.params["max_len"])
        self.seen_ = df.select("user_id", "item_id").unique(maintain_order=True)

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise RuntimeError("BehaviorLM is not fitted: call fit(events) or BehaviorLM.load(dir)")

    # ------------------------------------------------------------------ scoring core
    def _action_id(self, action: str | None) -> int | None:
        if action is None:
            return None
        if action not in self.tokenizer_.actions_:
            raise EventsError(f"unknown action {action!r}; this model knows {self.tokenizer_.actions_}")
        return int(self.tokenizer_.action_index([action])[0])

    def _real_actions(self) -> torch.Tensor:
        return torch.arange(N_SPECIAL, self.tokenizer_.n_actions)

    @torch.inference_mode()
    def iter_scores(
        self, enc: EncodedSequences, action: str | None = None, batch_size: int = 128, with_items: bool = True
    ) -> Iterator[tuple[slice, torch.Tensor | None, torch.Tensor]]:
        """Yield (row slice, item log-probs (B, n_items), action log-probs (B, n_actions)).

        With ``action`` the item distribution is ``P(item | next action)``; without, it is the
        marginal ``sum_a P(a) P(item | a)`` over the action types seen in training.
        """
        self._check_fitted()
        model = self.model_.eval()
        a_id = self._action_id(action)
        lens = enc.lengths()
        for start in range(0, len(enc), batch_size):
            rows = slice(start, min(start + batch_size, len(enc)))
            h, a_logp = self.step_heads(enc, rows, lens)
            if not with_items:
                i_logp = None
            elif a_id is not None:
                i_logp = torch.log_softmax(model.item_logits(h, torch.full((len(h),), a_id)), -1)
            else:
                i_logp = self._marginal_item_logp(model, h, a_logp)
            yield rows, i_logp, a_logp

    def step_heads(self, enc: EncodedSequences, rows: slice, lens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden state at each user's last token, and next-action log-probs (specials -inf).

        Public because decoding builds its joint (action, item) step distribution on it.
        """
        items, actions, gaps, last = pad_right(enc, rows, lens)
        h = self.model_(items, actions, gaps, last=last)
        a_logits = self.model_.action_logits(h)
        a_logits[:, :N_SPECIAL] = float("-inf")
        return h, torch.log_softmax(a_logits, -1)

    def _marginal_item_logp(self, model: BehaviorTransformer, h: torch.Tensor, a_logp: torch.Tensor) -> torch.Tensor:
        real = self._real_actions()
        if len(real) == 1:
            return torch.log_softmax(model.item_logits(h, real.expand(len(h))), -1)
        per_action = torch.stack(
            [a_logp[:, a, None] + torch.log_softmax(model.item_logits(h, a.expand(len(h))), -1) for a in real]
        )
        return torch.logsumexp(per_action, 0)

    def _encode_users(self, users: list[Any] | None, events: Any) -> tuple[EncodedSequences, pl.DataFrame, list[Any]]:
        """Encoded input sequences, the seen (user, item) pairs, and users without any events."""
        self._check_fitted()
        if events is not None:
            ev = as_events(events)
            df = ev.df
            if users is not None:
                df = df.filter(
                    pl.col("user_id").is_in(pl.Series(users).cast(df["user_id"].dtype, strict=False).implode())
                )
            seen = df.select("user_id", "item_id").unique()
        else:
            if users is None:
                users = self.histories_["user_id"].unique(maintain_order=True).to_list()
            u = pl.Series("user_id", users).cast(self.histories_["user_id"].dtype, strict=False)
            df = self.histories_.filter(pl.col("user_id").is_in(u.implode()))
            seen = self.seen_.filter(pl.col("user_id").is_in(u.implode()))
        enc = (
            self.tokenizer_.encode(Events.trusted(df, "users to score"), truncate=True)
            if df.height
            else _empty_encoding()
        )
        cold = [] if users is None else sorted(set(users) - set(enc.user_ids), key=str)
        return enc, seen, cold

    # ------------------------------------------------------------------ public API
    def recommend(
        self,
        users: list[Any] | None = None,
        *,
        events: Any = None,
        k: int = 10,
        exclude_seen: bool = True,
        allowed_items: list[Any] | None = None,
        action: str | None = None,
        batch_size: int = 128,
    ) -> pl.DataFrame:
        """Top-``k`` items per user as ``user_id, item_id, score, rank`` (score = probability).

        ``users`` alone uses the histories remembered at fit time; ``events`` (raw events of any
        users, seen in training or not) are encoded on the fly. ``action`` ranks by
        ``P(item | next action = action)``; the default marginalises over action types.
        Users without events get the most popular items (cold start) with ``score`` = their
        training share.
        """
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        self._check_fitted()
        enc, seen, cold = self._encode_users(users, events)
        allowed = self._allowed_mask(allowed_items)
        seen_rc = seen_pairs(self.tokenizer_, seen, enc.user_ids) if exclude_seen else NO_SEEN
        frames = []
        for rows, i_logp, _ in self.iter_scores(enc, action, batch_size):
            val, idx = mask_top_k(i_logp, rows, seen_rc, allowed, k)
            frames.append(_topk_frame(enc.user_ids[rows], val, idx))
        if cold:
            log.info("recommend: %d user(s) without events get popular items (cold start)", len(cold))
            frames.append(self._popular_frame(cold, k, allowed))
        return _concat(frames, self.tokenizer_)

    def next_action_proba(
        self, users: list[Any] | None = None, *, events: Any = None, batch_size: int = 128
    ) -> pl.DataFrame:
        """``user_id``, one ``p_<action>`` column per action type, and ``predicted_action``."""
        enc, _, _ = self._encode_users(users, events)
        names = self.tokenizer_.actions_
        blocks = []
        for _, _, a_logp in self.iter_scores(enc, batch_size=batch_size, with_items=False):
            blocks.append(a_logp[:, N_SPECIAL:].exp().numpy())
        probs = np.concatenate(blocks) if blocks else np.zeros((0, len(names)))
        out = pl.DataFrame({"user_id": enc.user_ids}) if len(enc) else pl.DataFrame({"user_id": []})
        out = out.with_columns(**{f"p_{a}": probs[:, j] for j, a in enumerate(names)})
        pred = [names[j] for j in probs.argmax(1)] if len(probs) else []
        return out.with_columns(predicted_action=pl.Series(pred, dtype=pl.String))

    def generate(self, users: list[Any] | None = None, *, events: Any = None, **decode_kwargs: Any) -> pl.DataFrame:
        """Decode the next actions as (action, item) trajectories; see :mod:`behaviorlm.decoding`.

        ``decode_kwargs`` are :class:`~behaviorlm.decoding.DecodeConfig` fields: ``n_steps``,
        ``method`` (greedy | sample | beam), ``temperature``, ``top_k``, ``top_p``,
        ``beam_width``, ``n_samples``, ``seed``. Users without events are skipped.
        """
        from behaviorlm.decoding import DecodeConfig, decode

        cfg = DecodeConfig(**decode_kwargs)
        enc, _, _ = self._encode_users(users, events)
        return decode(self, enc, cfg)

    def score(self, inputs: Events, users: list[Any], catalog: pl.Series, chunk: int = 256):
        """Scorer protocol for :mod:`behaviorlm.evaluation`: log-probs over ``catalog``."""
        enc = self.tokenizer_.encode(inputs, truncate=True)
        pos = {u: i for i, u in enumerate(enc.user_ids)}
        missing = [u for u in users if u not in pos]
        if missing:
            raise EventsError(f"{len(missing)} evaluated user(s) have no input events, e.g. {missing[0]!r}")
        cols = torch.from_numpy(self.tokenizer_.item_index(catalog))
        for i in range(0, len(users), chunk):
            part = users[i : i + chunk]
            sub = enc.subset([pos[u] for u in part])
            logps = [lp for _, lp, _ in self.iter_scores(sub, None, chunk)]
            yield part, torch.cat(logps)[:, cols]

    # ------------------------------------------------------------------ helpers
    def _allowed_mask(self, allowed_items: list[Any] | None) -> torch.Tensor | None:
        if allowed_items is None:
            return None
        idx = self.tokenizer_.item_index(list(allowed_items))
        idx = idx[idx >= N_SPECIAL]
        if len(idx) == 0:
            raise ValueError("allowed_items: none of the given items is in the model's catalog")
        mask = torch.zeros(self.tokenizer_.n_items, dtype=torch.bool)
        mask[torch.from_numpy(idx)] = True
        return mask

    def _popular_frame(self, users: list[Any], k: int, allowed: torch.Tensor | None) -> pl.DataFrame:
        """Cold start: the most popular training items, scored by their training share."""
        counts = torch.zeros(self.tokenizer_.n_items)
        counts[N_SPECIAL:] = torch.tensor(self.tokenizer_.item_counts_, dtype=torch.float32)
        log_share = (counts / counts.sum()).log().expand(len(users), -1).clone()
        val, idx = mask_top_k(log_share, slice(0, len(users)), NO_SEEN, allowed, k)
        return _topk_frame(users, val, idx)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Write everything needed to score without the training data into ``directory``."""
        self._check_fitted()
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.model_.save(d)
        self.tokenizer_.save(d / "tokenizer.json")
        self.histories_.write_parquet(d / "histories.parquet")
        self.seen_.write_parquet(d / "seen.parquet")
        if getattr(self, "items_", None) is not None:
            self.items_.write_parquet(d / "items.parquet")
        meta = {
            "params": self.params,
            "history": asdict(self.history_),
            "fitted_at": self.fitted_at_,
            "n_train_events": self.n_train_events_,
            "exclude_seen": self.exclude_seen_,
            "model_version": _file_digest(d / "weights.pt"),
            **getattr(self, "extra_meta_", {}),
        }
        (d / "estimator.json").write_text(json.dumps(meta, indent=2, default=str))
        return d

    @classmethod
    def load(cls, directory: str | Path) -> BehaviorLM:
        d = Path(directory)
        if not (d / "estimator.json").exists():
            raise FileNotFoundError(f"{d} is not a behaviorlm model directory (no estimator.json)")
        meta = json.loads((d / "estimator.json").read_text())
        est = cls(**meta["params"])
        est.model_ = BehaviorTransformer.load(d)
        est.tokenizer_ = ActionTokenizer.load(d / "tokenizer.json")
        est.histories_ = pl.read_parquet(d / "histories.parquet")
        est.seen_ = pl.read_parquet(d / "seen.parquet")
        est.items_ = pl.read_parquet(d / "items.parquet") if (d / "items.parquet").exists() else None
        est.history_ = TrainHistory(**meta["history"])
        est.fitted_at_, est.n_train_events_ = meta["fitted_at"], meta["n_train_events"]
        est.exclude_seen_ = meta.get("exclude_seen", True)
        est.extra_meta_ = {
            k: v
            for k, v in meta.items()
            if k not in ("params", "history", "fitted_at", "n_train_events", "exclude_seen", "model_version")
        }
        est.model_version_ = meta["model_version"]
        return est

    @property
    def model_version(self) -> str:
        return getattr(self, "model_version_", None) or _tensor_digest(self.model_)


NO_SEEN = (np.zeros(0, np.int64), np.zeros(0, np.int64))


def seen_pairs(tok: ActionTokenizer, seen: pl.DataFrame, user_ids: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(row in ``user_ids``, vocabulary index) of every seen (user, item) pair, sorted by row.

    Vectorised so that masking seen items costs one indexing op per batch, for one user or all.
    """
    rows_of = pl.DataFrame(
        {"user_id": pl.Series(user_ids, dtype=seen["user_id"].dtype), "__row": np.arange(len(user_ids))}
    )
    pairs = seen.select("user_id", "item_id").join(rows_of, on="user_id", how="inner")
    rows, cols = pairs["__row"].to_numpy(writable=True), tok.item_index(pairs["item_id"])
    keep = cols >= N_SPECIAL
    order = np.argsort(rows[keep], kind="stable")
    return rows[keep][order], cols[keep][order]


@torch.inference_mode()
def mask_top_k(
    logp: torch.Tensor,
    rows: slice,
    seen: tuple[np.ndarray, np.ndarray],
    allowed: torch.Tensor | None,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` (values, vocabulary indices) of a batch after masking specials, items outside
    ``allowed`` and each row's ``seen`` items (in place); masked entries come back as -inf."""
    logp[:, :N_SPECIAL] = float("-inf")
    if allowed is not None:
        logp[:, ~allowed] = float("-inf")
    seen_rows, seen_cols = seen
    a, b = np.searchsorted(seen_rows, [rows.start, rows.stop])
    logp[torch.from_numpy(seen_rows[a:b] - rows.start), torch.from_numpy(seen_cols[a:b])] = float("-inf")
    return torch.topk(logp, min(k, logp.shape[1] - N_SPECIAL), dim=1)


def _topk_frame(users: list[Any], logp: torch.Tensor, idx: torch.Tensor) -> pl.DataFrame:
    """Rows ``user_id, item_idx, score (probability), rank`` from a top-k of log-probs; masked
    (-inf) slots are dropped, so a user who has seen almost everything gets fewer than k rows."""
    kk = logp.shape[1]
    keep = torch.isfinite(logp).flatten().numpy()
    return pl.DataFrame(
        {
            "user_id": np.repeat(np.array(users, dtype=object), kk)[keep].tolist(),
            "item_idx": idx.flatten().numpy()[keep],
            "score": logp.exp().flatten().numpy()[keep].astype(np.float32),
            "rank": np.tile(np.arange(1, kk + 1, dtype=np.int32), len(users))[keep],
        }
    )


def pad_right(enc: EncodedSequences, rows: slice | np.ndarray, lens: np.ndarray):
    """Right-padded (items, actions, gaps) tensors for some users (a slice or an index array),
    plus each row's last real position."""
    part = lens[rows]
    width = int(part.max())
    starts = enc.offsets[:-1][rows]
    idx = starts[:, None] + np.arange(width)[None, :]
    valid = np.arange(width)[None, :] < part[:, None]
    idx = np.where(valid, idx, 0)
    take = lambda a: torch.from_numpy(np.where(valid, a[idx], PAD))  # noqa: E731
    return take(enc.items), take(enc.actions), take(enc.gaps), torch.from_numpy(part - 1)


def _empty_encoding() -> EncodedSequences:
    z = np.zeros(0, np.int64)
    return EncodedSequences([], np.zeros(1, np.int64), z, z, z)


def _concat(frames: list[pl.DataFrame], tok: ActionTokenizer) -> pl.DataFrame:
    frames = [f for f in frames if f.height]
    if not frames:
        return pl.DataFrame(schema={"user_id": pl.Null, "item_id": pl.Null, "score": pl.Float32, "rank": pl.Int32})
    df = pl.concat(frames, how="vertical_relaxed")
    items = tok.decode_items(df["item_idx"].to_numpy())
    return df.select(pl.col("user_id"), pl.Series("item_id", items.tolist()), "score", "rank")


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def _tensor_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:12]
