"""ONNX export of the scoring graph and the onnxruntime engine (behaviorlm.inference.onnx_engine)."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from behaviorlm.cli import app
from behaviorlm.data.events import validate_events
from behaviorlm.errors import ConfigurationError, ModelFormatError
from behaviorlm.inference.onnx_engine import FOLDER, OnnxEngine, compare, export_onnx, open_export
from behaviorlm.recommender import BehaviorLM
from tests.conftest import make_events


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    ev = validate_events(make_events(n_users=50, n_items=40, length=30, seed=2))
    model = BehaviorLM(max_len=24, dim=32, n_layers=2, n_heads=2, epochs=2, seed=0, progress=False).fit(ev)
    path = tmp_path_factory.mktemp("m") / "model"
    model.save(path)
    return model, path


def test_onnx_equals_torch_and_ranks_the_same(saved):
    model, path = saved
    loaded = BehaviorLM.load(path).use_engine("onnx", path)
    assert isinstance(loaded.engine, OnnxEngine) and (path / FOLDER / "heads.onnx").is_file()
    enc = model.engine.encode(model.history_events())
    diff = compare(model.engine, loaded.engine, enc, slice(0, len(enc)))
    assert max(diff.values()) < 1e-4, diff
    got, want = loaded.recommend(k=10), model.recommend(k=10)
    assert got.select("user_id", "item_id", "rank").equals(want.select("user_id", "item_id", "rank"))
    assert (got["score"] - want["score"]).abs().max() < 1e-5
    # variable batch sizes and lengths run through the one graph
    assert loaded.recommend(users=[model.histories_["user_id"][0]], k=3).height == 3


def test_int8_runs_and_stays_close(saved):
    model, path = saved
    int8 = BehaviorLM.load(path).use_engine("onnx-int8", path)
    enc = model.engine.encode(model.history_events())
    diff = compare(model.engine, int8.engine, enc, slice(0, len(enc)))
    assert 1e-4 < diff["item_logits"] < 0.05, diff  # int8 moves the logits a little (fp32 onnxruntime: ~1e-6)
    got, want = int8.recommend(k=10), model.recommend(k=10)
    assert got.group_by("user_id").len()["len"].min() == 10
    same = got.join(want, on=["user_id", "item_id"], how="semi").height / want.height
    assert same >= 0.9, f"int8 keeps {same:.0%} of the fp32 top-10"


def test_saving_or_quantising_keeps_the_onnx_engine(saved, tmp_path):
    """save() and quantized() must not put an ONNX model back on torch without a word."""
    _, path = saved
    model = BehaviorLM.load(path).use_engine("onnx", path)
    model.save(tmp_path / "copy")
    assert isinstance(model.engine, OnnxEngine), type(model.engine)
    assert model.engine.quantized(None) is model.engine
    with pytest.raises(ConfigurationError, match="onnx-int8"):
        model.engine.quantized("int8")


def test_export_of_other_weights_is_refused_and_redone(saved, tmp_path, caplog):
    model, path = saved
    other = BehaviorLM(max_len=24, dim=32, n_layers=2, n_heads=2, epochs=1, seed=5, progress=False)
    other.fit(validate_events(make_events(n_users=20, n_items=40, length=10, seed=7)))
    other_dir = tmp_path / "other"
    other.save(other_dir)
    export_onnx(model.engine, other_dir / FOLDER)  # the wrong model's graph beside it
    with pytest.raises(ModelFormatError, match="not of this model"):
        open_export(other_dir / FOLDER, other.engine)
    BehaviorLM.load(other_dir).use_engine("onnx", other_dir)
    assert "not of this model" in caplog.text
    assert json.loads((other_dir / FOLDER / "export.json").read_text())["model_version"] == other.model_version


def test_cli_export_reports_the_differences(saved, tmp_path):
    _, path = saved
    out = tmp_path / "exported"
    res = CliRunner().invoke(app, ["export", "--model", str(path), "--out", str(out), "--quantize", "int8"])
    assert res.exit_code == 0, res.output
    assert "heads.onnx: max |onnxruntime - torch|" in res.output and (out / "heads.int8.onnx").is_file()
    bad = CliRunner().invoke(app, ["export", "--model", str(path), "--out", str(out), "--format", "tflite"])
    assert bad.exit_code != 0 and "--format must be onnx" in bad.output


def test_unknown_engine_names_the_flag(saved):
    model, _ = saved
    with pytest.raises(ConfigurationError, match="engine must be one of") as e:
        BehaviorLM.load(saved[1]).use_engine("tensorrt")
    assert "--engine" in str(e.value.cli_hint)
    shutil.rmtree(saved[1] / FOLDER, ignore_errors=True)


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_export_is_redone_with_one_warning(saved, tmp_path, caplog, damage):
    """Issue 31 item 7: a damaged graph beside the model is re-exported, never handed to
    onnxruntime (whose protobuf error was a traceback)."""
    import shutil

    _, path = saved
    copy = tmp_path / "m"
    shutil.copytree(path, copy)
    BehaviorLM.load(copy).use_engine("onnx", copy)  # the export kept beside the model
    graph = copy / FOLDER / "heads.onnx"
    if damage == "truncated":
        graph.write_bytes(graph.read_bytes()[:100])
    else:
        graph.unlink()
    caplog.clear()
    engine = BehaviorLM.load(copy).use_engine("onnx", copy).engine
    assert isinstance(engine, OnnxEngine) and "not the file that was exported" in caplog.text
    open_export(copy / FOLDER, engine)  # exported anew, verifies


def test_rotary_positions_and_swiglu_export_and_score_the_same(tmp_path):
    ev = validate_events(make_events(n_users=30, n_items=40, length=20, seed=3))
    model = BehaviorLM(
        max_len=24, dim=32, n_layers=2, n_heads=2, epochs=1, seed=0, progress=False, positions="rope", ffn="swiglu"
    ).fit(ev)
    model.save(tmp_path / "m")
    loaded = BehaviorLM.load(tmp_path / "m")
    assert loaded.params["positions"] == "rope" and loaded.params["ffn"] == "swiglu"
    onnx = loaded.use_engine("onnx", tmp_path / "m")
    enc = model.engine.encode(model.history_events())
    diff = compare(model.engine, onnx.engine, enc, slice(0, len(enc)))
    assert max(diff.values()) < 1e-4, diff
