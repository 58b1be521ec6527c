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

:class:`PropensityModel` is the estimator for production use: fit on rolling windows that end
at the data's last event, calibrate on held-out users, score everyone "as of now", save/load.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
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

from behaviorlm.data.events import Events, EventsError, as_events
from behaviorlm.data.io import write_text_atomic
from behaviorlm.errors import ConfigurationError, ModelFormatError
from behaviorlm.nn.model import BehaviorTransformer
from behaviorlm.propensity.calibration import Calibrator
from behaviorlm.propensity.features import feature_matrix, heuristic_score, rich_features, seed_features
from behaviorlm.propensity.labels import ExampleSet, Target, parse_duration, scoring_examples, training_windows
from behaviorlm.sequence.tokenizer import MASK, N_SPECIAL, PAD, ActionTokenizer, EncodedSequences

if TYPE_CHECKING:
    from behaviorlm.recommender import BehaviorLM

log = logging.getLogger(__name__)
METHODS = ("heuristic", "lightgbm_seed", "lightgbm", "transformer", "zero_shot")


# --------------------------------------------------------------------------- encoding


def encode_examples(tok: ActionTokenizer, ex: ExampleSet, max_len: int, query: bool = True) -> EncodedSequences:
    """Token sequences of each example's inputs, in example order, newest ``max_len`` tokens.

    With ``query`` a final ``[MASK]`` position carries the gap from the last event to ``as_of``.
    """
    df = ex.inputs.select(pl.col("example_id").alias("user_id"), "item_id", "event_type", "timestamp")
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
    ):
        if features not in ("rich", "seed"):
            raise ConfigurationError(f"features must be 'rich' or 'seed', got {features!r}")
        self.features, self.items, self.seed, self.drop = features, items, seed, tuple(drop)
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

    def _x(self, ex: ExampleSet) -> np.ndarray:
        frame = rich_features(ex, self.items) if self.features == "rich" else seed_features(ex)
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
        meta["drop"] = list(self.drop)
        (directory / "lightgbm.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory: Path, items: pl.DataFrame | None = None) -> LightGBMScorer:
        meta = json.loads((directory / "lightgbm.json").read_text())
        s = cls(meta["features"], items, drop=tuple(meta.get("drop", ())))
        s.booster_ = lgb.Booster(model_file=str(directory / "lightgbm.txt"))
        s.feature_names_, s.best_iteration_ = meta["feature_names"], meta["best_iteration"]
        return s


class PropensityHead(nn.Module):
    """The pretrained transformer plus a linear read-out of the query position."""

    def __init__(self, backbone: BehaviorTransformer):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.dim, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, items, actions, gaps, last) -> torch.Tensor:
        return self.head(self.backbone(items, actions, gaps, last=last)).squeeze(-1)

    def forward_with_lm(self, items, actions, gaps, last) -> tuple[torch.Tensor, torch.Tensor]:
        """Classification logits plus the next-action LM loss over the same sequences.

        Keeping the pretraining objective alive while fine-tuning regularises the body on
        small labelled sets (the query position and padding are not LM targets).
        """
        h = self.backbone(items, actions, gaps)
        logits = self.head(h[torch.arange(len(h)), last]).squeeze(-1)
        target = actions[:, 1:].masked_fill(actions[:, 1:] == MASK, PAD)
        a_logits = self.backbone.action_logits(h[:, :-1])
        lm = F.cross_entropy(a_logits.reshape(-1, a_logits.shape[-1]), target.reshape(-1), ignore_index=PAD)
        return logits, lm


class TransformerScorer:
    """Fine-tune the pretrained transformer end to end with a binary classification head.

    Lower learning rate on the pretrained body than on the new head; early stopping on
    validation ROC-AUC with the best epoch's weights restored. On Taobao (2.6k examples) a body
    rate of 3e-4 peaks after one epoch and then overfits; 3e-5 climbs steadily to the same or
    better validation AUC. ``lm_weight`` > 0 keeps the next-action LM loss as a regulariser
    (measured in benchmarks/RESULTS.md section 5: it did not help on Taobao).
    """

    name = "transformer (fine-tuned)"

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
    ):
        backbone.engine  # noqa: B018 - fails clearly if the backbone is not fitted
        self.lm_weight = lm_weight
        self.backbone, self.tokenizer_ = backbone, backbone.tokenizer_
        self.epochs, self.batch_size, self.lr, self.head_lr = epochs, batch_size, lr, head_lr
        self.weight_decay, self.patience, self.seed = weight_decay, patience, seed
        self.progress, self.max_time_s = progress, max_time_s

    def _optimizer(self, net: PropensityHead) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            [
                {"params": net.backbone.parameters(), "lr": self.lr},
                {"params": net.head.parameters(), "lr": self.head_lr},
            ],
            weight_decay=self.weight_decay,
        )

    def fit(self, train: ExampleSet, valid: ExampleSet) -> TransformerScorer:
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        self.net_ = PropensityHead(copy.deepcopy(self.backbone.model_))
        enc, y = self._encode(train), torch.tensor(train.labels, dtype=torch.float32)
        venc, vy = self._encode(valid), valid.labels
        best: tuple[float, dict[str, Any] | None] = (-1.0, None)
        opt, bad, t0 = self._optimizer(self.net_), 0, time.perf_counter()
        self.history_: list[dict[str, float]] = []
        for epoch in tqdm(range(self.epochs), desc="fine-tune", disable=not self.progress):
            loss = self._epoch(enc, y, opt, rng)
            auc = roc_auc_score(vy, self._logits(venc)) if 0 < vy.sum() < len(vy) else float("nan")
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

    def _epoch(self, enc: EncodedSequences, y: torch.Tensor, opt, rng) -> float:
        self.net_.train()
        order, total = rng.permutation(len(enc)), 0.0
        for s in range(0, len(order), self.batch_size):
            rows = order[s : s + self.batch_size]
            if self.lm_weight > 0:
                logits, lm = self.net_.forward_with_lm(*_padded(enc, rows))
                loss = F.binary_cross_entropy_with_logits(logits, y[rows]) + self.lm_weight * lm
            else:
                loss = F.binary_cross_entropy_with_logits(self.net_(*_padded(enc, rows)), y[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.net_.parameters(), 1.0)
            opt.step()
            total += loss.item() * len(rows)
        return total / max(1, len(order))

    @torch.inference_mode()
    def _batched(self, enc: EncodedSequences, fn, batch_size: int = 256) -> torch.Tensor:
        """``fn(items, actions, gaps, last)`` over all sequences in batches, in eval mode."""
        self.net_.eval()
        rows = np.arange(len(enc))
        return torch.cat([fn(*_padded(enc, rows[s : s + batch_size])) for s in range(0, len(rows), batch_size)])

    def _logits(self, enc: EncodedSequences) -> np.ndarray:
        return self._batched(enc, self.net_).numpy().astype(np.float64) if len(enc) else np.zeros(0)

    def _encode(self, ex: ExampleSet) -> EncodedSequences:
        return encode_examples(self.tokenizer_, ex, self.net_.backbone.config.max_len)

    def decision_function(self, ex: ExampleSet) -> np.ndarray:
        return self._logits(self._encode(ex))

    def embeddings(self, ex: ExampleSet) -> np.ndarray:
        """Hidden state at the query position: the fine-tuned user representation."""
        enc = self._encode(ex)
        if not len(enc):
            return np.zeros((0, self.net_.backbone.config.dim))
        return self._batched(enc, self.net_.backbone).numpy()

    def save(self, directory: Path) -> None:
        self.net_.backbone.save(directory / "backbone")
        self.tokenizer_.save(directory / "backbone" / "tokenizer.json")
        torch.save(self.net_.head.state_dict(), directory / "head.pt")

    @classmethod
    def load(cls, directory: Path) -> TransformerScorer:
        s = cls.__new__(cls)
        s.tokenizer_ = ActionTokenizer.load(directory / "backbone" / "tokenizer.json")
        s.net_ = PropensityHead(BehaviorTransformer.load(directory / "backbone"))
        s.net_.head.load_state_dict(torch.load(directory / "head.pt", weights_only=True))
        return s


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


def make_scorer(method: str, backbone: BehaviorLM | None = None, items: pl.DataFrame | None = None, **kw: Any):
    """Build a scorer by name (see ``METHODS``)."""
    if method == "heuristic":
        return HeuristicScorer()
    if method in ("lightgbm", "lightgbm_seed"):
        return LightGBMScorer("seed" if method == "lightgbm_seed" else "rich", items, **kw)
    if method in ("transformer", "zero_shot"):
        if backbone is None:
            raise ConfigurationError(
                f"propensity method {method!r} needs a pretrained model",
                hint="pass backbone=BehaviorLM.load(dir)",
                cli_hint="pass --model DIR",
            )
        return TransformerScorer(backbone, **kw) if method == "transformer" else ZeroShotScorer(backbone, **kw)
    raise ConfigurationError(f"unknown propensity method {method!r}; choose from {METHODS}")


# --------------------------------------------------------------------------- estimator


class PropensityModel:
    """Calibrated P(target within ``horizon`` | events so far), fit on rolling windows.

    ``fit`` builds training examples at cutoffs ``end - horizon - j * stride`` (so every label
    window is complete), holds out ``valid_frac`` of users for early stopping and calibration,
    fits the scorer, then the calibrator. ``predict`` scores every user with events before
    ``at`` (default: just after the last event) and returns ``user_id, propensity``.
    """

    def __init__(
        self,
        method: str = "transformer",
        target: Target = "conversion",
        action: str = "purchase",
        horizon: str = "1d",
        n_windows: int = 3,
        stride: str | None = None,
        valid_frac: float = 0.2,
        calibration: str = "auto",
        seed: int = 0,
        scorer_params: dict[str, Any] | None = None,
    ):
        if method not in METHODS:
            raise ConfigurationError(f"unknown propensity method {method!r}; choose from {METHODS}")
        parse_duration(horizon)
        self.params = {k: v for k, v in locals().items() if k != "self"}

    def fit(self, events: Events | Any, backbone: BehaviorLM | None = None, items: Any = None) -> PropensityModel:
        ev, p = as_events(events), self.params
        self.items_ = items if items is None or isinstance(items, pl.DataFrame) else pl.DataFrame(items)
        end = ev.end + timedelta(microseconds=1)
        train, valid, cutoffs = training_windows(
            ev, end, p["horizon"], p["target"], p["action"], p["n_windows"], p["stride"], p["valid_frac"], p["seed"]
        )
        extra = dict(p["scorer_params"] or {})
        if p["method"] in ("lightgbm", "lightgbm_seed", "transformer"):
            extra.setdefault("seed", p["seed"])
        self.scorer_ = make_scorer(p["method"], backbone, self.items_, **extra).fit(train, valid)
        raw_valid = self.scorer_.decision_function(valid)
        self.calibrator_ = Calibrator(p["calibration"], p["seed"]).fit(raw_valid, valid.labels)
        self.train_info_ = {
            "cutoffs": [str(c) for c in cutoffs],
            "n_train": len(train),
            "n_valid": len(valid),
            "train_positive_rate": train.positive_rate,
            "calibration": self.calibrator_.method_,
            # optimistic: the same users chose the early-stopping epoch and fit the calibrator
            "valid_roc_auc": float(roc_auc_score(valid.labels, raw_valid)),
        }
        return self

    def predict_proba(self, examples: ExampleSet) -> np.ndarray:
        return self.calibrator_.predict(self.scorer_.decision_function(examples))

    def predict(self, events: Events | Any, at: Any = None, column: str = "propensity") -> pl.DataFrame:
        ex = scoring_examples(events, at)
        return ex.examples.select("user_id", "as_of").with_columns(pl.Series(column, self.predict_proba(ex)))

    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if not hasattr(self.scorer_, "save"):
            raise ConfigurationError(f"method {self.params['method']!r} has no learned state worth saving")
        self.scorer_.save(d)
        meta = {"params": self.params, "calibrator": self.calibrator_.to_dict(), "train_info": self.train_info_}
        write_text_atomic(
            json.dumps(meta, indent=2, default=str), d / "propensity.json"
        )  # written last: marks complete
        return d

    @classmethod
    def load(cls, directory: str | Path, items: pl.DataFrame | None = None) -> PropensityModel:
        d = Path(directory)
        if not (d / "propensity.json").exists():
            raise ModelFormatError(f"{d} is not a saved propensity model (no propensity.json)")
        meta = json.loads((d / "propensity.json").read_text())
        m = cls(**meta["params"])
        m.items_ = items
        method = meta["params"]["method"]
        m.scorer_ = TransformerScorer.load(d) if method == "transformer" else LightGBMScorer.load(d, items)
        m.calibrator_, m.train_info_ = Calibrator.from_dict(meta["calibrator"]), meta["train_info"]
        return m


def user_propensities(
    events: Events | Any,
    backbone: BehaviorLM | None = None,
    items: Any = None,
    method: str = "transformer",
    horizon: str = "1d",
    n_windows: int = 3,
    at: Any = None,
    seed: int = 0,
) -> tuple[pl.DataFrame, dict[str, PropensityModel]]:
    """``user_id, as_of, propensity, churn_propensity`` for every user, and the two fitted models."""
    targets: tuple[tuple[Target, str], ...] = (("conversion", "propensity"), ("churn", "churn_propensity"))
    tables: list[pl.DataFrame] = []
    models: dict[str, PropensityModel] = {}
    for target, column in targets:
        pm = PropensityModel(method, target, horizon=horizon, n_windows=n_windows, seed=seed).fit(
            events, backbone, items
        )
        scores = pm.predict(events, at=at, column=column)
        tables.append(scores if not tables else scores.drop("as_of"))
        models[column] = pm
    table = tables[0]
    for other in tables[1:]:
        table = table.join(other, on="user_id")
    return table, models
