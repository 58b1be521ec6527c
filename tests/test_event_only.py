"""Event-only logs (product analytics: screens, no item column): the event name is the token.

Trains, scores, predicts conversion to a chosen event and segments end to end from the CLI with
``--item-col none``; a target event that never occurs is a clear error naming it.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from behaviorlm.cli import app
from behaviorlm.data.events import ColumnMapping, validate_events
from tests.conftest import cli_failed

runner = CliRunner()
SMALL = ["--epochs", "2", "--dim", "16", "--layers", "1", "--heads", "1", "--max-len", "32", "--batch-size", "32"]
FUNNEL = ("catalog", "product", "cart", "delivery_choice", "payment_done")


def screen_log(n_users: int = 150, days: int = 6, seed: int = 0) -> pl.DataFrame:
    """Daily app sessions walking down a checkout funnel; decided users get further and pay."""
    rng = np.random.default_rng(seed)
    rows, t0 = [], 1_700_000_000 - 1_700_000_000 % 86400
    for u in range(n_users):
        keen = u % 3 == 0
        for d in range(days):
            if rng.random() > 0.7:
                continue
            t = t0 + d * 86400 + int(rng.integers(3600, 40_000))
            depth = int(rng.integers(3, 6)) if keen else int(rng.integers(1, 4))
            for screen in FUNNEL[:depth]:
                rows.append((f"u{u}", screen, t))
                t += int(rng.integers(10, 200))
    return pl.DataFrame(rows, schema=["visitor", "screen", "ts"], orient="row")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("event_only")
    screen_log().write_csv(root / "screens.csv")
    src = ["--events", str(root / "screens.csv"), "--user-col", "visitor", "--item-col", "none"]
    src += ["--action-col", "screen", "--time-col", "ts"]
    res = runner.invoke(app, ["train", *src, "--out", str(root / "model"), "--holdout", "none", *SMALL])
    assert res.exit_code == 0, res.output
    return root, src


def test_the_event_name_is_the_token():
    ev = validate_events(screen_log(), ColumnMapping(user="visitor", item=None, action="screen", timestamp="ts"))
    assert (ev.df["item_id"] == ev.df["event_type"]).all()
    assert set(ev.actions) == {"catalog", "product", "add_to_cart", "delivery_choice", "payment_done"}  # cart: an alias


def test_trains_scores_predicts_and_segments(workspace):
    root, src = workspace
    res = runner.invoke(app, ["score", "--model", str(root / "model"), "--out", str(root / "next.parquet"), *src[:2]])
    assert res.exit_code == 0, res.output
    nxt = pl.read_parquet(root / "next.parquet")
    assert set(nxt["item_id"].unique()) <= {"catalog", "product", "add_to_cart", "delivery_choice", "payment_done"}
    scores = root / "pay.parquet"
    args = ["propensity", *src[:2], "--model", str(root / "model"), "--out", str(scores), "--action", "payment_done"]
    res = runner.invoke(app, [*args, "--method", "lightgbm", "--horizon", "1d", "--n-windows", "2"])
    assert res.exit_code == 0, res.output
    table = pl.read_parquet(scores)
    assert table.height == 150 and table["propensity"].is_between(0, 1).all()
    keen = table.filter(pl.col("user_id").str.slice(1).cast(pl.Int64) % 3 == 0)["propensity"].mean()
    other = table.filter(pl.col("user_id").str.slice(1).cast(pl.Int64) % 3 != 0)["propensity"].mean()
    assert keen > other  # the model found who pays
    out = root / "segments"
    res = runner.invoke(
        app,
        [
            "segment",
            *src[:2],
            "--model",
            str(root / "model"),
            "--scores",
            str(scores),
            "--out",
            str(out),
            "--k",
            "2",
            "--action",
            "payment_done",
        ],
    )
    assert res.exit_code == 0, res.output
    assert pl.read_parquet(out / "users.parquet").height == 150
    profiles = pl.read_parquet(out / "profiles.parquet")
    assert profiles["observed_conversion"].max() > 0  # payment_done counted as the conversion


def test_auto_method_says_what_it_chose(workspace):
    root, src = workspace
    args = ["propensity", *src[:2], "--model", str(root / "model"), "--out", str(root / "auto.parquet")]
    res = runner.invoke(app, [*args, "--action", "payment_done", "--horizon", "1d", "--n-windows", "2"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "auto chose" in text and "highest ROC-AUC on" in text and "bgnbd skipped" in text


def test_a_target_event_that_never_occurs_is_named(workspace):
    root, src = workspace
    args = ["propensity", *src, "--out", str(root / "x.parquet"), "--method", "lightgbm", "--action", "order_shipped"]
    res = runner.invoke(app, args)
    text = cli_failed(res)
    assert "target action 'order_shipped' never occurs" in text and "payment_done" in text
