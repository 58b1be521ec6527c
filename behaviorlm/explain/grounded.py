"""The one path from a model and its recommendations to explanation contexts grounded in it.

Every place a rationale is written -- ``behaviorlm explain``, the API's ``explain=true``, the
pipeline's explain step, the pyfunc -- calls :func:`grounded_contexts`: it attributes each
recommendation to the user's events by occlusion (:func:`~behaviorlm.explain.attribution.occlusion`,
the method whose deletions move the model's scores; section 23 of benchmarks/RESULTS.md) and
builds the contexts with those attributions and with shopper statistics counted over the
histories the model was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import polars as pl

from behaviorlm.data.events import Events
from behaviorlm.explain.attribution import Attributions, occlusion
from behaviorlm.explain.context import UserContext, build_contexts


@dataclass(frozen=True)
class Grounded:
    """Contexts to explain, and the attributions they rest on (``None`` when not computed)."""

    contexts: list[UserContext]
    attributions: Attributions | None


def grounded_contexts(
    model: Any,
    recommendations: pl.DataFrame,
    events: Events,
    items: pl.DataFrame | None = None,
    profiles: pl.DataFrame | None = None,
    as_of: datetime | None = None,
    attribute: bool = True,
    population: pl.DataFrame | None = None,
) -> Grounded:
    """Contexts for ``recommendations`` (``user_id, item_id, score, rank``) of ``model`` given the
    users' ``events``; ``attribute=False`` skips the attributions (the statistics stay). The
    population statistics are counted over ``population`` (default: the histories the model was
    trained on, ``model.histories_``)."""
    found = (
        occlusion(model, recommendations.select("user_id", "item_id"), events, as_of=as_of)
        if attribute and recommendations.height
        else None
    )
    contexts = build_contexts(
        recommendations,
        events,
        items if items is not None else model.items_,
        profiles,
        model_version=model.model_version,
        attributions=found.events if found is not None else None,
        population=model.histories_ if population is None else population,
    )
    return Grounded(contexts, found)
