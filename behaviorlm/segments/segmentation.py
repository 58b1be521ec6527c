"""User segmentation: propensity tiers, behavioural clusters over learned embeddings, profiles.

Two labels per user, because they answer different questions:

* **tier** (Low / Medium / High) -- *how likely* the user is to convert, from the calibrated
  propensity and fixed, configurable bins (default ``[0, 0.3, 0.6, 1.0]`` as in the seeds).
  Fixed bins on a calibrated probability keep a tier's meaning stable across runs.
* **cluster** -- *how* the user behaves: KMeans over the transformer's user embeddings (the
  hidden state after the user's latest event, L2-normalised), with ``k`` chosen by silhouette
  unless given.

:func:`segment_profiles` summarises each segment (size, share, mean propensity, observed
conversion, activity, recency, top categories/brands, next-action mix) for dashboards; the
figures are drawn by :mod:`behaviorlm.plots`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import polars as pl
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import silhouette_score

from behaviorlm.data.events import Events, EventsError, as_events, read_table
from behaviorlm.segments import store
from behaviorlm.segments.tiers import DEFAULT_BINS, DEFAULT_TIERS, SegmentAssigner, assign_tiers, quantile_bins

if TYPE_CHECKING:
    from behaviorlm.recommender import BehaviorLM

PROFILE_METRICS = (
    "share",
    "mean_propensity",
    "mean_churn_propensity",
    "observed_conversion",
    "actions_per_user",
    "recency_days",
)


@dataclass
class Clustering:
    labels: np.ndarray
    k: int
    silhouette: dict[int, float]
    centers: np.ndarray


def cluster_embeddings(
    emb: np.ndarray, k: int | None = None, k_range: Sequence[int] = range(2, 9), seed: int = 0, sample: int = 3000
) -> Clustering:
    """KMeans; with ``k=None`` pick the ``k`` in ``k_range`` with the best silhouette.

    Silhouette is computed on a fixed random sample of at most ``sample`` users (it is
    quadratic in the number of points).
    """
    n = len(emb)
    if n < 3:
        raise EventsError(f"clustering needs at least 3 users with embeddings, got {n}")
    if k is not None and not 2 <= k < n:
        raise EventsError(f"k must be in [2, {n - 1}] for {n} users, got {k}")
    candidates = [k] if k is not None else [c for c in k_range if 2 <= c < n]
    scores, fits = {}, {}
    for c in candidates:
        km = KMeans(n_clusters=c, n_init=4, random_state=seed).fit(emb)
        fits[c] = km
        if len(set(km.labels_)) > 1:
            scores[c] = float(silhouette_score(emb, km.labels_, sample_size=min(n, sample), random_state=seed))
    best = k if k is not None else max(scores, key=scores.__getitem__)
    return Clustering(fits[best].labels_.astype(np.int64), best, scores, fits[best].cluster_centers_)


def embedding_coords(emb: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D PCA projection for maps (deterministic, fast; t-SNE would distort distances)."""
    return PCA(n_components=2, random_state=seed).fit_transform(emb)


def segment_users(
    propensity: pl.DataFrame,
    embeddings: pl.DataFrame,
    k: int | None = None,
    bins: Sequence[float] | str = DEFAULT_BINS,
    labels: Sequence[str] = DEFAULT_TIERS,
    seed: int = 0,
) -> tuple[pl.DataFrame, Clustering]:
    """User table ``user_id, propensity, [churn_propensity], tier, cluster, pc1, pc2``.

    ``propensity`` needs ``user_id, propensity`` (optionally ``churn_propensity`` and more);
    users without an embedding keep their tier and get cluster -1 (counted, not dropped).
    """
    for col in ("user_id", "propensity"):
        if col not in propensity.columns:
            raise EventsError(f"propensity table: missing column {col!r} (has {propensity.columns})")
    users = propensity.with_columns(assign_tiers(propensity["propensity"], bins, labels))
    emb_users = embeddings.join(users.select("user_id"), on="user_id", how="semi")
    matrix = np.stack(list(emb_users["embedding"].to_numpy())) if emb_users.height else np.zeros((0, 1))
    clustering = cluster_embeddings(matrix, k, seed=seed)
    coords = embedding_coords(matrix, seed)
    clusters = pl.DataFrame(
        {"user_id": emb_users["user_id"], "cluster": clustering.labels, "pc1": coords[:, 0], "pc2": coords[:, 1]}
    )
    users = users.join(clusters, on="user_id", how="left", maintain_order="left").with_columns(
        pl.col("cluster").fill_null(-1)
    )
    return users, clustering


def segment_profiles(
    users: pl.DataFrame,
    events: Events | Any,
    by: str = "tier",
    items: pl.DataFrame | None = None,
    next_actions: pl.DataFrame | None = None,
    outcome: pl.DataFrame | None = None,
    action: str = "purchase",
    top_n: int = 3,
) -> pl.DataFrame:
    """One row per segment of ``users[by]`` with size, share and behaviour.

    ``observed_conversion`` is the share of the segment's users with an ``action`` in
    ``outcome`` (e.g. the events after the scoring date, when known) or, without it, in their
    own history. ``next_actions`` (``user_id, p_<action>...`` from
    :meth:`BehaviorLM.next_action_proba`) adds the mean next-action mix.
    """
    if by not in users.columns:
        raise EventsError(f"user table: no segment column {by!r} (has {users.columns})")
    df = as_events(events).df.join(users.select("user_id", by), on="user_id", how="inner")
    end = df["timestamp"].max()
    per_user = df.group_by("user_id").agg(
        pl.len().alias("n_events"), ((end - pl.col("timestamp").max()).dt.total_seconds() / 86400).alias("recency_days")
    )
    conv = as_events(outcome).df if outcome is not None else df  # df: validated events already
    converted = conv.filter(pl.col("event_type") == action)["user_id"].unique()
    u = users.join(per_user, on="user_id", how="left").with_columns(
        pl.col("user_id").is_in(converted.implode()).cast(pl.Float64).alias("converted")
    )
    aggs = [
        pl.len().alias("size"),
        pl.col("propensity").mean().alias("mean_propensity"),
        pl.col("converted").mean().alias("observed_conversion"),
        pl.col("n_events").mean().alias("actions_per_user"),
        pl.col("recency_days").median().alias("recency_days"),
    ]
    if "churn_propensity" in u.columns:
        aggs.append(pl.col("churn_propensity").mean().alias("mean_churn_propensity"))
    prof = u.group_by(by).agg(aggs).with_columns((pl.col("size") / pl.col("size").sum()).alias("share"))
    prof = prof.join(_top_attributes(df, by, items, top_n), on=by, how="left")
    if next_actions is not None:
        p_cols = [c for c in next_actions.columns if c.startswith("p_")]
        mix = next_actions.join(users.select("user_id", by), on="user_id").group_by(by).agg(pl.col(p_cols).mean())
        prof = prof.join(mix, on=by, how="left")
    prof = prof.sort("mean_propensity" if by == "tier" else by)  # tiers from Low to High
    return prof.rename({by: "segment"}).with_columns(pl.lit(by).alias("segment_type"))


def user_activity(
    events: Events | Any, items: pl.DataFrame | None = None, n_recent: int = 50, action: str = "purchase"
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Per-user facts for dashboards, and each user's ``n_recent`` latest events.

    The first table has ``user_id, n_events, n_<action>s, first_seen, last_seen`` and, with a
    catalog, ``top_category`` (the user's most frequent category, ties broken by name); the
    second ``user_id, timestamp, event_type, item_id[, category]``, newest last. Both are small
    (bounded per user), so a dashboard can drill into a user without the raw event log.
    """
    df = as_events(events).df.select("user_id", "item_id", "event_type", "timestamp")
    if items is not None and "category" in items.columns:
        meta = items.select("item_id", pl.col("category").cast(pl.String))
        meta = meta.with_columns(pl.col("item_id").cast(df["item_id"].dtype, strict=False))
        df = df.join(meta, on="item_id", how="left", maintain_order="left")
    per_user = df.group_by("user_id").agg(
        pl.len().alias("n_events"),
        (pl.col("event_type") == action).sum().alias(f"n_{action}s"),
        pl.col("timestamp").min().alias("first_seen"),
        pl.col("timestamp").max().alias("last_seen"),
    )
    if "category" in df.columns:
        top = (
            df.drop_nulls("category")
            .group_by("user_id", "category")
            .len()
            .sort(["user_id", "len", "category"], descending=[False, True, False])
            .group_by("user_id", maintain_order=True)
            .first()
            .select("user_id", pl.col("category").alias("top_category"))
        )
        per_user = per_user.join(top, on="user_id", how="left")
    recent = df.sort("user_id", "timestamp").group_by("user_id", maintain_order=True).tail(n_recent)
    return per_user.sort("user_id"), recent


def _top_attributes(df: pl.DataFrame, by: str, items: pl.DataFrame | None, top_n: int) -> pl.DataFrame:
    """Most frequent categories / brands among each segment's events, as "a, b, c" strings."""
    out = df.select(by).unique()
    if items is None:
        return out
    for col in ("category", "brand"):
        if col not in items.columns:
            continue
        meta = items.select("item_id", col).with_columns(pl.col("item_id").cast(df["item_id"].dtype, strict=False))
        top = (
            df.join(meta, on="item_id", how="inner")
            .drop_nulls(col)
            .group_by(by, col)
            .len()
            .sort([by, "len", col], descending=[False, True, False])
            .group_by(by, maintain_order=True)
            .agg(pl.col(col).head(top_n).cast(pl.String).str.join(", ").alias(f"top_{col}"))
        )
        out = out.join(top, on=by, how="left")
    return out


@dataclass
class SegmentOutputs:
    users: pl.DataFrame
    profiles: pl.DataFrame
    clustering: Clustering
    assigner: SegmentAssigner
    activity: pl.DataFrame
    recent_events: pl.DataFrame
    files: dict[str, Path] = field(default_factory=dict)


def run_segmentation(
    est: BehaviorLM,
    events: Events | Any,
    propensity: pl.DataFrame,
    out_dir: str | Path | None = None,
    k: int | None = None,
    bins: Sequence[float] | str = DEFAULT_BINS,
    items: pl.DataFrame | None = None,
    seed: int = 0,
    models: Mapping[str, Any] | None = None,
    record: Mapping[str, Any] | None = None,
    action: str = "purchase",
) -> SegmentOutputs:
    """Tiers + clusters + profiles, and with ``out_dir`` a complete segments folder, in one call.

    The folder follows :mod:`behaviorlm.segments.store`: user table, profiles, activity, assigner,
    figures, the propensity ``models`` given (so the service can score new users), and
    ``_SUCCESS`` last, holding ``record`` (plan, provenance) and the run's summary.
    """
    ev = est.validate_input(events)
    embeddings = read_table(est.embed(events=ev), "embeddings")  # polars whatever est.set_output says
    users, clustering = segment_users(propensity, embeddings, k, bins, seed=seed)
    mix = read_table(est.next_action_proba(events=ev), "next-action probabilities")
    items = items if items is not None else getattr(est, "items_", None)
    by_cluster = users.with_columns(pl.col("cluster").cast(pl.String))
    profiles = pl.concat(
        [
            segment_profiles(users, ev, "tier", items, mix, action=action),
            segment_profiles(by_cluster, ev, "cluster", items, mix, action=action),
        ],
        how="diagonal_relaxed",
    )
    chosen = quantile_bins(users["propensity"].to_numpy()) if bins == "quantile" else bins
    edges = [float(e) for e in chosen]
    assigner = SegmentAssigner(edges, list(DEFAULT_TIERS), clustering.centers)
    res = SegmentOutputs(users, profiles, clustering, assigner, *user_activity(ev, items))
    if out_dir is not None:
        store.begin(out_dir)
        tables = {"users": users, "profiles": profiles, "activity": res.activity, "recent_events": res.recent_events}
        res.files = store.write_segmentation(out_dir, tables, assigner, edges, PROFILE_METRICS)
        store.save_propensity_models(out_dir, models or {})
        summary = {
            "users": users.height,
            "clusters": clustering.k,
            "mean_propensity": cast(float, users["propensity"].mean()),
        }
        store.finish(out_dir, {**(record or {}), "summary": {**(record or {}).get("summary", {}), **summary}})
    return res
