"""Two-stage retrieval: an ANN index proposes, the exact head re-scores (behaviorlm.inference.retrieval)."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import replace
from operator import attrgetter

import numpy as np
import polars as pl
import pytest

from behaviorlm.data.events import validate_events
from behaviorlm.errors import ConfigurationError, ModelFormatError
from behaviorlm.inference.retrieval import FOLDER, IndexParams, ItemIndex, wants_ann
from behaviorlm.recommender import BehaviorLM
from tests.conftest import make_events


@pytest.fixture(scope="module")
def events():
    return validate_events(make_events(n_users=60, n_items=300, length=20, seed=3))


@pytest.fixture(scope="module")
def model(events):
    return BehaviorLM(max_len=24, dim=16, n_layers=1, n_heads=2, epochs=2, seed=0, progress=False).fit(events)


@pytest.mark.parametrize("backend", ["hnswlib", "faiss", "usearch"])
def test_whole_catalog_fetch_equals_exact_scores(model, backend):
    """When the fetch covers the catalog (every next action searched) the normaliser is exact:
    same lists, same scores."""
    exact = model.recommend(k=10)
    model.use_retrieval("ann", IndexParams(backend=backend, min_fetch=400, skip_below=0.0))
    try:
        ann = model.recommend(k=10)
    finally:
        model.use_retrieval("exact")
    assert model.engine.retrieval_name == "exact"
    if backend == "usearch":  # its graph search may stop short of the whole catalog: full, correct lists
        assert ann.group_by("user_id").len()["len"].min() == 10
        same = ann.join(exact, on=["user_id", "item_id"])
        assert same.height >= 0.9 * exact.height, f"usearch found {same.height} of the {exact.height} exact items"
        np.testing.assert_allclose(same["score"].to_numpy(), same["score_right"].to_numpy(), rtol=0.05)
        return
    assert ann["item_id"].to_list() == exact["item_id"].to_list()
    np.testing.assert_allclose(ann["score"].to_numpy(), exact["score"].to_numpy(), rtol=1e-4)


def test_small_fetch_keeps_filters_and_recall(model, events):
    """A fetch far smaller than the catalog: seen items stay excluded, allow-lists are honoured,
    lists are full, and the top-10 matches the exact one almost everywhere."""
    exact = model.recommend(k=10)
    allowed = [f"item{i}" for i in range(0, 300, 7)]
    exact_allowed = model.recommend(k=10, allowed_items=allowed)
    model.use_retrieval("ann", IndexParams(min_fetch=12, ef_search=32, tail_sample=64))
    try:
        ann = model.recommend(k=10)
        ann_allowed = model.recommend(k=10, allowed_items=allowed)
    finally:
        model.use_retrieval("exact")
    seen = set(map(tuple, events.df.select("user_id", "item_id").unique().rows()))
    assert not any((u, i) in seen for u, i in ann.select("user_id", "item_id").rows())
    assert ann.group_by("user_id").len()["len"].min() == 10
    assert set(ann_allowed["item_id"]) <= set(allowed)
    assert ann_allowed["item_id"].to_list() == exact_allowed["item_id"].to_list()  # allow-lists are exact
    a = {u: set(g["item_id"]) for (u,), g in ann.group_by("user_id")}
    e = {u: set(g["item_id"]) for (u,), g in exact.group_by("user_id")}
    recall = np.mean([len(a[u] & e[u]) / 10 for u in e])
    assert recall >= 0.9, recall


def test_users_who_saw_most_candidates_still_get_full_lists(model, events):
    """Seen items dominate the first fetch: the deeper search (or exact fallback) fills the list."""
    exact = model.recommend(k=10)
    model.use_retrieval("ann", IndexParams(min_fetch=10, ef_search=10, tail_sample=32))
    try:
        ann = model.recommend(k=10)
    finally:
        model.use_retrieval("exact")
    per_user = ann.group_by("user_id").len()
    assert sorted(per_user["user_id"]) == sorted(exact["user_id"].unique()) and set(per_user["len"]) == {10}
    seen = set(map(tuple, events.df.select("user_id", "item_id").unique().rows()))
    assert not any((u, i) in seen for u, i in ann.select("user_id", "item_id").rows())


def test_index_is_stored_beside_the_model_and_refused_for_another(model, events, tmp_path, caplog):
    a = tmp_path / "a"
    model.use_retrieval("ann")
    try:
        model.save(a)
    finally:
        model.use_retrieval("exact")
    assert (a / FOLDER / "index.json").is_file()
    loaded = BehaviorLM.load(a, retrieval="ann")
    assert loaded.engine.retrieval_name == "ann:hnswlib"
    # another model (other weights and vocabulary) given a's index: refused by name, rebuilt
    other = BehaviorLM(max_len=24, dim=16, n_layers=1, n_heads=2, epochs=1, seed=1, progress=False)
    other.fit(validate_events(make_events(n_users=30, n_items=200, length=10, seed=9)))
    b = tmp_path / "b"
    other.save(b)
    shutil.copytree(a / FOLDER, b / FOLDER)
    with pytest.raises(ModelFormatError, match="does not match this model"):
        ItemIndex.load(b, other.engine.network, other.model_version, IndexParams())
    with caplog.at_level(logging.WARNING):
        fresh = BehaviorLM.load(b, retrieval="ann")
    assert "does not match this model" in caplog.text
    rebuilt = ItemIndex.load(b, fresh.engine.network, fresh.model_version, IndexParams())  # stored anew
    assert rebuilt.fingerprint["model_version"] == other.model_version


def test_modes_and_thresholds():
    assert not wants_ann("auto", 3_708) and wants_ann("auto", 55_237) and wants_ann("ann", 10)
    assert not wants_ann("exact", 10**6)
    with pytest.raises(ConfigurationError, match="retrieval must be one of") as e:
        wants_ann("fast", 10)
    assert "--retrieval" in str(e.value.cli_hint)
    with pytest.raises(ConfigurationError, match="ANN backend must be one of") as e:
        IndexParams(backend="annoy")
    assert "--ann-backend" in str(e.value.cli_hint)


def test_batch_scoring_through_the_index_equals_online(model, events):
    """recommend (batch) and the service's OnlineRecommender share the engine's rank()."""
    from behaviorlm.service.online import OnlineRecommender

    model.use_retrieval("ann", IndexParams(min_fetch=20, ef_search=40))
    try:
        batch = model.recommend(k=5)
        online = OnlineRecommender.from_model(model)
        users = batch["user_id"].unique().sort().to_list()[:10]
        got = online.recommend([online.query_for_user(u, k=5) for u in users])
    finally:
        model.use_retrieval("exact")
    for r in got:
        want = batch.filter(pl.col("user_id") == r.user_id)["item_id"].to_list()
        assert r.item_ids == want


def test_search_depth_is_tuned_on_the_models_users_and_kept(model, tmp_path):
    """A new index picks the shallowest depth reaching the recall target against exact ranking,
    records it in index.json, and a reload searches at that depth."""
    import json

    model.use_retrieval("ann")
    try:
        model.save(tmp_path / "m")
    finally:
        model.use_retrieval("exact")
    tuned = json.loads((tmp_path / "m" / FOLDER / "index.json").read_text())["tuned"]
    assert tuned["recall_at_10"] >= tuned["target"], tuned  # this small catalog reaches it
    loaded = BehaviorLM.load(tmp_path / "m", retrieval="ann")
    assert loaded.engine.index.params.ef_search == tuned["params"]["ef_search"]
    assert loaded.engine.index.params.min_fetch == tuned["params"]["min_fetch"]


def test_the_search_runs_at_the_depth_the_index_reports(model):
    """The tuned depth (``index.params``, logged and stored in index.json) is the depth every
    backend searches with -- not the one it was built with."""
    for backend in ("hnswlib", "faiss", "usearch"):
        index = ItemIndex.build(model.engine.network, model.model_version, IndexParams(backend=backend, ef_search=48))
        index.params = replace(index.params, ef_search=321)  # what tune() does
        index.candidates(np.zeros((2, model.engine.dim), np.float32), 10)
        b = index.backend.index
        used = {"hnswlib": "ef", "faiss": "hnsw.efSearch", "usearch": "expansion_search"}[backend]
        assert attrgetter(used)(b) == 321, backend


def _flip_bytes(path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        lambda f: (f / "index.bin").write_bytes(os.urandom(4096)),
        lambda f: _flip_bytes(f / "index.bin"),  # loads, and answers wrongly
        lambda f: (f / "tail.npy").unlink(),
        lambda f: (f / "index.json").write_text("{not json"),
    ],
    ids=["garbage", "flipped-bytes", "missing-file", "bad-json"],
)
def test_a_damaged_index_is_rebuilt_with_one_warning(model, tmp_path, caplog, damage):
    """Issue 31 item 6: a damaged index never takes the model down or answers wrongly."""
    a = tmp_path / "a"
    model.save(a)
    model.use_retrieval("ann", directory=a)
    model.use_retrieval("exact")
    damage(a / FOLDER)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="behaviorlm"):
        loaded = BehaviorLM.load(a, retrieval="ann")
    warnings = [r for r in caplog.records if "ANN index" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage(), caplog.text
    assert loaded.engine.retrieval_name == "ann:hnswlib"
    ItemIndex.load(a, loaded.engine.network, loaded.model_version, IndexParams())  # stored anew, verifies


def test_an_index_file_of_another_model_with_the_same_catalog_is_refused(model, events, tmp_path):
    twin = BehaviorLM(max_len=24, dim=16, n_layers=1, n_heads=2, epochs=1, seed=5, progress=False).fit(events)
    assert twin.engine.n_items == model.engine.n_items and twin.model_version != model.model_version
    a, b = tmp_path / "a", tmp_path / "b"
    for m, folder in ((model, a), (twin, b)):
        m.save(folder)
        m.use_retrieval("ann", directory=folder)
        m.use_retrieval("exact")
    shutil.copy(b / FOLDER / "index.bin", a / FOLDER / "index.bin")  # the graph of the twin's embeddings
    with pytest.raises(ModelFormatError, match="not the file it was saved with"):
        ItemIndex.load(a, model.engine.network, model.model_version, IndexParams())


def test_score_with_a_damaged_index_prints_no_traceback(model, events, tmp_path):
    from typer.testing import CliRunner

    from behaviorlm.cli import app

    a = tmp_path / "a"
    model.save(a)
    model.use_retrieval("ann", directory=a)
    model.use_retrieval("exact")
    (a / FOLDER / "index.bin").write_bytes(b"\\x00" * 100)
    events.df.write_parquet(tmp_path / "e.parquet")
    argv = ["score", "--model", str(a), "--events", str(tmp_path / "e.parquet"), "--out", str(tmp_path / "s.parquet")]
    res = CliRunner().invoke(app, [*argv, "--retrieval", "ann"])
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output


def test_a_new_index_times_each_path_both_ways_and_auto_follows_the_record(model, events, tmp_path):
    """Issue 30: the choice between exact and two-stage ranking is measured per path (the
    service's micro-batches on one thread, batch scoring's large batches) when the index is
    made, stored in index.json, reused on load, and followed by ``auto`` path by path."""
    import json

    a = tmp_path / "a"
    model.save(a)
    model.use_retrieval("ann", directory=a)
    model.use_retrieval("exact")
    routes = json.loads((a / FOLDER / "index.json").read_text())["routes"]
    assert set(routes) == {"online", "batch"}
    assert routes["online"]["threads"] == 1 and routes["online"]["rows_per_call"] == 8
    assert routes["batch"]["rows_per_call"] == 128
    for r in routes.values():
        assert r["exact_ms_per_user"] > 0 and r["ann_ms_per_user"] > 0
        assert r["ann"] == (r["ann_ms_per_user"] < r["exact_ms_per_user"])

    loaded = BehaviorLM.load(a, retrieval="ann")  # the record is reused, not measured again
    assert loaded.engine.index.fingerprint["routes"] == routes

    index = loaded.engine.index.routed(True)  # what retrieval="auto" does, with a record that splits the paths
    index.fingerprint = {**index.fingerprint, "routes": {"online": {"ann": True}, "batch": {"ann": False}}}
    engine = loaded.engine.with_index(index)
    assert engine.retrieval_for("batch") == "exact (measured cheaper for batch)"
    assert engine.retrieval_for("online") == "ann:hnswlib (measured cheaper for online)"
    enc = engine.encode(model.history_events())
    searched = []
    index.candidates = lambda q, fetch: searched.append(len(q)) or ItemIndex.candidates(index, q, fetch)
    batch = engine.top_k_all(enc, 10)
    assert not searched  # batch scoring ranked exactly
    np.testing.assert_array_equal(batch[1], model.engine.top_k_all(enc, 10)[1])
    h, a_logp = engine.heads(enc, slice(0, 4))
    engine.rank(h, a_logp, slice(0, 4), 10)
    assert searched  # the online path went through the index
    assert loaded.engine.retrieval_name == "ann:hnswlib"  # retrieval="ann": every path, no routing


def test_an_index_stored_without_cost_routes_is_measured_once_and_kept(model, tmp_path):
    import json

    a = tmp_path / "a"
    model.save(a)
    model.use_retrieval("ann", directory=a)
    model.use_retrieval("exact")
    meta_path = a / FOLDER / "index.json"
    meta = json.loads(meta_path.read_text())
    del meta["routes"]  # as an index made before issue 30 was stored
    meta_path.write_text(json.dumps(meta))
    BehaviorLM.load(a, retrieval="ann")
    assert "routes" in json.loads(meta_path.read_text())
