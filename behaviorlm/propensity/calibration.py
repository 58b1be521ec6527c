"""Probability calibration and the metrics that judge a propensity score.

A propensity is used as a probability (tiers at 0.3 / 0.6, expected conversions = sum of
scores), so ranking quality (ROC-AUC, PR-AUC) is not enough: Brier score and expected
calibration error (ECE) say whether "0.4" means 40%. Calibrators are fitted on validation
examples only, never on test.

ECE here uses equal-mass bins (each holds the same number of examples): with skewed scores,
equal-width bins leave most bins nearly empty and the estimate noisy. It is still biased
upwards on small test sets -- at ~80 examples per bin and a 18% base rate, each bin's observed
rate has a standard error of ~0.04 -- so it is reported with a bootstrap interval and with
:func:`ece_noise_floor`, the ECE a perfectly calibrated model would show on the same examples.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score
from sklearn.model_selection import StratifiedKFold

from behaviorlm.errors import ConfigurationError

Method = Literal["auto", "isotonic", "platt", "none"]
_EPS = 1e-6


def _as_feature(scores: np.ndarray, logit: bool) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if logit:
        s = np.clip(s, _EPS, 1 - _EPS)
        s = np.log(s / (1 - s))
    return s.reshape(-1, 1)


class Calibrator:
    """Maps raw scores to calibrated probabilities: isotonic, Platt, or chosen by CV ("auto").

    "auto" compares both by 5-fold cross-validated Brier score on the calibration data itself
    -- isotonic regression is more flexible but overfits a few hundred examples, where Platt's
    two parameters win.
    """

    def __init__(self, method: Method = "auto", seed: int = 0):
        if method not in ("auto", "isotonic", "platt", "none"):
            raise ConfigurationError(f"calibration must be auto, isotonic, platt or none, got {method!r}")
        self.method = method
        self.seed = seed

    def fit(self, scores: np.ndarray, y: np.ndarray) -> Calibrator:
        scores, y = np.asarray(scores, np.float64), np.asarray(y, np.int64)
        self.logit_ = bool(scores.min() >= 0 and scores.max() <= 1)
        self.method_ = self._choose(scores, y) if self.method == "auto" else self.method
        self._fit_method(self.method_, scores, y)
        return self

    def _choose(self, scores: np.ndarray, y: np.ndarray) -> str:
        n_pos = int(y.sum())
        folds = min(5, n_pos, len(y) - n_pos)
        if folds < 2:
            return "platt"
        cv = StratifiedKFold(folds, shuffle=True, random_state=self.seed)
        loss = {}
        for method in ("isotonic", "platt"):
            pred = np.zeros(len(y))
            for tr, te in cv.split(scores, y):
                pred[te] = Calibrator(method).fit(scores[tr], y[tr]).predict(scores[te])
            loss[method] = brier_score_loss(y, pred)
        self.cv_brier_ = loss
        return min(loss, key=loss.__getitem__)

    def _fit_method(self, method: str, scores: np.ndarray, y: np.ndarray) -> None:
        if method == "isotonic":
            iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(scores, y)
            self.x_, self.y_ = iso.X_thresholds_.tolist(), iso.y_thresholds_.tolist()
        elif method == "platt":
            lr = LogisticRegression(C=100.0).fit(_as_feature(scores, self.logit_), y)
            self.coef_, self.intercept_ = float(lr.coef_[0, 0]), float(lr.intercept_[0])

    def predict(self, scores: np.ndarray) -> np.ndarray:
        scores = np.asarray(scores, np.float64)
        if self.method_ == "isotonic":
            return np.interp(scores, self.x_, self.y_)
        if self.method_ == "platt":
            z = self.coef_ * _as_feature(scores, self.logit_)[:, 0] + self.intercept_
            return 1.0 / (1.0 + np.exp(-z))
        return np.clip(scores, 0.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibrator:
        c = cls(d["method"], d.get("seed", 0))
        for k, v in d.items():
            setattr(c, k, v)
        return c


def expected_calibration_error(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> float:
    """Equal-mass-bin ECE: sum over bins of (bin share) * |mean prediction - positive rate|."""
    order = np.argsort(p, kind="stable")
    bins = np.array_split(order, min(n_bins, len(p)))
    return float(sum(len(b) / len(p) * abs(p[b].mean() - y[b].mean()) for b in bins if len(b)))


def ece_noise_floor(p: np.ndarray, n_bins: int = 10, n_sim: int = 200, seed: int = 0) -> dict[str, float]:
    """The ECE a *perfectly calibrated* model with these predictions would show on this many examples.

    Outcomes are drawn as ``Bernoulli(p)``; the mean and 95th percentile of the resulting ECE
    say how much of an observed ECE is sampling noise. An observed ECE below the 95th
    percentile cannot be told apart from perfect calibration.
    """
    p = np.asarray(p, np.float64)
    rng = np.random.default_rng(seed)
    sims = [expected_calibration_error((rng.random(len(p)) < p).astype(np.int64), p, n_bins) for _ in range(n_sim)]
    return {"mean": float(np.mean(sims)), "p95": float(np.quantile(sims, 0.95))}


def reliability_curve(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> dict[str, list[float]]:
    """Per equal-mass bin: mean predicted probability, observed positive rate, count."""
    order = np.argsort(p, kind="stable")
    bins = [b for b in np.array_split(order, min(n_bins, len(p))) if len(b)]
    return {
        "mean_predicted": [float(p[b].mean()) for b in bins],
        "observed_rate": [float(y[b].mean()) for b in bins],
        "count": [len(b) for b in bins],
    }


def _point_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    both = 0 < y.sum() < len(y)
    return {
        "roc_auc": float(roc_auc_score(y, p)) if both else float("nan"),
        "pr_auc": float(average_precision_score(y, p)) if both else float("nan"),
        "brier": float(brier_score_loss(y, p)),
        "ece": expected_calibration_error(y, p),
    }


def binary_metrics(y: np.ndarray, p: np.ndarray, n_boot: int = 500, seed: int = 0) -> dict[str, Any]:
    """ROC-AUC, PR-AUC, Brier, ECE, base rate and percentile-bootstrap 95% intervals."""
    y, p = np.asarray(y, np.int64), np.asarray(p, np.float64)
    out: dict[str, Any] = _point_metrics(y, p) | {"n": len(y), "positives": int(y.sum()), "base_rate": float(y.mean())}
    out["ece_floor"] = ece_noise_floor(p, seed=seed)
    if n_boot:
        rng = np.random.default_rng(seed)
        boots = [_point_metrics(y[i], p[i]) for i in (rng.integers(0, len(y), len(y)) for _ in range(n_boot))]
        out["ci95"] = {k: [float(np.nanquantile([b[k] for b in boots], q)) for q in (0.025, 0.975)] for k in boots[0]}
    return out


def paired_auc_difference(
    y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """ROC-AUC(a) - ROC-AUC(b) on the same examples, with a paired bootstrap interval."""
    y = np.asarray(y, np.int64)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        if 0 < y[i].sum() < len(i):
            diffs.append(roc_auc_score(y[i], p_a[i]) - roc_auc_score(y[i], p_b[i]))
    lo, hi = (float(np.quantile(diffs, q)) for q in (0.025, 0.975))
    return {
        "difference": float(roc_auc_score(y, p_a) - roc_auc_score(y, p_b)),
        "ci95": [lo, hi],
        "significant": bool(lo > 0 or hi < 0),
    }
