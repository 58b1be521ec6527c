"""Segmentation: tier boundaries, cluster choice, profiles, written outputs."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from behaviorlm.data.events import EventsError
from behaviorlm.recommender import BehaviorLM
from behaviorlm.segments import (
    assign_tiers,
    cluster_embeddings,
    run_segmentation,
    segment_profiles,
)


def test_tier_boundaries_follow_the_seeds():
    tiers = assign_tiers([0.0, 0.29999, 0.3, 0.59, 0.6, 1.0]).to_list()
    assert tiers == ["Low", "Low", "Medium", "Medium", "High", "High"]
    custom = assign_tiers([0.1, 0.5], bins=[0, 0.2, 1], labels=["cold", "warm"]).to_list()
    assert custom == ["cold", "warm"]
    p = np.random.default_rng(0).uniform(0.05, 0.25, 300)  # all "Low" on the fixed bins
    q = assign_tiers(p, bins="quantile").value_counts()
    assert dict(q.iter_rows()) == {"Low": 100, "Medium": 100, "High": 100}


@pytest.mark.parametrize(
    ("values", "bins", "labels", "match"),
    [
        ([0.5], [0, 0.6, 0.3, 1], ("a", "b", "c"), "increase strictly"),
        ([0.5], [0.1, 1], ("a",), "cover"),
        ([0.5], "tertiles", ("a",), "or 'quantile'"),
        ([0.5], [0, 0.5, 1], ("a",), "need 2 labels"),
        ([1.5], [0, 0.3, 0.6, 1], ("Low", "Medium", "High"), "column 'propensity'"),
        ([float("nan")], [0, 0.3, 0.6, 1], ("Low", "Medium", "High"), "column 'propensity'"),
    ],
)
def test_bad_tiers(values, bins, labels, match):
    with pytest.raises(EventsError, match=match):
        assign_tiers(values, bins, labels)


def test_silhouette_finds_three_blobs():
    rng = np.random.default_rng(0)
    centres = np.array([[5, 0, 0], [0, 5, 0], [0, 0, 5]], dtype=float)
    emb = np.concatenate([c + rng.normal(0, 0.3, (40, 3)) for c in centres])
    res = cluster_embeddings(emb)
    assert res.k == 3 and max(res.silhouette, key=res.silhouette.get) == 3
    assert len(set(res.labels[:40])) == 1 and len(set(res.labels)) == 3
    with pytest.raises(EventsError, match="k must be"):
        cluster_embeddings(emb, k=500)


@pytest.fixture(scope="module")
def lm(funnel_events):
    return BehaviorLM(max_len=32, dim=16, n_layers=1, n_heads=1, epochs=2, batch_size=32, progress=False).fit(
        funnel_events
    )


def test_profiles_add_up(funnel_events, lm):
    users = pl.DataFrame({"user_id": sorted(funnel_events.df["user_id"].unique())})
    users = users.with_columns(pl.Series("propensity", np.linspace(0, 1, users.height)))
    users = users.with_columns(assign_tiers(users["propensity"]))
    mix = lm.next_action_proba(users=users["user_id"].to_list())
    prof = segment_profiles(users, funnel_events, "tier", next_actions=mix)
    assert prof["size"].sum() == users.height and prof["share"].sum() == pytest.approx(1.0)
    assert set(prof["segment"]) == {"Low", "Medium", "High"} and (prof["segment_type"] == "tier").all()
    p_cols = [c for c in prof.columns if c.startswith("p_")]
    np.testing.assert_allclose(prof.select(p_cols).sum_horizontal(), 1.0, rtol=1e-4)
    with pytest.raises(EventsError, match="no segment column 'cluster'"):
        segment_profiles(users, funnel_events, "cluster")


def test_run_segmentation_writes_the_user_table(funnel_events, lm, tmp_path):
    emb = lm.embed(events=funnel_events)
    assert np.allclose(np.linalg.norm(np.stack(emb["embedding"].to_numpy()), axis=1), 1.0, atol=1e-5)
    prop = emb.select("user_id").with_columns(
        pl.Series("propensity", np.linspace(0.05, 0.9, emb.height)), pl.lit(0.2).alias("churn_propensity")
    )
    res = run_segmentation(lm, funnel_events, prop, tmp_path, k=3)
    users = pl.read_parquet(res.files["users"])
    assert users.columns[:5] == ["user_id", "propensity", "churn_propensity", "tier", "cluster"]
    assert users.height == prop.height and set(users["cluster"]) == {0, 1, 2}
    prof = pl.read_parquet(res.files["profiles"])
    assert set(prof["segment_type"]) == {"tier", "cluster"}
    for name in ("user_segments", "profile_heatmap", "embedding_map"):
        assert res.files[name].stat().st_size > 5_000
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporary files
    again = run_segmentation(lm, funnel_events, prop, tmp_path, k=3)
    assert again.users.equals(res.users)  # reruns give the same segmentation
