"""Training beyond memory and beyond one process: shards = in-memory, exact resume, DDP = one
process, incremental training keeps what it knew."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from behaviorlm.data.events import validate_schema
from behaviorlm.data.schema import InputSchema
from behaviorlm.errors import ConfigurationError
from behaviorlm.nn.checkpoint import Checkpointing
from behaviorlm.nn.model import BehaviorTransformer, ModelConfig
from behaviorlm.nn.training import TrainConfig, train
from behaviorlm.recommender import BehaviorLM
from behaviorlm.sequence.prepare import PrepareConfig, prepare
from behaviorlm.sequence.tokenizer import ActionTokenizer
from tests.conftest import make_funnel_events

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(dim=16, n_layers=1, n_heads=1, max_len=12, batch_size=16, progress=False)


def _write_files(df: pl.DataFrame, folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        df.gather(np.arange(i, df.height, n)).write_parquet(folder / f"part-{i}.parquet")
    return folder


def _state(model: BehaviorLM) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.model_.state_dict().items()}


def test_training_from_shards_equals_in_memory_training(tmp_path):
    raw = make_funnel_events(n_users=60)
    prepared = prepare(_write_files(raw, tmp_path / "in"), tmp_path / "out", config=PrepareConfig(rows_per_shard=300))
    assert len(prepared.shards) > 1
    from_shards = BehaviorLM("quick", epochs=3, **TINY).fit(prepared)
    in_memory = BehaviorLM("quick", epochs=3, **TINY).fit(raw)
    assert from_shards.tokenizer_.to_dict() == in_memory.tokenizer_.to_dict()
    losses = [e["loss"] for e in from_shards.history_.epochs]
    assert losses == [e["loss"] for e in in_memory.history_.epochs]  # the same batches, bit for bit
    for name, tensor in _state(in_memory).items():
        torch.testing.assert_close(_state(from_shards)[name], tensor, rtol=0, atol=0)
    with pytest.raises(Exception, match="trained from prepared shards"):
        from_shards.recommend(users=[raw["user_id"][0]])  # no histories kept: say so, no cold-start answer
    assert from_shards.recommend(events=raw.head(30)).height > 0


def _toy(seed: int = 0):
    ev = validate_schema(make_funnel_events(n_users=50, seed=seed), InputSchema())
    tok = ActionTokenizer(max_len=10).fit(ev)
    return tok, tok.encode(ev, truncate=False)


def _fresh(tok: ActionTokenizer) -> BehaviorTransformer:
    torch.manual_seed(0)
    return BehaviorTransformer(ModelConfig(tok.n_items, tok.n_actions, tok.n_gaps, max_len=10, dim=16, dropout=0.2))


@pytest.mark.parametrize("loss", ["full", "sampled", "sampled-sparse"])
def test_a_resumed_checkpoint_continues_the_exact_loss_curve(tmp_path, loss):
    tok, seqs = _toy()
    sparse = "on" if loss.endswith("-sparse") else "off"  # SparseAdam's moments must resume too
    cfg = TrainConfig(
        epochs=3, batch_size=16, loss=loss.split("-")[0], n_negatives=32, progress=False, patience=99,
        sparse_embeddings=sparse,
    )  # fmt: skip
    reference: list[float] = []
    train(_fresh(tok), seqs, cfg, on_step=lambda s, v: reference.append(v))
    steps_per_epoch = len(reference) // 3
    stop_at = steps_per_epoch + 2  # mid-way through epoch 2: batch order, dropout and negatives must all resume
    ckpt = Checkpointing(tmp_path / "ckpt", every_steps=1000)
    first: list[float] = []
    cut = TrainConfig(**{**cfg.__dict__, "max_steps": stop_at})
    train(_fresh(tok), seqs, cut, checkpoint=ckpt, on_step=lambda s, v: first.append(v))
    assert (tmp_path / "ckpt" / "checkpoint.pt").is_file()
    rest: list[float] = []
    torch.manual_seed(123)  # a new process: global RNG elsewhere; the checkpoint must restore it
    hist = train(_fresh(tok), seqs, cfg, checkpoint=ckpt, on_step=lambda s, v: rest.append(v))
    assert first + rest == reference
    assert len(hist.epochs) == 3


def test_a_checkpoint_of_other_data_is_refused(tmp_path):
    tok, seqs = _toy()
    ckpt = Checkpointing(tmp_path / "ckpt")
    cfg = TrainConfig(epochs=1, batch_size=16, progress=False, max_steps=2)
    train(_fresh(tok), seqs, cfg, checkpoint=ckpt)
    with pytest.raises(ConfigurationError, match="other training data or settings"):
        train(_fresh(tok), seqs, TrainConfig(epochs=1, batch_size=8, progress=False), checkpoint=ckpt)


def _cli(args: list[str], **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        [sys.executable, "-m", "behaviorlm", *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=240
    )


def test_two_ddp_processes_reproduce_the_one_process_run(tmp_path):
    """Same global batch: the loss curve within 1e-4 and the same vocabulary and weights (1e-4)."""
    make_funnel_events(n_users=40).write_csv(tmp_path / "events.csv")
    common = ["train", "--events", str(tmp_path / "events.csv"), "--holdout", "none", "--recipe", "quick"]
    common += ["--epochs", "2", "--dim", "16", "--layers", "1", "--heads", "1", "--max-len", "12"]
    common += ["--batch-size", "16", "--dropout", "0"]
    one = _cli([*common, "--out", str(tmp_path / "one")])
    two = _cli([*common, "--out", str(tmp_path / "two"), "--nproc", "2"])
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    assert "with 2 processes" in " ".join(two.stdout.split())
    a, b = BehaviorLM.load(tmp_path / "one"), BehaviorLM.load(tmp_path / "two")
    assert a.tokenizer_.to_dict() == b.tokenizer_.to_dict()
    la, lb = ([e["loss"] for e in m.history_.epochs] for m in (a, b))
    np.testing.assert_allclose(lb, la, rtol=1e-4)
    for name, tensor in a.model_.state_dict().items():
        torch.testing.assert_close(b.model_.state_dict()[name], tensor, rtol=1e-4, atol=1e-4)
    assert not list(tmp_path.glob(".two*"))  # one writer: no leftovers of a second one


def test_grown_model_keeps_every_old_weight():
    tok, _ = _toy()
    old = _fresh(tok)
    new = old.grown(tok.n_items + 5, tok.n_actions + 1)
    for name, tensor in old.state_dict().items():
        grown = new.state_dict()[name]
        torch.testing.assert_close(grown[: tensor.shape[0]], tensor, rtol=0, atol=0)
    assert new.item_emb.weight.shape[0] == tok.n_items + 5 and new.action_head.out_features == tok.n_actions + 1
    assert new.item_emb.weight[tok.n_items :].abs().sum() > 0  # fresh rows, initialised
    with pytest.raises(ConfigurationError):
        old.grown(tok.n_items - 1, tok.n_actions)


def test_fit_partial_grows_the_vocabulary_and_continues(tmp_path):
    raw = make_funnel_events(n_users=50)
    cutoff = raw["timestamp"].sort()[int(raw.height * 0.8)]
    old_part, new_part = raw.filter(pl.col("timestamp") < cutoff), raw.filter(pl.col("timestamp") >= cutoff)
    novel_ids = [f"novel-{i}" for i in range(6)]
    novel = new_part.head(6).with_columns(item_id=pl.Series(novel_ids), event_type=pl.lit("add_to_favorites"))
    new_part = pl.concat([new_part, novel])
    model = BehaviorLM("quick", epochs=2, **TINY).fit(old_part)
    before_items, before_actions = list(model.tokenizer_.items_), list(model.tokenizer_.actions_)
    before_weights, before_version = model.model_.item_emb.weight.detach().clone(), model.model_version
    model.fit_partial(new_part, epochs=1)
    tok = model.tokenizer_
    assert tok.items_[: len(before_items)] == before_items and tok.actions_[: len(before_actions)] == before_actions
    assert set(novel_ids) <= set(tok.items_) and tok.actions_[-1] == "add_to_favorites"
    assert model.model_.item_emb.weight.shape[0] == tok.n_items > before_weights.shape[0]
    counts = dict(zip(tok.items_, tok.item_counts_, strict=True))
    both = pl.concat([old_part, new_part])
    for item in before_items[:5] + novel_ids[:2]:  # old counts plus the new day's, each event once
        assert counts[item] == both.filter(pl.col("item_id") == item).height
    assert model.model_version != before_version and model.parent_version_ == before_version
    user = novel["user_id"][0]
    assert "novel-0" in model.seen_.filter(pl.col("user_id") == user)["item_id"].to_list()
    model.save(tmp_path / "m2")
    again = BehaviorLM.load(tmp_path / "m2")
    assert again.parent_version_ == before_version
    assert again.recommend(users=[user], k=3).height == 3


def test_cli_trains_from_prepared_with_checkpoints_and_continues_a_model(tmp_path):
    raw = make_funnel_events(n_users=40)
    raw.write_csv(tmp_path / "events.csv")
    prep = _cli(["prepare", "--events", str(tmp_path / "events.csv"), "--out", str(tmp_path / "prep")])
    assert prep.returncode == 0, prep.stderr[-2000:]
    args = ["train", "--prepared", str(tmp_path / "prep"), "--recipe", "quick", "--epochs", "2", "--dim", "16"]
    args += ["--layers", "1", "--heads", "1", "--max-len", "12", "--checkpoint-dir", str(tmp_path / "ck")]
    first = _cli([*args, "--out", str(tmp_path / "m"), "--checkpoint-every", "3"])
    assert first.returncode == 0, first.stderr[-2000:]
    assert (tmp_path / "ck" / "checkpoint.pt").is_file()
    manifest = json.loads((tmp_path / "m" / "estimator.json").read_text())
    assert manifest["prepared_from"] == str(tmp_path / "prep")
    bad = _cli([*args[:-2], "--out", str(tmp_path / "x"), "--holdout", "loo"])
    assert bad.returncode != 0 and "--holdout none" in bad.stderr and "Traceback" not in bad.stderr
    more = _cli(["train", "--init-from", str(tmp_path / "m"), "--events", str(tmp_path / "events.csv")]
                + ["--epochs", "1", "--out", str(tmp_path / "m2")])  # fmt: skip
    assert more.returncode == 0, more.stderr[-2000:]
    assert json.loads((tmp_path / "m2" / "estimator.json").read_text())["parent_version"] == manifest["model_version"]


def test_scoring_from_shards_equals_scoring_events(tmp_path):
    from datetime import datetime, timezone

    from behaviorlm.inference.batch import ScoringOptions, score_events, score_prepared

    raw = make_funnel_events(n_users=60)
    prepared = prepare(_write_files(raw, tmp_path / "in"), tmp_path / "out", config=PrepareConfig(rows_per_shard=300))
    model = BehaviorLM("quick", epochs=1, **TINY).fit(prepared)
    stamp = datetime(2024, 1, 1, tzinfo=timezone.utc)
    options = ScoringOptions(k=5)
    summary = score_prepared(model.engine, prepared, tmp_path / "scores", stamp, options, chunk_users=7)
    got = pl.read_parquet(tmp_path / "scores" / "part-*.parquet").sort("user_id", "rank")
    score_events(model.engine, model.validate_input(raw), tmp_path / "ref.parquet", options, scored_at=stamp)
    want = pl.read_parquet(tmp_path / "ref.parquet").sort("user_id", "rank")
    assert summary.n_users == raw["user_id"].n_unique() == got["user_id"].n_unique()
    assert got.select("user_id", "item_id", "rank").equals(want.select("user_id", "item_id", "rank"))
    np.testing.assert_allclose(got["score"].to_numpy(), want["score"].to_numpy(), rtol=1e-5)
    again = score_prepared(model.engine, prepared, tmp_path / "scores", stamp, options, chunk_users=7)
    assert again.n_rows == summary.n_rows  # resumed: every part kept


def test_scoring_shards_with_another_vocabulary_is_refused(tmp_path):
    from datetime import datetime, timezone

    from behaviorlm.inference.batch import score_prepared

    prepared = prepare(_write_files(make_funnel_events(n_users=30), tmp_path / "in"), tmp_path / "out")
    other = BehaviorLM("quick", epochs=1, **TINY).fit(make_funnel_events(n_users=30, seed=5).head(200))
    with pytest.raises(ConfigurationError, match="another vocabulary"):
        score_prepared(other.engine, prepared, tmp_path / "s", datetime(2024, 1, 1, tzinfo=timezone.utc))


def test_scale_bad_input_gets_clear_errors(tmp_path):
    from typer.testing import CliRunner

    from behaviorlm.cli import app
    from behaviorlm.errors import ModelFormatError
    from behaviorlm.sequence.shards import PreparedShards

    prepare(_write_files(make_funnel_events(n_users=20), tmp_path / "in"), tmp_path / "prep")
    manifest = tmp_path / "prep" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"format_version": 2', '"format_version": 1'))
    with pytest.raises(ModelFormatError, match="prepared format 1; this behaviorlm reads 2: run behaviorlm prepare"):
        PreparedShards.open(tmp_path / "prep")
    runner = CliRunner()
    csv = tmp_path / "e.csv"
    make_funnel_events(n_users=10).write_csv(csv)
    both = runner.invoke(app, ["train", "--prepared", str(tmp_path / "prep"), "--events", str(csv), "--out", "x"])
    assert both.exit_code == 2 and "--prepared replaces --events" in both.output
    zero = runner.invoke(app, ["train", "--events", str(csv), "--out", "x", "--nproc", "0"])
    assert zero.exit_code == 2 and "--nproc must be >= 1" in zero.output
    every = runner.invoke(
        app, ["train", "--events", str(csv), "--out", "x", "--checkpoint-dir", "c", "--checkpoint-every", "0"]
    )
    assert every.exit_code == 2 and "--checkpoint-every must be >= 1" in every.output


def test_rerunning_score_prepared_resumes_the_unfinished_run(tmp_path):
    """`score --prepared` as its help says: the same command again keeps the finished parts
    (the time stamp comes from the run's plan, not the clock) and --as-of sets it explicitly."""
    import time

    from typer.testing import CliRunner

    from behaviorlm.cli import app

    raw = make_funnel_events(n_users=40)
    prepared = prepare(_write_files(raw, tmp_path / "in"), tmp_path / "prep", config=PrepareConfig(rows_per_shard=200))
    BehaviorLM("quick", epochs=1, **TINY).fit(prepared).save(tmp_path / "m")
    out = tmp_path / "scores"
    cmd = ["score", "--model", str(tmp_path / "m"), "--prepared", str(tmp_path / "prep"), "--out", str(out)]
    first = CliRunner().invoke(app, cmd)
    assert first.exit_code == 0, first.output
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) >= 2
    parts[-1].unlink()  # a run killed before its last part
    (out / "_SUCCESS").unlink()
    kept = {p: p.stat().st_mtime_ns for p in parts[:-1]}
    time.sleep(1.1)  # a later second: a clock-stamped plan would differ
    again = CliRunner().invoke(app, cmd)
    assert again.exit_code == 0, again.output
    assert {p: p.stat().st_mtime_ns for p in parts[:-1]} == kept and parts[-1].is_file()
    stamps = pl.read_parquet(out / "part-*.parquet")["scored_at"].unique()
    assert len(stamps) == 1
    fixed = CliRunner().invoke(app, [*cmd, "--as-of", "2017-12-03"])
    assert fixed.exit_code == 0, fixed.output
    assert pl.read_parquet(out / "part-*.parquet")["scored_at"].unique().to_list() == [
        datetime(2017, 12, 3, tzinfo=timezone.utc)
    ]


def test_an_overlapping_day_is_trained_on_and_counted_once():
    """The daily increment given a day that overlaps the model's events: what it already holds is
    dropped (each event once in the vocabulary counts and the event total); a day it holds whole
    is refused by name."""
    from behaviorlm.errors import InputDataError

    raw = make_funnel_events(n_users=50)
    cutoff = raw["timestamp"].sort()[int(raw.height * 0.8)]
    old_part, new_part = raw.filter(pl.col("timestamp") < cutoff), raw.filter(pl.col("timestamp") >= cutoff)
    overlap = raw.filter(pl.col("timestamp") >= old_part["timestamp"].sort()[int(old_part.height * 0.95)])
    model = BehaviorLM("quick", epochs=1, **TINY).fit(old_part)
    model.fit_partial(overlap, epochs=1)
    counts = dict(zip(model.tokenizer_.items_, model.tokenizer_.item_counts_, strict=True))
    for item in raw["item_id"].unique().to_list()[:20]:
        assert counts[item] == raw.filter(pl.col("item_id") == item).height, item
    assert model.n_train_events_ == raw.height
    assert model.training_data_["increments"][0]["n_events"] == new_part.height
    with pytest.raises(InputDataError, match="already held by the model"):
        model.fit_partial(new_part.tail(5), epochs=1)


def test_a_continuation_on_test_targets_cannot_be_evaluated_as_if_held_out(tmp_path):
    """--init-from defaults to --holdout none: the continued model has trained on the test
    targets, its record says so, and evaluate refuses it (library and CLI)."""
    from typer.testing import CliRunner

    from behaviorlm.cli import app
    from behaviorlm.evaluation import evaluate, leave_one_out
    from behaviorlm.evaluation.leakage import LeakError

    raw = make_funnel_events(n_users=40)
    raw.write_csv(tmp_path / "events.csv")
    train = ["train", "--events", str(tmp_path / "events.csv"), "--recipe", "quick", "--epochs", "1"]
    train += ["--dim", "16", "--layers", "1", "--heads", "1", "--max-len", "12"]
    assert CliRunner().invoke(app, [*train, "--out", str(tmp_path / "m")]).exit_code == 0
    evaluate_cmd = ["evaluate", "--events", str(tmp_path / "events.csv"), "--metrics-out", str(tmp_path / "x.json")]
    assert CliRunner().invoke(app, [*evaluate_cmd, "--model", str(tmp_path / "m")]).exit_code == 0  # held out
    more = ["train", "--init-from", str(tmp_path / "m"), "--events", str(tmp_path / "events.csv"), "--epochs", "1"]
    res = CliRunner().invoke(app, [*more, "--out", str(tmp_path / "m2")])
    assert res.exit_code == 0, res.output
    child = BehaviorLM.load(tmp_path / "m2")
    assert [s["holdout"] for s in [child.training_data_, *child.training_data_["increments"]]] == ["loo", "none"]
    res = CliRunner().invoke(app, [*evaluate_cmd, "--model", str(tmp_path / "m2")])
    assert res.exit_code == 2 and "would leak test targets" in " ".join(res.output.split()), res.output
    with pytest.raises(LeakError, match="test targets were training events"):
        evaluate(child, leave_one_out(child.validate_input(raw)), n_boot=10)


def test_a_checkpoint_write_that_fails_leaves_the_previous_one_and_no_temp_file(tmp_path, monkeypatch):
    from behaviorlm.nn import checkpoint

    ckpt = Checkpointing(tmp_path / "ckpt")
    ckpt.folder.mkdir()
    ckpt.path.write_bytes(b"previous")

    def full_disk(obj, f):
        Path(f).write_bytes(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    model = BehaviorTransformer(ModelConfig(n_items=10, n_actions=5, n_gaps=4, dim=8, n_layers=1, n_heads=1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(OSError, match="No space"):
        checkpoint.save(ckpt, checkpoint.TrainState(), model, opt, sched, torch.Generator(), {})
    assert ckpt.path.read_bytes() == b"previous" and sorted(p.name for p in ckpt.folder.iterdir()) == ["checkpoint.pt"]


def test_score_prepared_calibrates_the_index_of_a_model_trained_from_shards(tmp_path):
    """A model trained from shards keeps no histories to tune its ANN index on: `score
    --prepared` calibrates it on a sample of the folder's users (depth and per-path costs),
    stores that beside the model, and ranks through it."""
    from typer.testing import CliRunner

    from behaviorlm.cli import app
    from behaviorlm.inference.retrieval import FOLDER

    raw = make_funnel_events(n_users=60)
    prepared = prepare(_write_files(raw, tmp_path / "in"), tmp_path / "out", config=PrepareConfig(rows_per_shard=300))
    sample = prepared.sample(10, max_len=5)
    assert len(sample) == 10 and sample.lengths().max() <= 5
    BehaviorLM("quick", epochs=1, **TINY).fit(prepared).save(tmp_path / "m")
    argv = ["score", "--model", str(tmp_path / "m"), "--prepared", str(tmp_path / "out")]
    res = CliRunner().invoke(app, [*argv, "--out", str(tmp_path / "s"), "--retrieval", "ann"])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "m" / FOLDER / "index.json").read_text())
    assert {"tuned", "routes"} <= set(meta) and meta["tuned"]["users"] == prepared.shards[0]["users"]
    assert "ranking ann:hnswlib" in " ".join(res.output.split())
