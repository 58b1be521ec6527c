"""Propensity tiers: fixed or quantile bins over a calibrated probability, and the assigner that
labels users a segmentation run never saw (tier edges plus cluster centres, ``assigner.json``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from behaviorlm.data.events import EventsError
from behaviorlm.data.io import write_text_atomic

DEFAULT_BINS = (0.0, 0.3, 0.6, 1.0)
DEFAULT_TIERS = ("Low", "Medium", "High")


def quantile_bins(propensity: np.ndarray, n_tiers: int = 3) -> list[float]:
    """Edges that split users into ``n_tiers`` equal-size groups (ranks, not probabilities).

    For when a calibrated propensity sits far below the fixed thresholds -- at a 16% base rate
    almost everyone is "Low" -- and the business wants relative tiers instead.
    """
    inner = np.quantile(np.asarray(propensity, np.float64), np.linspace(0, 1, n_tiers + 1)[1:-1])
    edges = [0.0]
    for q in inner:  # strictly increasing even when many users share one value (e.g. all 0.0)
        edges.append(float(min(max(q, np.nextafter(edges[-1], 1.0)), np.nextafter(1.0, 0.0))))
    return [*edges, 1.0]


def parse_bins(text: str, what: str = "tier bins") -> list[float] | str:
    """``"0,0.3,0.6,1"`` -> edges; ``"quantile"`` stays as it is (equal-size tiers)."""
    if text == "quantile":
        return text
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise EventsError(f"{what}: expected comma-separated numbers or 'quantile', got {text!r}") from None


def assign_tiers(
    propensity: pl.Series | np.ndarray | Sequence[float],
    bins: Sequence[float] | str = DEFAULT_BINS,
    labels: Sequence[str] = DEFAULT_TIERS,
) -> pl.Series:
    """Tier label per user; bin ``i`` is ``[bins[i], bins[i+1])``, the last one closed.

    ``bins="quantile"`` uses equal-size tiers (:func:`quantile_bins`).
    """
    if isinstance(bins, str):
        if bins != "quantile":
            raise EventsError(f"tier bins must be a list of edges or 'quantile', got {bins!r}")
        bins = quantile_bins(np.asarray(propensity, np.float64), len(labels))
    b = np.asarray(bins, dtype=np.float64)
    if len(b) < 2 or np.any(np.diff(b) <= 0) or b[0] > 0 or b[-1] < 1:
        raise EventsError(f"tier bins must increase strictly and cover [0, 1], got {list(bins)}")
    if len(labels) != len(b) - 1:
        raise EventsError(f"{len(b) - 1} tier bins need {len(b) - 1} labels, got {list(labels)}")
    p = np.asarray(propensity, dtype=np.float64)
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise EventsError("column 'propensity': values must be probabilities in [0, 1] (no nulls)")
    idx = np.clip(np.searchsorted(b, p, side="right") - 1, 0, len(labels) - 1)
    return pl.Series("tier", np.asarray(labels, dtype=object)[idx].tolist(), dtype=pl.String)


@dataclass
class SegmentAssigner:
    """Tier edges and cluster centres of one segmentation run, to label users it never saw.

    The online service uses it for raw-event requests: a new user gets the tier their
    propensity falls in and the nearest centre of their (L2-normalised) embedding, exactly as
    a user in the batch run would have.
    """

    edges: list[float]
    labels: list[str]
    centers: np.ndarray

    def tiers(self, propensity: np.ndarray) -> list[str]:
        return assign_tiers(propensity, self.edges, self.labels).to_list()

    def clusters(self, embeddings: np.ndarray) -> list[int]:
        d = ((embeddings[:, None, :] - self.centers[None, :, :]) ** 2).sum(-1)
        return d.argmin(1).astype(int).tolist()

    def save(self, path: Path) -> Path:
        meta = {"edges": self.edges, "labels": self.labels, "centers": self.centers.tolist()}
        return write_text_atomic(json.dumps(meta), path)

    @classmethod
    def load(cls, path: Path) -> SegmentAssigner:
        meta = json.loads(Path(path).read_text())
        return cls(meta["edges"], meta["labels"], np.asarray(meta["centers"], np.float32))
