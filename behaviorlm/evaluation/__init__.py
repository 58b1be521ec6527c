"""Honest offline evaluation: leak-free splits, full-catalog ranking, baselines, bootstrap CIs.

Protocol rules this module enforces (and the tests check):

* **Splits never leak.** In leave-one-out the model is trained on each user's events minus the
  last two; it is validated on the second-to-last with the earlier events as input and tested
  on the last with all earlier events as input. A target event is never an input of its own
  prediction and never a training target. The temporal split cuts at global times.
* **Full catalog, no sampled negatives.** Every item of the training catalog is ranked. Ties
  are counted *against* the model (rank = number of items scoring >= the target), so a constant
  scorer gets rank = catalog size, never rank 1.
* A target the scorer cannot rank (item unseen in training, or excluded because already seen
  when ``exclude_seen=True``) counts as a miss; nothing is silently dropped from the average.
* Baselines (popularity, co-occurrence, recent, repeat, session-kNN, item-kNN) are scored on the same users, catalog and
  masks, and every metric carries a percentile-bootstrap 95% CI over users.
"""

from behaviorlm.evaluation.baselines import (
    BASELINES,
    SEEN_ONLY,
    CooccurrenceBaseline,
    ItemKNNBaseline,
    PopularityBaseline,
    RecentBaseline,
    RepeatBaseline,
    Scorer,
    SessionKNNBaseline,
    catalog_index,
)
from behaviorlm.evaluation.metrics import (
    ContextCatalog,
    UserRanks,
    bootstrap_ci,
    paired_difference,
    per_user_metrics,
    rank_targets,
    seen_lists,
    summarise,
)
from behaviorlm.evaluation.report import EvaluationReport, comparison_lines, evaluate
from behaviorlm.evaluation.splits import Holdout, Split, leave_one_out, temporal_split

__all__ = [
    "BASELINES",
    "SEEN_ONLY",
    "ContextCatalog",
    "CooccurrenceBaseline",
    "ItemKNNBaseline",
    "RecentBaseline",
    "RepeatBaseline",
    "SessionKNNBaseline",
    "EvaluationReport",
    "Holdout",
    "PopularityBaseline",
    "Scorer",
    "Split",
    "UserRanks",
    "bootstrap_ci",
    "catalog_index",
    "comparison_lines",
    "evaluate",
    "leave_one_out",
    "paired_difference",
    "per_user_metrics",
    "rank_targets",
    "seen_lists",
    "summarise",
    "temporal_split",
]
