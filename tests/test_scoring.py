"""Batch scoring agrees with recommend(), is chunk-invariant, atomic, and int8 stays close."""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl
import pytest
from typer.testing import CliRunner

from behaviorlm.cli import app
from behaviorlm.data.events import validate_events
from behaviorlm.inference.batch import ScoringOptions, score_events
from behaviorlm.recommender import BehaviorLM
from tests.conftest import make_events

STAMP = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.fixture(scope="module")
def setup():
    ev = validate_events(make_events(n_users=30, n_items=40))
    model = BehaviorLM(epochs=4, dim=16, n_layers=1, n_heads=2, max_len=12, batch_size=16, progress=False).fit(ev)
    return model, ev


def test_scores_match_recommend_and_are_chunk_invariant(setup, tmp_path):
    model, ev = setup
    opts_a, opts_b = ScoringOptions(k=5, batch_size=7), ScoringOptions(k=5, batch_size=64)
    a = score_events(model.engine, ev, tmp_path / "a.parquet", opts_a, chunk_users=4, progress=False, scored_at=STAMP)
    b = score_events(
        model.engine, ev, tmp_path / "b.parquet", opts_b, chunk_users=1000, progress=False, scored_at=STAMP
    )
    fa, fb = pl.read_parquet(a.out), pl.read_parquet(b.out)
    # batch shape changes BLAS blocking: identical ranking, scores equal to float noise
    assert fa.drop("score").equals(fb.drop("score"))
    assert (fa["score"] - fb["score"]).abs().max() < 1e-6
    assert fa.columns == ["user_id", "item_id", "score", "rank", "model_version", "scored_at"]
    assert a.n_users == 30 and fa.height == 150 and fa["model_version"][0] == model.model_version
    assert fa["scored_at"][0] == STAMP
    rec = model.recommend(events=ev, k=5).sort("user_id", "rank")
    assert fa["item_id"].to_list() == rec["item_id"].to_list()
    assert (fa["score"] - rec["score"]).abs().max() < 1e-5


def test_output_is_atomic_and_rerun_replaces(setup, tmp_path):
    model, ev = setup
    out = tmp_path / "s.parquet"
    out.write_text("old junk")
    score_events(model.engine, ev, out, ScoringOptions(k=3), progress=False)
    assert pl.read_parquet(out).height == 90
    assert [p.name for p in tmp_path.iterdir()] == ["s.parquet"]  # no temp files left


def test_int8_quantisation_stays_close(setup, tmp_path):
    model, ev = setup
    q = model.engine.quantized("int8")
    assert q.version.endswith("-int8") and q.network is not model.model_
    assert "DynamicQuantizedLinear" in repr(q.network) and "DynamicQuantizedLinear" not in repr(model.model_)
    five = ScoringOptions(k=5)
    fp = pl.read_parquet(score_events(model.engine, ev, tmp_path / "f.parquet", five, progress=False).out)
    i8 = pl.read_parquet(
        score_events(model.engine, ev, tmp_path / "q.parquet", five, quantize="int8", progress=False).out
    )
    assert (i8["model_version"] == f"{model.model_version}-int8").all()
    overlap = fp.join(i8, on=["user_id", "item_id"], how="semi").height / fp.height
    assert overlap > 0.8
    with pytest.raises(ValueError, match="quantize must be"):
        model.engine.quantized("int4")


def test_bad_arguments(setup, tmp_path):
    model, ev = setup
    with pytest.raises(ValueError, match="k must be"):
        ScoringOptions(k=0)
    with pytest.raises(ValueError, match="batch_size"):
        ScoringOptions(batch_size=0)
    with pytest.raises(TypeError, match="expected validated Events"):  # the boundary validates, not this layer
        score_events(model.engine, ev.df, tmp_path / "x.parquet")


def test_batch_scoring_takes_allow_lists_and_a_next_action(setup, tmp_path):
    """Batch scoring is the same engine as recommend(): allow-lists and action conditioning agree."""
    model, ev = setup
    allowed = [f"item{i}" for i in range(0, 40, 3)]
    opts = ScoringOptions(k=4, action="purchase", allowed_items=tuple(allowed))
    got = pl.read_parquet(score_events(model.engine, ev, tmp_path / "a.parquet", opts, progress=False).out)
    want = model.recommend(events=ev, k=4, action="purchase", allowed_items=allowed).sort("user_id", "rank")
    assert set(got["item_id"]) <= set(allowed)
    assert got["item_id"].to_list() == want["item_id"].to_list()


def test_cli_score(setup, tmp_path):
    model, ev = setup
    model.save(tmp_path / "m")
    ev.df.write_parquet(tmp_path / "e.parquet")
    runner = CliRunner()
    base = ["score", "--model", str(tmp_path / "m"), "--events", str(tmp_path / "e.parquet")]
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "s.parquet"), "--k", "4", "--quantize", "int8"])
    assert res.exit_code == 0, res.output
    assert "users/s" in res.output and pl.read_parquet(tmp_path / "s.parquet").height == 120
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "s.csv")])
    assert res.exit_code == 2 and "--out must end in .parquet" in res.output
    res = runner.invoke(
        app,
        [
            "next-actions",
            "--model",
            str(tmp_path / "m"),
            "--user",
            "3",
            "--method",
            "beam",
            "--beam-width",
            "2",
            "--steps",
            "2",
        ],
    )
    assert res.exit_code == 0 and "logprob" in res.output
    res = runner.invoke(app, ["next-actions", "--model", str(tmp_path / "m"), "--user", "3", "--method", "magic"])
    assert res.exit_code == 2 and "method must be" in res.output


def test_threads_follow_the_option_then_omp_num_threads(monkeypatch):
    import os

    import torch

    from behaviorlm.inference.batch import set_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert set_threads() == 1 and torch.get_num_threads() == 1  # the batch job no longer takes every core
        assert set_threads(2) == 2 and torch.get_num_threads() == 2  # --threads wins
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert set_threads() == (os.cpu_count() or 1)
    finally:
        torch.set_num_threads(before)
