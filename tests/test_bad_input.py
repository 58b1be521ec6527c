"""The bad-input corpus: every file either fails with one line naming the column and a truly bad
row, or is read with exactly the documented rows kept and dropped -- never silently altered.

Each case runs through the Python boundary (``validate_events`` on the file) and the CLI
(``behaviorlm score`` on the same file with a small model), and must agree in both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from behaviorlm.cli import app
from behaviorlm.data.events import EventsError, validate_events
from behaviorlm.data.schema import ColumnMapping
from behaviorlm.errors import BehaviorLMError
from behaviorlm.recommender import BehaviorLM
from behaviorlm.sequence.tokenizer import N_SPECIAL, UNK
from tests.conftest import T0, cli_failed, make_events

runner = CliRunner()
HEADER = "user_id,item_id,event_type,timestamp"


def _rows(n: int = 6, user: str = "u1", start: int = 0) -> list[str]:
    return [f"{user},item{i % 4},view,{T0 + i}" for i in range(start, start + n)]


@dataclass
class Case:
    name: str
    lines: list[str]
    kept: int | None = None  # rows kept, for files that are readable
    dropped: dict[str, int] = field(default_factory=dict)
    error: str | None = None  # a fragment of the one-line error, for files that are not
    bad_row: int | None = None  # the 0-based data row the error must name
    flags: list[str] = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)
    users: int | None = None


CASES = [
    Case("clean", [HEADER, *_rows()], kept=6, users=1),
    Case("leading zeros are two users", [HEADER, *_rows(3, "007"), *_rows(3, "7")], kept=6, users=2),
    Case(
        "millisecond timestamps are detected",
        [HEADER, *[f"u1,item{i},view,{(T0 + i) * 1000}" for i in range(4)]],
        kept=4,
    ),
    Case(
        "microseconds too",
        [HEADER, *[f"u1,item{i},view,{(T0 + i) * 1_000_000}" for i in range(4)]],
        kept=4,
    ),
    Case(
        "a negative timestamp",
        [HEADER, *_rows(3), "u1,item9,view,-5", *_rows(2, start=10)],
        error="implausible",
        bad_row=3,
    ),
    Case(
        "a negative timestamp dropped",
        [HEADER, *_rows(3), "u1,item9,view,-5", *_rows(2, start=10)],
        kept=5,
        dropped={"implausible timestamp": 1},
        flags=["--invalid", "drop"],
        kwargs={"invalid": "drop"},
    ),
    Case(
        "a date in 2099",
        [
            HEADER,
            "u1,a,view,2024-01-01T00:00:00",
            "u1,b,view,2024-01-02",
            "u1,c,view,2024-01-03",
            "u1,d,view,2099-01-01",
        ],
        error="implausible",
        bad_row=3,
    ),
    Case(
        "old times allowed on request",
        [HEADER, "u1,a,view,1975-01-01", "u1,b,view,1975-01-02"],
        kept=2,
        flags=["--any-time"],
        kwargs={"plausible_times": False},
    ),
    Case(
        "three garbage timestamps",
        [HEADER, *_rows(4), "u1,x,view,soon", "u1,y,view,??", *_rows(2, start=10), "u1,z,view,later"],
        error="unparseable timestamp: 3 row(s)",
        bad_row=4,
    ),
    Case(
        "three garbage timestamps dropped",
        [HEADER, *_rows(4), "u1,x,view,soon", "u1,y,view,??", *_rows(2, start=10), "u1,z,view,later"],
        kept=6,
        dropped={"unparseable timestamp": 3},
        flags=["--invalid", "drop"],
        kwargs={"invalid": "drop"},
    ),
    Case(
        "a quoted empty item id",
        [HEADER, *_rows(2), f'u1,"",view,{T0 + 9}', *_rows(1, start=10)],
        error="null item_id",
        bad_row=2,
    ),
    Case(
        "blank ids dropped and counted",
        [HEADER, *_rows(2), f'u1,"  ",view,{T0 + 9}', f"  ,item1,view,{T0 + 8}", *_rows(1, start=10)],
        kept=3,
        dropped={"null item_id": 1, "null user_id": 1},
        flags=["--invalid", "drop"],
        kwargs={"invalid": "drop"},
    ),
    Case(
        "missing column", ["visitor,item_id,event_type,timestamp", *_rows(2)], error="missing column(s) user='user_id'"
    ),
    Case(
        "unknown action",
        [HEADER, *_rows(2), f"u1,item1,teleport,{T0 + 5}"],
        error="unknown action name(s) ['teleport']",
        bad_row=2,
    ),
    Case("null user", [HEADER, *_rows(2), f",item1,view,{T0 + 5}"], error="null user_id", bad_row=2),
    Case(
        "exact duplicates are dropped and counted",
        [HEADER, *_rows(3), _rows(3)[1]],
        kept=3,
        dropped={"exact duplicate": 1},
    ),
    Case("timestamps in no unit", [HEADER, "u1,a,view,12", "u1,b,view,13"], error="fit no unit"),
    Case("no rows", [HEADER], error="no rows"),
    Case(
        "numeric ids declared",
        [HEADER, "007,1,view," + str(T0), "7,2,view," + str(T0 + 1)],
        kept=2,
        users=1,
        flags=["--numeric-ids"],
        kwargs={"numeric_ids": True},
    ),
    Case(
        "numeric ids declared but not",
        [HEADER, f"u1,1,view,{T0}"],
        error="declared numeric",
        bad_row=0,
        flags=["--numeric-ids"],
        kwargs={"numeric_ids": True},
    ),
]


def _write(tmp_path: Path, case: Case) -> Path:
    path = tmp_path / (re.sub(r"\W+", "_", case.name) + ".csv")
    path.write_text("\n".join(case.lines) + "\n")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus") / "m"
    BehaviorLM("quick", epochs=1, dim=8, n_layers=1, n_heads=1, max_len=8, progress=False).fit(make_events()).save(out)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_python_boundary(case, tmp_path):
    path = _write(tmp_path, case)
    if case.error:
        with pytest.raises(BehaviorLMError) as info:
            validate_events(path, **case.kwargs)
        text = str(info.value)
        assert case.error in text
        if case.bad_row is not None:
            assert f"first at row {case.bad_row} " in text
        return
    ev = validate_events(path, **case.kwargs)
    assert len(ev) == case.kept and ev.report.dropped == case.dropped
    assert ev.report.n_input_rows == len(case.lines) - 1
    if case.users is not None:
        assert ev.n_users == case.users
    assert ev.df["timestamp"].dt.year().is_between(1970, 2030).all()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cli_boundary(case, tmp_path, model_dir):
    path = _write(tmp_path, case)
    out = tmp_path / "scores.parquet"
    args = ["score", "--model", str(model_dir), "--events", str(path), "--out", str(out), *case.flags]
    res = runner.invoke(app, args)
    if case.error:
        text = cli_failed(res)
        assert case.error in text, text
        if case.bad_row is not None:
            assert f"first at row {case.bad_row} " in text
        return
    text = " ".join(res.output.split())
    assert res.exit_code == 0, text
    for reason, n in case.dropped.items():
        assert f"dropped {n:,} ({reason})" in text
    kept = validate_events(path, **case.kwargs)  # the rows the Python boundary keeps: every user scored
    assert len(kept) == case.kept
    scored = pl.read_parquet(out)["user_id"]
    assert sorted(scored.unique().cast(pl.String)) == sorted(kept.df["user_id"].unique().cast(pl.String))
    if case.users is not None:
        assert scored.n_unique() == case.users


def test_string_ids_first_seen_after_row_100000_read_fine(tmp_path):
    path = tmp_path / "late.csv"
    rows = [f"{i % 500},{i % 90},view,{T0 + i}" for i in range(100_050)] + [f"u-late,item-x,view,{T0 + 200_000}"]
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    ev = validate_events(path)
    assert len(ev) == 100_051 and ev.df["user_id"].dtype == pl.String and "u-late" in ev.df["user_id"].to_list()


def test_scoring_text_ids_against_an_integer_catalog_is_no_traceback(tmp_path):
    """An integer-id model scores text ids: plain integers match, '00123'-style ids are unknown."""
    ints = make_events().with_columns(pl.col("item_id").str.extract(r"(\d+)").cast(pl.Int64))
    model = BehaviorLM("quick", epochs=1, dim=8, n_layers=1, n_heads=1, max_len=8, progress=False).fit(ints)
    model.save(tmp_path / "m")
    text = ints.with_columns(pl.col("item_id").cast(pl.String))
    text = text.with_columns(
        pl.when(pl.int_range(pl.len()) == 0).then(pl.lit("item-zero")).otherwise("item_id").alias("item_id")
    )
    text.write_csv(tmp_path / "e.csv")
    res = runner.invoke(
        app,
        [
            "score",
            "--model",
            str(tmp_path / "m"),
            "--events",
            str(tmp_path / "e.csv"),
            "--out",
            str(tmp_path / "s.parquet"),
        ],
    )
    assert res.exit_code == 0, res.output
    scores = pl.read_parquet(tmp_path / "s.parquet")
    assert scores["item_id"].dtype == pl.String and scores["item_id"].is_in([str(i) for i in range(12)]).all()
    five = model.tokenizer_.items_.index(5) + N_SPECIAL  # item 5's row in the vocabulary
    assert model.tokenizer_.item_index(pl.Series(["5", "005", "x"])).tolist() == [five, UNK, UNK]
    assert model.tokenizer_.item_index([5, "5"]).tolist() == [five, five]


def test_id_columns_named_by_the_mapping_in_errors(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("visitor,sku,what,when\nu1,,view,2024-01-01\n")
    with pytest.raises(EventsError, match="column 'sku': null item_id"):
        validate_events(path, ColumnMapping("visitor", "sku", "what", "when"))
