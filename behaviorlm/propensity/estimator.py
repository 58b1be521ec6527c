"""The propensity estimator for production: pick a method, fit it on rolling windows, calibrate.

:func:`make_scorer` builds any scorer by name; :class:`PropensityModel` fits one on rolling
windows that end at the data's last event, calibrates it on held-out users, scores everyone
"as of now" and saves/loads. ``method="auto"`` (the CLI default) fits each applicable candidate
and keeps the one with the best ROC-AUC on validation users that neither trained it nor chose its
early-stopping point (:func:`select_method`), and says why in ``train_info_["selection"]``.
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import polars as pl
from sklearn.metrics import roc_auc_score

from behaviorlm.data.events import Events, EventsError, as_events
from behaviorlm.data.io import write_text_atomic
from behaviorlm.errors import ConfigurationError, ModelFormatError
from behaviorlm.propensity.btyd import BTYDScorer
from behaviorlm.propensity.calibration import Calibrator
from behaviorlm.propensity.fusion import LateFusionScorer
from behaviorlm.propensity.labels import (
    ExampleSet,
    Target,
    default_horizon,
    parse_duration,
    scoring_examples,
    too_few_positives,
    training_windows,
    user_halves,
)
from behaviorlm.propensity.scorers import (
    GapHeadScorer,
    HeuristicScorer,
    LightGBMScorer,
    TransformerScorer,
    ZeroShotScorer,
)

if TYPE_CHECKING:
    from behaviorlm.recommender import BehaviorLM

log = logging.getLogger(__name__)
METHODS = (
    "auto",
    "heuristic",
    "lightgbm_seed",
    "lightgbm_rfm",
    "lightgbm",
    "bgnbd",
    "paretonbd",
    "transformer",
    "zero_shot",
    "next_gap",
    "fusion",
    "joint",
    "multitask",
)
NEEDS_BACKBONE = frozenset({"transformer", "zero_shot", "next_gap", "fusion", "joint", "multitask"})
#: what ``auto`` tries, cheapest first; the evidence for this list is benchmarks/RESULTS.md section 19
AUTO_CANDIDATES = ("lightgbm", "bgnbd", "fusion", "transformer")
_SEEDED = frozenset({"lightgbm", "lightgbm_seed", "lightgbm_rfm", "transformer", "fusion", "joint", "multitask"})


def make_scorer(
    method: str,
    backbone: BehaviorLM | None = None,
    items: pl.DataFrame | None = None,
    *,
    target: Target = "conversion",
    horizon: str | timedelta = "1d",
    action: str = "purchase",
    **kw: Any,
):
    """Build a scorer by name (see ``METHODS``, ``auto`` excepted); ``target``, ``horizon`` and
    ``action`` reach the scorers that need them (BTYD, RFM features, zero-shot)."""
    if method == "heuristic":
        return HeuristicScorer()
    if method in ("lightgbm", "lightgbm_seed", "lightgbm_rfm"):
        features = {"lightgbm": "rich", "lightgbm_seed": "seed", "lightgbm_rfm": "rfm"}[method]
        return LightGBMScorer(features, items, action=action, **kw)
    if method in ("bgnbd", "paretonbd"):
        return BTYDScorer(method, horizon, target, action)  # type: ignore[arg-type]
    if method in NEEDS_BACKBONE:
        if backbone is None:
            raise ConfigurationError(
                f"propensity method {method!r} needs a pretrained model",
                hint="pass backbone=BehaviorLM.load(dir)",
                cli_hint="pass --model DIR",
            )
        if method == "transformer":
            return TransformerScorer(backbone, **kw)
        if method == "joint":
            return TransformerScorer(backbone, features="rich", items=items, **kw)
        if method == "multitask":
            return TransformerScorer(backbone, aux_targets=None, **kw)
        if method == "fusion":
            return LateFusionScorer(backbone, items, action=action, **kw)
        if method == "next_gap":
            return GapHeadScorer(backbone, horizon, action)
        return ZeroShotScorer(backbone, action=action, **kw)
    raise ConfigurationError(f"unknown propensity method {method!r}; choose from {METHODS}")


def select_method(
    candidates: tuple[str, ...],
    train: ExampleSet,
    valid: ExampleSet,
    build: Any,
    seed: int = 0,
) -> tuple[str, Any, dict[str, Any]]:
    """Fit each candidate (``build(method)`` makes it) and keep the best on unseen validation users.

    Validation users are halved by a stable hash: every candidate early-stops on half A and is
    compared on half B, which no candidate has seen -- comparing on A would favour the
    transformer, whose best epoch is chosen there. A candidate that does not apply to the data
    (BTYD without a purchase before the cutoff, a model-based method without a model) is
    skipped, with the reason recorded.
    """
    half_a, half_b = user_halves(valid, seed + 1)
    scores: dict[str, float] = {}
    skipped: dict[str, str] = {}
    fitted: dict[str, Any] = {}
    for method in candidates:
        try:
            scorer = build(method).fit(train, half_a)
            raw = scorer.decision_function(half_b)
        except (ConfigurationError, EventsError) as e:
            skipped[method] = e.message
            continue
        labels = half_b.labels
        scores[method] = float(roc_auc_score(labels, raw)) if 0 < labels.sum() < len(labels) else float("nan")
        fitted[method] = scorer
        log.info("auto: %s ROC-AUC %.4f on %d held-out validation examples", method, scores[method], len(half_b))
    if not fitted:
        raise ConfigurationError(f"no propensity method applies to this data: {skipped}")
    chosen = max(scores, key=lambda m: (np.nan_to_num(scores[m], nan=-1.0), -candidates.index(m)))
    ranked = sorted(scores.items(), key=lambda kv: -np.nan_to_num(kv[1], nan=-1.0))
    why = (
        f"highest ROC-AUC on {len(half_b):,} validation examples no candidate trained or early-stopped on: "
        + ", ".join(f"{m} {s:.3f}" for m, s in ranked)
    )
    return chosen, fitted[chosen], {"chosen": chosen, "roc_auc": scores, "skipped": skipped, "why": why}


class PropensityModel:
    """Calibrated P(target within ``horizon`` | events so far), fit on rolling windows.

    ``fit`` builds training examples at cutoffs ``end - horizon - j * stride`` (so every label
    window is complete), holds out ``valid_frac`` of users for early stopping and calibration,
    fits the scorer (``method="auto"``: the best candidate by :func:`select_method`, named in
    ``method_`` and explained in ``selection_``), then the calibrator. ``predict`` scores every
    user with events before ``at`` (default: just after the last event) and returns
    ``user_id, as_of, propensity``.
    """

    def __init__(
        self,
        method: str = "auto",
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
        self.selection_: dict[str, Any] | None = None
        if p["method"] == "auto":
            candidates = tuple(m for m in AUTO_CANDIDATES if backbone is not None or m not in NEEDS_BACKBONE)
            self.method_, self.scorer_, self.selection_ = select_method(
                candidates, train, valid, lambda m: self._scorer(m, backbone), p["seed"]
            )
        else:
            self.method_, self.scorer_ = p["method"], self._scorer(p["method"], backbone).fit(train, valid)
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
            "method": self.method_,
            "selection": self.selection_,
        }
        few = too_few_positives(train.positive_rate, len(train))
        if few:
            log.warning("%s %s: %s", p["target"], p["horizon"], few)
            self.train_info_["warning"] = few
        return self

    def _scorer(self, method: str, backbone: BehaviorLM | None) -> Any:
        p = self.params
        extra = dict(p["scorer_params"] or {}) if method == p["method"] else {}
        if method in _SEEDED:
            extra.setdefault("seed", p["seed"])
        return make_scorer(
            method, backbone, self.items_, target=p["target"], horizon=p["horizon"], action=p["action"], **extra
        )

    def predict_proba(self, examples: ExampleSet) -> np.ndarray:
        return self.calibrator_.predict(self.scorer_.decision_function(examples))

    def predict(self, events: Events | Any, at: Any = None, column: str = "propensity") -> pl.DataFrame:
        ex = scoring_examples(events, at)
        return ex.examples.select("user_id", "as_of").with_columns(pl.Series(column, self.predict_proba(ex)))

    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if not hasattr(self.scorer_, "save"):
            raise ConfigurationError(f"method {self.method_!r} has no learned state worth saving")
        self.scorer_.save(d)
        meta = {
            "params": self.params,
            "method": self.method_,
            "calibrator": self.calibrator_.to_dict(),
            "train_info": self.train_info_,
        }
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
        m.method_ = meta.get("method", meta["params"]["method"])
        m.scorer_ = _load_scorer(m.method_, d, items)
        m.calibrator_, m.train_info_ = Calibrator.from_dict(meta["calibrator"]), meta["train_info"]
        m.selection_ = cast(dict[str, Any] | None, m.train_info_.get("selection"))
        return m


def _load_scorer(method: str, directory: Path, items: pl.DataFrame | None) -> Any:
    if method in ("transformer", "joint", "multitask"):
        return TransformerScorer.load(directory, items)
    if method in ("bgnbd", "paretonbd"):
        return BTYDScorer.load(directory)
    if method == "fusion":
        return LateFusionScorer.load(directory, items)
    return LightGBMScorer.load(directory, items)


#: The output column of each target.
COLUMNS: dict[str, str] = {"conversion": "propensity", "churn": "churn_propensity"}


def user_propensities(
    events: Events | Any,
    backbone: BehaviorLM | None = None,
    items: Any = None,
    method: str = "auto",
    horizon: str = "auto",
    n_windows: int = 3,
    at: Any = None,
    seed: int = 0,
    *,
    targets: tuple[tuple[Target, str], ...] | None = None,
    action: str = "purchase",
    stride: str | None = None,
    calibration: str = "auto",
) -> tuple[pl.DataFrame, dict[str, PropensityModel]]:
    """``user_id, as_of`` and one calibrated column per target for every user, and the fitted
    models by column: the one propensity job of the CLI, the pipelines and Python users.

    ``targets`` are ``(target, horizon)`` pairs, by default conversion and churn over
    ``horizon``; their columns are :data:`COLUMNS` (``propensity``, ``churn_propensity``). A
    horizon ``"auto"`` is chosen from the data (:func:`~behaviorlm.propensity.labels.default_horizon`)
    and said in a warning line; a model whose training windows hold too few positives says so too."""
    targets = targets if targets is not None else (("conversion", horizon), ("churn", horizon))
    ev = as_events(events)
    if any(h == "auto" for _, h in targets):  # one horizon from the data, for churn too
        choice = default_horizon(ev, action, n_windows)
        log.warning("propensity horizon not given: %s, %s", choice.horizon, choice.why(action, n_windows))
        targets = tuple((t, choice.horizon if h == "auto" else h) for t, h in targets)
    table: pl.DataFrame | None = None
    models: dict[str, PropensityModel] = {}
    for target, h in targets:
        column = COLUMNS[target]
        pm = PropensityModel(method, target, action, h, n_windows, stride, calibration=calibration, seed=seed)
        pm.fit(ev, backbone, items)
        scores = pm.predict(ev, at=at, column=column)
        table = scores if table is None else table.join(scores.drop("as_of"), on="user_id", how="left")
        models[column] = pm
    if table is None:
        raise ConfigurationError("user_propensities needs at least one target")
    return table, models
