"""Figures for analysts: reliability diagrams, early-prediction curves, segment views.

All matplotlib lives here (Agg backend, no display needed), so the modelling modules stay free
of plotting and every figure is written the same way: to a PNG path, atomically, and returned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from behaviorlm.data.io import atomic_path  # noqa: E402

TIER_COLOURS = {"Low": "#d95f02", "Medium": "#7570b3", "High": "#1b9e77"}


def _save(fig: plt.Figure, path: str | Path) -> Path:
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)


def reliability_diagram(curves: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path, title: str = "") -> Path:
    """Observed positive rate against mean predicted probability, one line per model."""
    fig, ax = plt.subplots(figsize=(5, 5))
    top = 0.0
    for name, c in curves.items():
        ax.plot(c["mean_predicted"], c["observed_rate"], marker="o", label=name)
        top = max(top, *c["mean_predicted"], *c["observed_rate"])
    top = min(1.0, top * 1.1 + 0.02)
    ax.plot([0, top], [0, top], "k--", lw=1, label="perfectly calibrated")
    ax.set(xlim=(0, top), ylim=(0, top), xlabel="mean predicted probability", ylabel="observed rate", title=title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def early_prediction_curve(results: Mapping[str, Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """ROC-AUC (with 95% interval) against the share of pre-purchase events seen."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        x, auc = np.array(r["fractions"]), np.array(r["roc_auc"])
        lo, hi = np.array(r["ci_low"]), np.array(r["ci_high"])
        ax.plot(x, auc, marker="o", label=name)
        ax.fill_between(x, lo, hi, alpha=0.15)
    ax.axhline(0.5, color="grey", lw=1, ls=":")
    ax.set(xlabel="share of events before the first purchase", ylabel="ROC-AUC (test users)", title=title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def user_segments(users: pl.DataFrame, path: str | Path, bins: Sequence[float]) -> Path:
    """Propensity histogram with its mean and the tier thresholds, plus the tier pie (as in the seeds)."""
    p = users["propensity"].to_numpy()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.hist(p, bins=30, color="#4c72b0", alpha=0.8)
    ax1.axvline(p.mean(), color="red", ls="--", label=f"mean {p.mean():.3f}")
    for b in bins[1:-1]:
        ax1.axvline(b, color="black", lw=1, ls=":")
    ax1.set(xlabel="purchase propensity", ylabel="users", title="Propensity distribution")
    ax1.legend()
    counts = users.group_by("tier").len().sort("tier")
    colours = [TIER_COLOURS.get(t, "#999999") for t in counts["tier"]]
    ax2.pie(counts["len"], labels=counts["tier"], colors=colours, autopct="%1.0f%%")
    ax2.set_title("Users by propensity tier")
    return _save(fig, path)


def profile_heatmap(profiles: pl.DataFrame, path: str | Path, columns: Sequence[str], label: str = "segment") -> Path:
    """Segments x metrics, each metric scaled to [0, 1] across segments, raw values annotated."""
    cols = [c for c in columns if c in profiles.columns]
    raw = profiles.select(cols).cast(pl.Float64).fill_null(0.0).to_numpy()
    span = raw.max(0) - raw.min(0)
    scaled = (raw - raw.min(0)) / np.where(span > 0, span, 1)
    fig, ax = plt.subplots(figsize=(1.3 * len(cols) + 2, 0.5 * len(raw) + 1.5))
    ax.imshow(scaled, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(raw)), [str(s) for s in profiles[label]], fontsize=8)
    for (i, j), v in np.ndenumerate(raw):
        ax.text(
            j, i, f"{v:.3g}", ha="center", va="center", fontsize=7, color="white" if scaled[i, j] < 0.5 else "black"
        )
    ax.set_title("Segment profiles (colour: scaled per column)")
    return _save(fig, path)


def embedding_map(coords: np.ndarray, labels: Sequence[Any], path: str | Path, title: str = "") -> Path:
    """2-D map of user embeddings coloured by segment."""
    fig, ax = plt.subplots(figsize=(6, 5))
    names = np.asarray([str(x) for x in labels])
    for lab in sorted(set(names)):
        m = names == lab
        ax.scatter(coords[m, 0], coords[m, 1], s=6, alpha=0.6, label=f"{lab} ({m.sum()})", color=TIER_COLOURS.get(lab))
    ax.set(xlabel="component 1", ylabel="component 2", title=title)
    ax.legend(fontsize=7, markerscale=2)
    return _save(fig, path)
