"""Streaming prepare: the same vocabulary and sequences as the in-memory tokenizer, resumable, exact errors."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from behaviorlm.data.events import validate_schema
from behaviorlm.data.schema import InputSchema
from behaviorlm.errors import InputDataError
from behaviorlm.sequence.prepare import PrepareConfig, prepare
from behaviorlm.sequence.shards import PreparedShards
from behaviorlm.sequence.tokenizer import ActionTokenizer
from tests.conftest import make_funnel_events


def _write_shards(df: pl.DataFrame, folder, n: int = 4) -> list:
    """Rows dealt round-robin over ``n`` files, so users span files; two exact duplicates."""
    folder.mkdir(parents=True, exist_ok=True)
    df = pl.concat([df, df.head(1), df.slice(5, 1)])  # two exact repeats, in other files than their originals or not
    paths = []
    for i in range(n):
        part = df.gather(np.arange(i, df.height, n))
        part.write_parquet(folder / f"part-{i}.parquet")
        paths.append(folder / f"part-{i}.parquet")
    return paths


def _in_memory(paths, cfg: PrepareConfig):
    frame = pl.concat([pl.read_parquet(p) for p in paths])
    ev = validate_schema(frame, InputSchema())
    tok = ActionTokenizer(cfg.max_len, cfg.min_item_count, cfg.n_time_buckets).fit(ev)
    return tok, tok.encode(ev, truncate=False), ev


def _by_user(encs) -> dict:
    out = {}
    for enc in encs:
        for u, user in enumerate(enc.user_ids):
            s, e = int(enc.offsets[u]), int(enc.offsets[u + 1])
            out[user] = (enc.items[s:e].tolist(), enc.actions[s:e].tolist(), enc.gaps[s:e].tolist())
    return out


@pytest.mark.parametrize(("min_item_count", "workers"), [(1, 1), (2, 1), (1, 2)])
def test_prepare_equals_the_in_memory_tokenizer(tmp_path, min_item_count, workers):
    paths = _write_shards(make_funnel_events(n_users=80), tmp_path / "in")
    cfg = PrepareConfig(rows_per_shard=400, min_item_count=min_item_count, workers=workers)  # several buckets
    prepared = prepare(tmp_path / "in", tmp_path / "out", config=cfg)
    tok, enc, ev = _in_memory(paths, cfg)
    assert len(prepared.shards) > 1
    assert prepared.tokenizer.to_dict() == tok.to_dict()  # same vocabulary, same order, same counts
    assert _by_user(prepared) == _by_user([enc])  # same sequences, user by user
    assert prepared.n_users == len(enc) and prepared.n_tokens == int(enc.offsets[-1])
    report = prepared.report
    assert report["rows_kept"] == len(ev) and report["dropped"] == {"exact duplicate": 2}
    assert [f["rows_read"] for f in report["files"]] == [pl.read_parquet(p).height for p in paths]
    assert [f["file"] for f in report["files"]] == [str(p) for p in paths]  # the inputs, not staging parts


def test_a_killed_prepare_rerun_gives_identical_shards(tmp_path, monkeypatch):
    _write_shards(make_funnel_events(n_users=60), tmp_path / "in")
    cfg = PrepareConfig(rows_per_shard=300, workers=1)  # in-process, so the patched writer is the one called
    reference = prepare(tmp_path / "in", tmp_path / "ref", config=cfg)

    import behaviorlm.sequence.prepare as prep

    real, calls = prep.shards.write_shard, []

    def dies_on_the_second_shard(folder, enc, ranks):
        calls.append(folder)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(folder, enc, ranks)

    monkeypatch.setattr(prep.shards, "write_shard", dies_on_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "in", tmp_path / "out", config=cfg)
    assert not (tmp_path / "out" / "manifest.json").exists()  # incomplete: nothing may read it
    with pytest.raises(Exception, match="not a complete prepared folder"):
        PreparedShards.open(tmp_path / "out")
    monkeypatch.setattr(prep.shards, "write_shard", real)
    again = prepare(tmp_path / "in", tmp_path / "out", config=cfg)
    assert again.tokenizer.to_dict() == reference.tokenizer.to_dict()
    for a, b in zip(again.shards, reference.shards, strict=True):
        for name in ("offsets", "items", "actions", "gaps"):
            assert np.array_equal(
                np.load(tmp_path / "out" / a["name"] / f"{name}.npy"),
                np.load(tmp_path / "ref" / b["name"] / f"{name}.npy"),
            )


def test_a_bad_row_names_its_file_and_row(tmp_path):
    paths = _write_shards(make_funnel_events(n_users=40), tmp_path / "in")
    bad = pl.read_parquet(paths[2]).with_columns(pl.col("item_id").cast(pl.String))
    bad = bad.with_columns(
        pl.when(pl.int_range(pl.len()) == 7).then(None).otherwise(pl.col("item_id")).alias("item_id")
    )
    bad.write_parquet(paths[2])
    with pytest.raises(InputDataError, match=r"part-2\.parquet: .*item_id.*row 7"):
        prepare(tmp_path / "in", tmp_path / "out")


def test_files_whose_columns_disagree_are_named_together(tmp_path):
    paths = _write_shards(make_funnel_events(n_users=20), tmp_path / "in")
    pl.read_parquet(paths[1]).rename({"item_id": "sku"}).write_parquet(paths[1])
    with pytest.raises(InputDataError, match=r"part-1\.parquet: columns .* differ from .*part-0\.parquet"):
        prepare(tmp_path / "in", tmp_path / "out")


def test_the_prepare_command(tmp_path):
    from typer.testing import CliRunner

    from behaviorlm.cli import app

    df = make_funnel_events(n_users=30)
    (tmp_path / "in").mkdir()
    df.head(300).write_csv(tmp_path / "in" / "a.csv")
    df.slice(300).write_csv(tmp_path / "in" / "b.csv")
    argv = ["prepare", "--events", str(tmp_path / "in" / "*.csv"), "--out", str(tmp_path / "out")]
    res = CliRunner().invoke(app, [*argv, "--rows-per-shard", "200", "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert f"prepared {df.height:,} of {df.height:,} events from 2 file(s): 30 users" in res.output
    assert PreparedShards.open(tmp_path / "out").n_users == 30
    res = CliRunner().invoke(app, ["prepare", "--events", str(tmp_path / "none*.csv"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "no event files found" in res.output


def test_every_file_in_a_folder_is_read_or_reported_skipped(tmp_path, caplog):
    """Issue 31 item 5: extensions match in any letter case, other entries are named with the
    reason, and an empty file is one error line."""
    df = make_funnel_events(n_users=30)
    folder = tmp_path / "in"
    folder.mkdir()
    df.head(300).write_csv(folder / "events-1.csv")
    df.slice(300).write_csv(folder / "events-2.CSV")
    (folder / "notes.md").write_text("not events")
    (folder / "old").mkdir()
    with caplog.at_level("WARNING"):
        prepared = prepare(folder, tmp_path / "out", config=PrepareConfig(workers=1))
    assert prepared.report["rows_kept"] == df.height and len(prepared.report["files"]) == 2
    assert "skipping" in caplog.text and "notes.md" in caplog.text and "old (a folder)" in caplog.text
    (folder / "events-3.csv").write_bytes(b"")
    with pytest.raises(InputDataError, match=r"events-3\.csv is empty \(0 bytes\)"):
        prepare(folder, tmp_path / "out2", config=PrepareConfig(workers=1))
    with pytest.raises(InputDataError, match="is empty"):
        validate_schema(folder / "events-3.csv", InputSchema())


def _users_in(folder) -> set:
    return {str(u) for enc in PreparedShards.open(folder) for u in enc.user_ids}


def test_a_rerun_after_the_inputs_changed_redoes_the_staged_work(tmp_path):
    """Issue 31 item 2: staged work is keyed by each input's identity, not its position."""
    df = make_funnel_events(n_users=30)
    folder = tmp_path / "in"
    folder.mkdir()
    users = df["user_id"].unique().sort().to_list()
    thirds = [df.filter(pl.col("user_id").is_in(users[i::3])) for i in range(3)]
    for name, part in zip("abc", thirds, strict=True):
        part.write_csv(folder / f"{name}.csv")
    good_c = (folder / "c.csv").read_text()
    lines = good_c.splitlines()
    lines[3] = lines[3].split(",", 1)[0] + ",,,"  # a bad row in c.csv
    (folder / "c.csv").write_text("\n".join(lines) + "\n")
    cfg = PrepareConfig(rows_per_shard=150, workers=1)
    with pytest.raises(InputDataError, match=r"c\.csv"):
        prepare(folder, tmp_path / "out", config=cfg)
    (folder / "b.csv").unlink()
    (folder / "c.csv").write_text(good_c)
    prepared = prepare(folder, tmp_path / "out", config=cfg)
    assert [f["file"] for f in prepared.report["files"]] == [str(folder / "a.csv"), str(folder / "c.csv")]
    assert _users_in(tmp_path / "out") == {str(u) for u in users[0::3] + users[2::3]}  # b's users gone, c's read


def test_prepare_over_a_finished_folder_reuses_it_exactly_or_rebuilds_it(tmp_path):
    df = make_funnel_events(n_users=20)
    first_user = df["user_id"].min()
    df.write_csv(tmp_path / "day1.csv")
    df.filter(pl.col("user_id") == first_user).write_csv(tmp_path / "day2.csv")
    cfg = PrepareConfig(rows_per_shard=100, workers=1)
    prepare(tmp_path / "day1.csv", tmp_path / "P", config=cfg)
    stamp = (tmp_path / "P" / "manifest.json").stat().st_mtime_ns
    again = prepare(tmp_path / "day1.csv", tmp_path / "P", config=cfg)  # the same inputs: reused as is
    assert (tmp_path / "P" / "manifest.json").stat().st_mtime_ns == stamp and again.n_users == 20
    day2 = prepare(tmp_path / "day2.csv", tmp_path / "P", config=cfg)  # other inputs: rebuilt, not mixed
    assert day2.n_users == 1 and _users_in(tmp_path / "P") == {str(first_user)}
    assert sorted(p.name for p in (tmp_path / "P").glob("shard-*")) == [s["name"] for s in day2.shards]
    tokens = max(int(enc.items.max()) for enc in PreparedShards.open(tmp_path / "P"))
    assert tokens < day2.tokenizer.n_items  # every token within the new vocabulary
    other = PrepareConfig(rows_per_shard=100, max_len=50, workers=1)  # other settings: rebuilt too
    assert prepare(tmp_path / "day2.csv", tmp_path / "P", config=other).tokenizer.max_len == 50


def test_prepare_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("hi")
    make_funnel_events(n_users=5).write_csv(tmp_path / "e.csv")
    with pytest.raises(Exception, match="not a prepared folder"):
        prepare(tmp_path / "e.csv", tmp_path / "mine", config=PrepareConfig(workers=1))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "hi"


@pytest.mark.parametrize("damage", ["missing-array", "short-array", "bad-tokenizer"])
def test_a_damaged_prepared_folder_is_one_line_naming_the_file(tmp_path, damage):
    """Issue 31 item 7: a missing or damaged file is named, not a traceback later in training."""
    from behaviorlm.errors import ModelFormatError

    make_funnel_events(n_users=10).write_csv(tmp_path / "e.csv")
    prepare(tmp_path / "e.csv", tmp_path / "P", config=PrepareConfig(workers=1))
    shard = tmp_path / "P" / "shard-00000"
    if damage == "missing-array":
        (shard / "items.npy").unlink()
        match = r"items\.npy is missing"
    elif damage == "short-array":
        np.save(shard / "gaps.npy", np.load(shard / "gaps.npy")[:-3])
        match = r"gaps\.npy holds"
    else:
        (tmp_path / "P" / "tokenizer.json").write_text("garbage")
        match = r"tokenizer\.json is damaged"
    with pytest.raises(ModelFormatError, match=match):
        PreparedShards.open(tmp_path / "P")
