"""Propensity: leak-free labels, features, scorers (heuristic, LightGBM, fine-tuned and zero-shot
transformer), calibration, and the production estimator :class:`PropensityModel`.

Modules: :mod:`~behaviorlm.propensity.labels` (examples whose inputs end before each cutoff),
:mod:`~behaviorlm.propensity.features`, :mod:`~behaviorlm.propensity.calibration`,
:mod:`~behaviorlm.propensity.scorers`.
"""

from behaviorlm.propensity.scorers import (
    METHODS,
    HeuristicScorer,
    LightGBMScorer,
    PropensityModel,
    TransformerScorer,
    ZeroShotScorer,
    encode_examples,
    make_scorer,
    user_propensities,
)

__all__ = [
    "METHODS",
    "HeuristicScorer",
    "LightGBMScorer",
    "PropensityModel",
    "TransformerScorer",
    "ZeroShotScorer",
    "encode_examples",
    "make_scorer",
    "user_propensities",
]
