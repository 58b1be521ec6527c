"""Propensity scoring: P(purchase | events so far), P(churn), and the baselines it must beat.

Every scorer has the same small interface -- ``fit(train, valid)`` on
:class:`~behaviorlm.propensity.labels.ExampleSet` s and ``decision_function(examples)`` returning a raw
score where higher means more likely -- so one harness compares them and one calibrator turns
any of them into probabilities:

* :class:`HeuristicScorer` -- the seeds' formula, kept as a named baseline.
* :class:`LightGBMScorer` -- gradient boosting on the seed features or the rich features.
* :class:`TransformerScorer` -- the pretrained causal transformer fine-tuned with a
  classification head. Each example's events are followed by a *query* position (item and
  action ``[MASK]``, time-gap bucket = time from the last event to ``as_of``), so the model
  knows how long the user has been silent; the head reads that position's hidden state.
* :class:`ZeroShotScorer` -- no training at all: the language model's own probability of a
  purchase within its next ``n`` actions.

The estimator for production use (:class:`~behaviorlm.propensity.estimator.PropensityModel`),
the BTYD anchors (:mod:`~behaviorlm.propensity.btyd`) and the fusion of features with the
transformer (:mod:`~behaviorlm.propensity.fusion`) build on these.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightgbm as lgb
import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm.auto import tqdm

from behaviorlm.data.events import Events, EventsError
from behaviorlm.data.io import write_text_atomic
from behaviorlm.errors import ConfigurationError
from behaviorlm.nn.model import BehaviorTransformer
from behaviorlm.propensity.features import (
    FeatureScaler,
    feature_matrix,
    heuristic_score,
    rfm_features,
    rich_features,
    seed_features,
)
from behaviorlm.propensity.labels import ExampleSet, parse_duration
from behaviorlm.sequence.tokenizer import (
    MASK,
    N_SPECIAL,
    PAD,
    VALUE_COLUMNS,
    ActionTokenizer,
    EncodedSequences,
    with_request_times,
)

if TYPE_CHECKING:
    from behaviorlm.inference.engine import InferenceEngine
    from behaviorlm.recommender import BehaviorLM

log = logging.getLogger(__name__)
FEATURE_SETS = ("rich", "seed", "rfm")


# --------------------------------------------------------------------------- encoding


def encode_examples(tok: ActionTokenizer, ex: ExampleSet, max_len: int, query: bool = True) -> EncodedSequences:
    """Token sequences of each example's inputs, in example order, newest ``max_len`` tokens.

    With ``query`` a final ``[MASK]`` position carries the gap from the last event to ``as_of``.
    """
    values = [c for c in VALUE_COLUMNS if c in ex.inputs.columns]  # amounts ride in the gap ids (tokenizer)
    df = ex.inputs.select(pl.col("example_id").alias("user_id"), "item_id", "event_type", "timestamp", *values)
    enc = tok.encode(Events.trusted(df, "example inputs"), truncate=False)
    if enc.user_ids != ex.examples["example_id"].to_list():
        raise EventsError("every example needs at least one input event, in example order")
    room = max_len - 1 if query else max_len
    lens = enc.lengths()
    keep_lens = np.minimum(lens, room)
    ends = enc.offsets[1:]
    parts = [np.arange(e - k, e) for e, k in zip(ends, keep_lens, strict=True)]
    idx = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    items, actions, gaps = enc.items[idx], enc.actions[idx], enc.gaps[idx]
    new_lens = keep_lens
    if query:
        last_ts = ex.inputs.group_by("example_id", maintain_order=True).agg(pl.col("timestamp").last())
        silent = ex.examples.join(last_ts, on="example_id", how="left", maintain_order="left").select(
            (pl.col("as_of") - pl.col("timestamp")).dt.total_seconds(fractional=True)
        )
        q_gap = tok.gap_bucket(silent.to_series().to_numpy())
        insert_at = np.cumsum(keep_lens)
        items = np.insert(items, insert_at, MASK)
        actions = np.insert(actions, insert_at, MASK)
        gaps = np.insert(gaps, insert_at, q_gap)
        new_lens = keep_lens + 1
    offsets = np.concatenate([[0], np.cumsum(new_lens)]).astype(np.int64)
    return EncodedSequences(enc.user_ids, offsets, items, actions, gaps)


def _padded(enc: EncodedSequences, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    items, actions, gaps, last = enc.padded(rows)
    return torch.from_numpy(items), torch.from_numpy(actions), torch.from_numpy(gaps), torch.from_numpy(last)


# --------------------------------------------------------------------------- scorers


class HeuristicScorer:
    """The seeds' hand-written formula; nothing is learned."""

    name = "heuristic (seeds)"

    def fit(self, train: ExampleSet, valid: ExampleSet) -> HeuristicScorer:
        return self

    def decision_function(self, ex: ExampleSet) -> np.ndarray:
        return heuristic_score(seed_features(ex))


class LightGBMScorer:
    """Gradient boosting on hand-made features, early-stopped on validation log-loss."""

    feature_names_: list[str]  # learned by the first call of _x (fit)

    def __init__(
        self,
        features: str = "rich",
        items: pl.DataFrame | None = None,
        n_estimators: int = 2000,
        learning_rate: float = 0.03,
        num_leaves: int = 15,
        min_child_samples: int = 20,
        seed: int = 0,
        drop: tuple[str, ...] = (),
        action: str = "purchase",
    ):
        if features not in FEATURE_SETS:
            raise ConfigurationError(f"features must be one of {FEATURE_SETS}, got {features!r}")
        self.features, self.items, self.seed, self.drop = features, items, seed, tuple(drop)
        self.action = action
        self.name = f"LightGBM ({features} features)"
        self.params = {
            "objective": "binary",
            "learning_rate": learning_rate,
            "num_leaves": num_leaves,
            "min_child_samples": min_child_samples,
            "feature_fraction": 0.8,
            "bagging_fraction": 0.8,
            "bagging_freq": 1,
            "lambda_l2": 1.0,
            "seed": seed,
            "deterministic": True,
            "force_row_wise": True,
            "num_threads": os.cpu_count() or 1,
            "verbose": -1,
        }
        self.n_estimators = n_estimators

    def frame(self, ex: ExampleSet) -> pl.DataFrame:
        """The feature table (``example_id`` first) this scorer reads."""
        if self.features == "rich":
            return rich_features(ex, self.items)
        return rfm_features(ex, self.action) if self.features == "rfm" else seed_features(ex)

    def _x(self, ex: ExampleSet) -> np.ndarray:
        frame = self.frame(ex)
        x, cols = feature_matrix(frame.drop(self.drop, strict=False))
        if hasattr(self, "feature_names_") and cols != self.feature_names_:
            missing = sorted(set(self.feature_names_) - set(cols))
            raise EventsError(f"feature columns differ from training; missing: {missing}")
        self.feature_names_ = cols
        return x

    def fit(self, train: ExampleSet, valid: ExampleSet) -> LightGBMScorer:
        xt, xv = self._x(train), self._x(valid)
        dtrain = lgb.Dataset(xt, train.labels, feature_name=self.feature_names_, free_raw_data=False)
        dvalid = lgb.Dataset(xv, valid.labels, reference=dtrain)
        self.booster_ = lgb.train(
            self.params,
            dtrain,
            num_boost_round=self.n_estimators,
            valid_sets=[dvalid],
            callbacks=[lgb.early_stopping(100, verbose=False)],
        )
        self.best_iteration_ = self.booster_.best_iteration
        return self

    def decision_function(self, ex: ExampleSet) -> np.ndarray:
        return np.asarray(self.booster_.predict(self._x(ex), num_iteration=self.best_iteration_))

    def feature_importance(self) -> pl.DataFrame:
        gain = self.booster_.feature_importance("gain", iteration=self.best_iteration_)
        return pl.DataFrame({"feature": self.feature_names_, "gain": gain}).sort("gain", descending=True)

    def save(self, directory: Path) -> None:
        self.booster_.save_model(str(directory / "lightgbm.txt"), num_iteration=self.best_iteration_)
        meta = {"features": self.features, "feature_names": self.feature_names_, "best_iteration": self.best_iteration_}
        meta |= {"drop": list(self.drop), "action": self.action}
        (directory / "lightgbm.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory: Path, items: pl.DataFrame | None = None) -> LightGBMScorer:
        meta = json.loads((directory / "lightgbm.json").read_text())
        s = cls(meta["features"], items, drop=tuple(meta.get("drop", ())), action=meta.get("action", "purchase"))
        s.booster_ = lgb.Booster(model_file=str(directory / "lightgbm.txt"))
        s.feature_names_, s.best_iteration_ = meta["feature_names"], meta["best_iteration"]
        return s


class PropensityHead(nn.Module):
    """The pretrained transformer plus a read-out of the query position.

    ``n_features`` > 0 makes it a *joint fusion* model (nuFormer-style): the hand-made features
    pass through a small MLP and are read out beside the hidden state, so the whole network is
    fine-tuned with them. ``n_outputs`` > 1 adds auxiliary targets (multi-task fine-tuning:
    output 0 is the main target, the rest are trained but not served).
    """

    def __init__(self, backbone: BehaviorTransformer, n_features: int = 0, n_outputs: int = 1):
        super().__init__()
        dim = backbone.config.dim
        self.backbone, self.n_features, self.n_outputs = backbone, n_features, n_outputs
        self.features = nn.Sequential(nn.Linear(n_features, dim), nn.GELU(), nn.LayerNorm(dim)) if n_features else None
        self.head = nn.Linear(2 * dim if n_features else dim, n_outputs)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def _read(self, h: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        if self.features is not None:
            assert x is not None, "a joint fusion head needs its features"
            h = torch.cat([h, self.features(x)], -1)
        return self.head(h)

    def forward_all(self, items, actions, gaps, last, x: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n_outputs) logits."""
        return self._read(self.backbone.hidden_states(items, actions, gaps, last), x)

    def forward(self, items, actions, gaps, last, x: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) logits of the main target."""
        return self.forward_all(items, actions, gaps, last, x)[:, 0]

    def forward_with_lm(self, items, actions, gaps, last, x=None) -> tuple[torch.Tensor, torch.Tensor]:
        """All logits plus the next-action LM loss over the same sequences.

        Keeping the pretraining objective alive while fine-tuning regularises the body on
        small labelled sets (the query position and padding are not LM targets).
        """
        h = self.backbone(items, actions, gaps)
        logits = self._read(h[torch.arange(len(h)), last], x)
        target = actions[:, 1:].masked_fill(actions[:, 1:] == MASK, PAD)
        a_logits = self.backbone.action_logits(h[:, :-1])
        lm = F.cross_entropy(a_logits.reshape(-1, a_logits.shape[-1]), target.reshape(-1), ignore_index=PAD)
        return logits, lm


@dataclass
class _Encoded:
    """One example set as the fine-tuning loop reads it: token sequences, scaled features
    (joint fusion) and the label matrix (main target first, then the auxiliary ones)."""

    seqs: EncodedSequences
    x: torch.Tensor | None
    y: torch.Tensor

    def batch(
        self, rows: np.ndarray
    ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor | None]:
        return _padded(self.seqs, rows), None if self.x is None else self.x[torch.from_numpy(rows)]


class TransformerScorer:
    """Fine-tune the pretrained transformer end to end with a binary classification head.

    Lower learning rate on the pretrained body than on the new head; early stopping on
    validation ROC-AUC (of the main target) with the best epoch's weights restored. On Taobao
    (2.6k examples) a body rate of 3e-4 peaks after one epoch and then overfits; 3e-5 climbs
    steadily to the same or better validation AUC. ``lm_weight`` > 0 keeps the next-action LM
    loss as a regulariser (measured in benchmarks/RESULTS.md section 5: it did not help on Taobao).

    Two extensions, each measured in section 19:

    * ``features="rich"`` -- joint fusion: the rich features enter the head (:class:`PropensityHead`).
    * ``aux_targets`` -- multi-task: extra label columns of the examples (``aux_*``, made by the
      split functions' ``aux`` argument) trained beside the main one with weight ``aux_weight``;
      with ``lm_weight`` > 0 the next action is a third task.
    """

    def __init__(
        self,
        backbone: BehaviorLM,
        epochs: int = 20,
        batch_size: int = 64,
        lr: float = 3e-5,
        head_lr: float = 1e-3,
        weight_decay: float = 0.01,
        patience: int = 4,
        lm_weight: float = 0.0,
        seed: int = 0,
        progress: bool = False,
        max_time_s: float | None = None,
        features: str | None = None,
        items: pl.DataFrame | None = None,
        aux_targets: tuple[str, ...] | None = (),
        aux_weight: float = 0.5,
    ):
        backbone.engine  # noqa: B018 - fails clearly if the backbone is not fitted
        if features not in (None, "rich"):
            raise ConfigurationError(f"joint fusion features must be None or 'rich', got {features!r}")
        self.lm_weight, self.features, self.items = lm_weight, features, items
        self.aux_targets_given, self.aux_weight = aux_targets, aux_weight
        self.aux_targets: tuple[str, ...] = tuple(aux_targets or ())
        self.backbone, self.tokenizer_ = backbone, backbone.tokenizer_
        self.epochs, self.batch_size, self.lr, self.head_lr = epochs, batch_size, lr, head_lr
        self.weight_decay, self.patience, self.seed = weight_decay, patience, seed
        self.progress, self.max_time_s = progress, max_time_s
        self.name = _transformer_name(features, self.aux_targets, lm_weight)

    def _optimizer(self, net: PropensityHead) -> torch.optim.Optimizer:
        body = list(net.backbone.parameters())
        fresh = [p for n, p in net.named_parameters() if not n.startswith("backbone.")]
        return torch.optim.AdamW(
            [{"params": body, "lr": self.lr}, {"params": fresh, "lr": self.head_lr}], weight_decay=self.weight_decay
        )

    def fit(self, train: ExampleSet, valid: ExampleSet) -> TransformerScorer:
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        if self.aux_targets_given is None:  # every auxiliary label the examples carry
            self.aux_targets = tuple(c for c in train.examples.columns if c.startswith("aux_"))
            if not self.aux_targets:
                raise ConfigurationError("multi-task fine-tuning needs auxiliary labels: build the split with aux=...")
            self.name = _transformer_name(self.features, self.aux_targets, self.lm_weight)
        missing = [c for c in self.aux_targets if c not in train.examples.columns]
        if missing:
            raise ConfigurationError(f"auxiliary targets {missing} are not columns of the examples")
        train_frame = rich_features(train, self.items) if self.features else None
        self.scaler_ = FeatureScaler().fit(train_frame) if train_frame is not None else None
        n_features = len(self.scaler_.names_) if self.scaler_ is not None else 0
        self.net_ = PropensityHead(copy.deepcopy(self.backbone.model_), n_features, 1 + len(self.aux_targets))
        data, vdata, vy = self._encode(train, labels=True, frame=train_frame), self._encode(valid), valid.labels
        best: tuple[float, dict[str, Any] | None] = (-1.0, None)
        opt, bad, t0 = self._optimizer(self.net_), 0, time.perf_counter()
        self.history_: list[dict[str, float]] = []
        for epoch in tqdm(range(self.epochs), desc="fine-tune", disable=not self.progress):
            loss = self._epoch(data, opt, rng)
            auc = roc_auc_score(vy, self._logits(vdata)) if 0 < vy.sum() < len(vy) else float("nan")
            self.history_.append({"epoch": epoch, "loss": loss, "val_auc": float(auc)})
            log.info("fine-tune epoch %d loss=%.4f val_auc=%.4f", epoch, loss, auc)
            if auc > best[0]:
                best, bad = (auc, copy.deepcopy(self.net_.state_dict())), 0
            else:
                bad += 1
            over_time = self.max_time_s is not None and time.perf_counter() - t0 > self.max_time_s
            if bad >= self.patience or over_time:
                break
        if best[1] is not None:
            self.net_.load_state_dict(best[1])
        self.best_val_auc_ = best[0]
        return self

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.binary_cross_entropy_with_logits(logits[:, 0], y[:, 0])
        if logits.shape[1] > 1:
            loss = loss + self.aux_weight * F.binary_cross_entropy_with_logits(logits[:, 1:], y[:, 1:])
        return loss

    def _epoch(self, data: _Encoded, opt, rng) -> float:
        self.net_.train()
        order, total = rng.permutation(len(data.seqs)), 0.0
        for s in range(0, len(order), self.batch_size):
            rows = order[s : s + self.batch_size]
            seqs, x = data.batch(rows)
            if self.lm_weight > 0:
                logits, lm = self.net_.forward_with_lm(*seqs, x)
                loss = self._loss(logits, data.y[rows]) + self.lm_weight * lm
            else:
                loss = self._loss(self.net_.forward_all(*seqs, x), data.y[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.net_.parameters(), 1.0)
            opt.step()
            total += loss.item() * len(rows)
        return total / max(1, len(order))

    @torch.inference_mode()
    def _batched(self, data: _Encoded, fn, batch_size: int = 256) -> torch.Tensor:
        """``fn(items, actions, gaps, last, x)`` over all sequences in batches, in eval mode."""
        self.net_.eval()
        rows = np.arange(len(data.seqs))
        parts = []
        for s in range(0, len(rows), batch_size):
            seqs, x = data.batch(rows[s : s + batch_size])
            parts.append(fn(*seqs, x))
        return torch.cat(parts)

    def _logits(self, data: _Encoded) -> np.ndarray:
        return self._batched(data, self.net_).numpy().astype(np.float64) if len(data.seqs) else np.zeros(0)

    def _encode(self, ex: ExampleSet, labels: bool = False, frame: pl.DataFrame | None = None) -> _Encoded:
        """``frame``: the rich features of ``ex`` when the caller has them already (fit)."""
        seqs = encode_examples(self.tokenizer_, ex, self.net_.backbone.config.max_len)
        x = None
        if self.scaler_ is not None:
            x = torch.from_numpy(self.scaler_.transform(frame if frame is not None else rich_features(ex, self.items)))
        y = torch.zeros(len(ex), 1 + len(self.aux_targets))
        if labels:
            cols = [ex.examples["label"], *(ex.examples[c] for c in self.aux_targets)]
            y = torch.tensor(np.stack([c.to_numpy() for c in cols], 1), dtype=torch.float32)
        return _Encoded(seqs, x, y)

    def decision_function(self, ex: ExampleSet) -> np.ndarray:
        return self._logits(self._encode(ex))

    def embeddings(self, ex: ExampleSet) -> np.ndarray:
        """Hidden state at the query position: the fine-tuned user representation."""
        data = self._encode(ex)
        if not len(data.seqs):
            return np.zeros((0, self.net_.backbone.config.dim))
        return self._batched(data, lambda i, a, g, last, x: self.net_.backbone.hidden_states(i, a, g, last)).numpy()

    def save(self, directory: Path) -> None:
        self.net_.backbone.save(directory / "backbone")
        self.tokenizer_.save(directory / "backbone" / "tokenizer.json")
        torch.save(
            {k: v for k, v in self.net_.state_dict().items() if not k.startswith("backbone.")}, directory / "head.pt"
        )
        meta = {
            "n_features": self.net_.n_features,
            "n_outputs": self.net_.n_outputs,
            "features": self.features,
            "aux_targets": list(self.aux_targets),
            "scaler": self.scaler_.to_dict() if self.scaler_ is not None else None,
            "name": self.name,
        }
        write_text_atomic(json.dumps(meta), directory / "head.json")

    @classmethod
    def load(cls, directory: Path, items: pl.DataFrame | None = None) -> TransformerScorer:
        s = cls.__new__(cls)
        meta_path = directory / "head.json"
        meta: dict[str, Any] = (
            json.loads(meta_path.read_text()) if meta_path.exists() else {"n_features": 0, "n_outputs": 1}
        )
        s.tokenizer_ = ActionTokenizer.load(directory / "backbone" / "tokenizer.json")
        s.features, s.items = meta.get("features"), items
        s.aux_targets = tuple(meta.get("aux_targets", ()))
        s.scaler_ = FeatureScaler.from_dict(meta["scaler"]) if meta.get("scaler") else None
        s.name = meta.get("name", cls.__name__)
        s.net_ = PropensityHead(BehaviorTransformer.load(directory / "backbone"), meta["n_features"], meta["n_outputs"])
        state = torch.load(directory / "head.pt", weights_only=True)
        if "weight" in state:  # saved before joint fusion: the linear head alone
            state = {f"head.{k}": v for k, v in state.items()}
        s.net_.load_state_dict(state, strict=False)
        return s


def _transformer_name(features: str | None, aux: tuple[str, ...], lm_weight: float) -> str:
    if features:
        return f"joint fusion: transformer fine-tuned with {features} features"
    if aux:
        tasks = ", ".join(aux) + (" + next action" if lm_weight > 0 else "")
        return f"transformer, multi-task ({tasks})"
    return "transformer (fine-tuned)"


class GapHeadScorer:
    """P(the next ``action`` event falls in ``[as_of, as_of + horizon)``) from a pretrained gap
    head (:mod:`behaviorlm.nn.gap_head`): no labels, no fine-tuning -- *when*, as the language
    model learned it, given that nothing happened between the last input event and ``as_of``.
    A single-action log (CDNOW) has a real pretraining task here where the next-action one is void."""

    def __init__(self, backbone: BehaviorLM, horizon: str | timedelta, action: str = "purchase"):
        if backbone.model_.gap_head is None:
            raise ConfigurationError(
                "propensity method 'next_gap' needs a model pretrained with a gap head",
                cli_hint="train the --model with --gap-head",
            )
        self.engine, self.action = backbone.engine, action
        self.horizon_s = parse_duration(horizon).total_seconds()
        self.engine.action_id(action)  # an unknown action is refused now, not at scoring
        self.name = f"zero-shot gap head P({action} within {parse_duration(horizon)})"

    def fit(self, train: ExampleSet, valid: ExampleSet) -> GapHeadScorer:
        return self

    def decision_function(self, ex: ExampleSet) -> np.ndarray:
        return examples_within(self.engine, ex, (self.horizon_s,), self.action)[:, 0]


def examples_within(
    engine: InferenceEngine, ex: ExampleSet, horizons_s: tuple[float, ...], action: str | None
) -> np.ndarray:
    """(examples, horizons): the gap head's P(next ``action`` event within each horizon after
    the example's ``as_of`` | silence since its last input event), in example order."""
    values = [c for c in VALUE_COLUMNS if c in ex.inputs.columns]
    df = ex.inputs.select(pl.col("example_id").alias("user_id"), "item_id", "event_type", "timestamp", *values)
    enc = engine.encode(Events.trusted(df, "example inputs"))
    if enc.user_ids != ex.examples["example_id"].to_list():
        raise EventsError("every example needs at least one input event, in example order")
    enc = with_request_times(enc, dict(zip(enc.user_ids, ex.examples["as_of"].to_list(), strict=True)))
    cols = [engine.within(enc, h, action) for h in horizons_s]
    return np.stack(cols, 1).astype(np.float64) if cols else np.zeros((len(enc), 0))


class ZeroShotScorer:
    """P(``action`` within the language model's next ``n_actions`` steps), no fine-tuning.

    Estimated without bias and with low variance by sampling continuations *conditioned on not
    purchasing* and averaging ``prod_t (1 - P(purchase at step t))`` -- the exact probability
    of no purchase along each sampled path -- over ``n_samples`` paths.
    """

    def __init__(
        self, backbone: BehaviorLM, action: str = "purchase", n_actions: int = 5, n_samples: int = 16, seed: int = 0
    ):
        self.engine = backbone.engine
        self.backbone, self.n_actions, self.n_samples, self.seed = backbone, n_actions, n_samples, seed
        self.action_id = self.engine.action_id(action)
        if backbone.tokenizer_.actions_ == [action]:
            raise EventsError(
                f"zero-shot propensity needs more than one action type: every event is {action!r}, "
                "so the language model's P(next action) carries no information"
            )
        self.name = f"zero-shot LM P({action} in next {n_actions})"

    def fit(self, train: ExampleSet, valid: ExampleSet) -> ZeroShotScorer:
        return self

    @torch.inference_mode()
    def decision_function(self, ex: ExampleSet, batch_users: int = 32) -> np.ndarray:
        room = self.engine.max_len - self.n_actions + 1
        enc = encode_examples(self.engine.tokenizer, ex, room, query=False)
        gen = torch.Generator().manual_seed(self.seed)
        out = []
        for s in range(0, len(enc), batch_users):
            rows = np.repeat(np.arange(s, min(s + batch_users, len(enc))), self.n_samples)
            out.append(self._p_no_action(*_padded(enc, rows), gen).view(-1, self.n_samples).mean(1))
        p_none = torch.cat(out).numpy() if out else np.zeros(0)
        return 1.0 - p_none.astype(np.float64)

    def _p_no_action(self, items, actions, gaps, last, gen) -> torch.Tensor:
        pad = torch.zeros(len(items), self.n_actions, dtype=items.dtype)
        items, actions, gaps = (torch.cat([t, pad], 1) for t in (items, actions, gaps))
        rows, log_none = torch.arange(len(items)), torch.zeros(len(items))
        for step in range(self.n_actions):
            width = int(last.max()) + 1
            h, a_logp = self.engine.heads_from_tensors(items[:, :width], actions[:, :width], gaps[:, :width], last)
            log_none += torch.log1p(-a_logp[:, self.action_id].exp().clamp(max=1 - 1e-6))
            if step == self.n_actions - 1:
                break
            a_logits = a_logp.clone()
            a_logits[:, self.action_id] = float("-inf")
            # a path the model is sure ends in a purchase already has weight ~0: continue it anyhow
            a_logits[~torch.isfinite(a_logits).any(1), N_SPECIAL:] = 0.0
            a = torch.multinomial(torch.softmax(a_logits, -1), 1, generator=gen).squeeze(1)
            i = torch.multinomial(self.engine.item_logp_given(h, a).exp(), 1, generator=gen).squeeze(1)
            items[rows, last + 1], actions[rows, last + 1], gaps[rows, last + 1] = i, a, gaps[rows, last]
            last = last + 1
        return log_none.exp()
