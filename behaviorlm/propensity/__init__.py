"""Propensity: leak-free labels, features, scorers (heuristic, LightGBM, BTYD, fine-tuned and
zero-shot transformer, late fusion), calibration, and the production estimator :class:`PropensityModel`.

Modules, in the direction data flows: :mod:`~behaviorlm.propensity.labels` (examples whose
inputs end before each cutoff), :mod:`~behaviorlm.propensity.features`,
:mod:`~behaviorlm.propensity.btyd` (BG/NBD, Pareto/NBD), :mod:`~behaviorlm.propensity.scorers`,
:mod:`~behaviorlm.propensity.fusion`, :mod:`~behaviorlm.propensity.calibration` and
:mod:`~behaviorlm.propensity.estimator` (method choice, fitting, saving).
"""

from behaviorlm.propensity.btyd import BTYDModel, BTYDScorer
from behaviorlm.propensity.estimator import METHODS, PropensityModel, make_scorer, select_method, user_propensities
from behaviorlm.propensity.fusion import LateFusionScorer
from behaviorlm.propensity.scorers import (
    HeuristicScorer,
    LightGBMScorer,
    TransformerScorer,
    ZeroShotScorer,
    encode_examples,
)

__all__ = [
    "METHODS",
    "BTYDModel",
    "BTYDScorer",
    "HeuristicScorer",
    "LateFusionScorer",
    "LightGBMScorer",
    "PropensityModel",
    "TransformerScorer",
    "ZeroShotScorer",
    "encode_examples",
    "make_scorer",
    "select_method",
    "user_propensities",
]
