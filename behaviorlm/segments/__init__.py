"""Segments: propensity tiers, behavioural clusters over the transformer's user embeddings,
profiles, and the segments folder contract (:mod:`behaviorlm.segments.store`)."""

from behaviorlm.segments.segmentation import (
    PROFILE_METRICS,
    Clustering,
    SegmentOutputs,
    cluster_embeddings,
    embedding_coords,
    run_segmentation,
    segment_profiles,
    segment_users,
    user_activity,
)
from behaviorlm.segments.tiers import (
    DEFAULT_BINS,
    DEFAULT_TIERS,
    SegmentAssigner,
    assign_tiers,
    parse_bins,
    quantile_bins,
)

__all__ = [
    "DEFAULT_BINS",
    "DEFAULT_TIERS",
    "PROFILE_METRICS",
    "Clustering",
    "SegmentAssigner",
    "SegmentOutputs",
    "assign_tiers",
    "cluster_embeddings",
    "embedding_coords",
    "parse_bins",
    "quantile_bins",
    "run_segmentation",
    "segment_profiles",
    "segment_users",
    "user_activity",
]
