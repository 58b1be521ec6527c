"""Scheduled batch scoring: same date twice gives the same files; a killed run resumes cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from behaviorlm.recommender import BehaviorLM
from pipelines import batch_score
from tests.conftest import make_events

ROOT = Path(__file__).resolve().parents[1]
DATE = "2023-11-30"  # after every synthetic event


@pytest.fixture(scope="module")
def setup_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    events = make_events(n_users=30, n_items=40, length=10)
    events.write_csv(root / "events.csv")
    BehaviorLM(max_len=16, dim=16, n_layers=1, n_heads=1, epochs=1, progress=False).fit(events).save(root / "model")
    return root


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--date",
        DATE,
        "--model",
        str(root / "model"),
        "--events",
        str(root / "events.csv"),
        "--out",
        str(out),
        "--no-segments",  # segments from the champion: tests/test_pipeline.py
        *extra,
    ]


def _read(out: Path) -> pl.DataFrame:
    return pl.read_parquet(sorted((out / "scores" / f"date={DATE}").glob("part-*.parquet")))


def test_same_date_twice_is_identical(setup_files, tmp_path):
    out = tmp_path / "outputs"
    assert batch_score.main(_args(setup_files, out, "--chunk-users", "7")) == 0
    first = _read(out)
    part_dir = out / "scores" / f"date={DATE}"
    stamps = {p.name: p.stat().st_mtime_ns for p in part_dir.glob("part-*")}
    assert batch_score.main(_args(setup_files, out, "--chunk-users", "7")) == 0
    assert _read(out).equals(first)
    assert {p.name: p.stat().st_mtime_ns for p in part_dir.glob("part-*")} == stamps  # nothing recomputed
    assert first.height == 30 * 10 and first.select("user_id", "rank").is_duplicated().sum() == 0
    assert first["scored_at"].unique().to_list()[0].isoformat().startswith("2023-12-01")
    done = json.loads((part_dir / "_SUCCESS").read_text())
    assert done["n_users"] == 30 and done["parts"] == 5 and done["parts_written_now"] == 0
    assert batch_score.main(_args(setup_files, out, "--chunk-users", "7", "--k", "3")) == 0  # new plan
    assert _read(out).height == 30 * 3


def test_killed_run_resumes_to_the_same_output(setup_files, tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    assert batch_score.main(_args(setup_files, clean, "--chunk-users", "2")) == 0
    cmd = [
        sys.executable,
        "-m",
        "pipelines.batch_score",
        *_args(setup_files, killed, "--chunk-users", "2", "--pause-s", "0.4"),
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    part_dir = killed / "scores" / f"date={DATE}"
    deadline = time.monotonic() + 600  # only a hung job reaches it; a starved box still writes 3 parts
    while len(list(part_dir.glob("part-*.parquet"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    n_before = len(list(part_dir.glob("part-*.parquet")))
    # Margins, not timing luck: the kill comes within a 50 ms poll of the third part, and the 12
    # parts still missing need at least 12 x 0.4 s of --pause-s, so however slow or fast the
    # machine, the job is killed midway (the deadline only guards against a hung job).
    assert 3 <= n_before < 15 and not (part_dir / "_SUCCESS").exists()
    assert batch_score.main(_args(setup_files, killed, "--chunk-users", "2")) == 0
    assert _read(killed).equals(_read(clean))
    assert json.loads((part_dir / "_SUCCESS").read_text())["parts_written_now"] == 15 - n_before
    assert not list(part_dir.glob(".*tmp*"))


def test_bad_input_is_a_clear_error(setup_files, tmp_path, capsys):
    assert batch_score.main(["--date", "30/11/2023", "--model", str(setup_files / "model"), "--dataset", "taobao"]) == 2
    assert "--date must be YYYY-MM-DD" in capsys.readouterr().err
    args = _args(setup_files, tmp_path)
    args[1] = "2000-01-01"
    assert batch_score.main(args) == 2
    assert "no events before the end of 2000-01-01" in capsys.readouterr().err
