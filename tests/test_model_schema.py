"""A model directory describes itself: its input schema travels to every consumer, its format is
versioned, saving is atomic; recipes live in one place; errors speak the caller's language."""

from __future__ import annotations

import json

import pandas as pd
import polars as pl
import pytest
from sklearn.base import clone
from typer.testing import CliRunner

from behaviorlm.cli import app
from behaviorlm.data.schema import ColumnMapping, InputSchema
from behaviorlm.errors import BehaviorLMError, ConfigurationError, ModelFormatError
from behaviorlm.model_dir import FORMAT_VERSION, MANIFEST
from behaviorlm.recipes import RECIPES, get_recipe
from behaviorlm.recommender import BehaviorLM
from behaviorlm.sequence.tokenizer import ActionTokenizer
from tests.conftest import cli_failed, make_funnel_events

runner = CliRunner()
SMALL = ["--epochs", "2", "--dim", "16", "--layers", "1", "--heads", "1", "--max-len", "32", "--batch-size", "32"]
COLUMNS = ["--user-col", "visitor", "--item-col", "product", "--action-col", "action", "--time-col", "ts"]
SCHEMA_FLAGS = [*COLUMNS, "--time-unit", "ms", "--action-map", "review=interaction"]


def _shop_log() -> pl.DataFrame:
    """The funnel clickstream in a tracker's own vocabulary: other column names, millisecond
    times, and a 'review' action that no built-in alias knows."""
    df = make_funnel_events(n_users=90)
    review = (pl.int_range(pl.len()) % 7 == 0) & (pl.col("event_type") == "view")
    return df.select(
        pl.col("user_id").alias("visitor"),
        pl.col("item_id").alias("product"),
        pl.when(review).then(pl.lit("review")).otherwise(pl.col("event_type")).alias("action"),
        (pl.col("timestamp") * 1000).alias("ts"),
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("schema")
    _shop_log().write_csv(root / "shop.csv")
    res = runner.invoke(
        app, ["train", "--events", str(root / "shop.csv"), *SCHEMA_FLAGS, "--out", str(root / "m"), *SMALL]
    )
    assert res.exit_code == 0, res.output
    return root


def test_the_model_stores_its_input_schema(trained):
    manifest = json.loads((trained / "m" / MANIFEST).read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["recipe"] == "ml-1m@1"
    schema = BehaviorLM.load(trained / "m").input_schema_
    assert schema.columns == ColumnMapping("visitor", "product", "action", "ts")
    assert schema.action_map == {"review": "interaction"} and schema.time_unit == "ms"


def test_every_cli_consumer_applies_the_stored_schema(trained):
    events, model = ["--events", str(trained / "shop.csv")], ["--model", str(trained / "m")]
    for args in (
        ["evaluate", *model, *events, "--metrics-out", str(trained / "metrics.json")],
        ["score", *model, *events, "--out", str(trained / "scores.parquet")],
        ["recommend", *model, *events, "--k", "3"],
        ["next-actions", *model, *events, "--steps", "1"],
        ["propensity", *model, *events, "--method", "lightgbm", "--out", str(trained / "p.parquet")],
        ["explain", *model, *events, "--offline", "--max-users", "3", "--out", str(trained / "r.parquet")],
    ):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, (args[0], res.output)
    assert pl.read_parquet(trained / "scores.parquet")["user_id"].n_unique() == 90


def test_an_explicit_flag_still_overrides_the_stored_schema(trained):
    res = runner.invoke(
        app,
        ["score", "--model", str(trained / "m"), "--events", str(trained / "shop.csv"), "--item-col", "sku"]
        + ["--out", str(trained / "x.parquet")],
    )
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert "missing column(s) item='sku'" in text and "--item-col" in text and "ColumnMapping" not in text


def test_the_service_and_the_pyfunc_accept_the_training_vocabulary(trained):
    from fastapi.testclient import TestClient

    from behaviorlm.service.api import create_app
    from behaviorlm.tracking import predict_frame

    events = [
        {"item_id": "i3", "event_type": "review", "timestamp": "2023-11-15T10:00:00Z"},
        {"item_id": "i4", "event_type": "view", "timestamp": "2023-11-15T10:01:00Z"},
    ]
    with TestClient(create_app(str(trained / "m"), api_key="")) as client:
        for _ in range(200):  # the model loads in the background
            if client.get("/ready").status_code == 200:
                break
        res = client.post("/v1/recommend", json={"events": events, "k": 3})
    assert res.status_code == 200, res.text
    assert len(res.json()["items"]) == 3
    model = BehaviorLM.load(trained / "m")
    raw = _shop_log().head(40).to_pandas()
    out = predict_frame(model, raw, {"k": 2})
    assert isinstance(out, pd.DataFrame) and out["user_id"].nunique() == raw["visitor"].nunique()


def test_unknown_actions_are_explained_with_the_clis_own_flags(trained, tmp_path):
    args = ["train", "--events", str(trained / "shop.csv"), *COLUMNS, "--time-unit", "ms", "--out", str(tmp_path)]
    text = cli_failed(runner.invoke(app, args))
    assert "column 'action': unknown action name(s) ['review']" in text  # the user's column, not event_type
    assert "--action-map 'review=rate'" in text and "--unknown-actions keep" in text  # the likely canonical name
    assert "action_map=" not in text


def test_unknown_action_names_suggest_the_likely_canonical_action():
    """Issue 31 item 17: 'basket' is an add_to_cart, not an 'interaction'."""
    from behaviorlm.data.events import suggested_action

    got = {n: suggested_action(n) for n in ("basket", "AddToBag", "paid_order", "wish", "product_detail", "zap")}
    assert got == {
        "basket": "add_to_cart",
        "AddToBag": "add_to_cart",
        "paid_order": "purchase",
        "wish": "add_to_favorites",
        "product_detail": "view",
        "zap": "interaction",
    }


def test_unknown_actions_can_be_kept_as_their_own_type(trained, tmp_path):
    args = ["train", "--events", str(trained / "shop.csv"), *COLUMNS, "--time-unit", "ms", "--unknown-actions", "keep"]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "m"), *SMALL])
    assert res.exit_code == 0, res.output
    model = BehaviorLM.load(tmp_path / "m")
    assert "review" in model.engine.action_names and model.input_schema_.unknown_actions == "keep"


def test_python_callers_get_the_python_phrasing():
    from behaviorlm.data.events import validate_events

    with pytest.raises(BehaviorLMError) as info:
        validate_events(_shop_log(), ColumnMapping("visitor", "product", "action", "ts"), time_unit="ms")
    assert "action_map={'review': 'rate', ...}" in str(info.value) and "--action-map" not in str(info.value)


def test_a_bug_keeps_its_traceback_and_exit_code_1(trained, monkeypatch):
    def broken(directory, **options):
        raise KeyError("a real bug")

    monkeypatch.setattr(BehaviorLM, "load", broken)
    res = runner.invoke(app, ["evaluate", "--model", str(trained / "m"), "--events", str(trained / "shop.csv")])
    assert res.exit_code == 1 and isinstance(res.exception, KeyError)


def test_pipelines_turn_library_errors_into_exit_2_and_keep_bugs_visible(capsys):
    from pipelines.common import cli_main

    def expected(_args):
        raise ConfigurationError("bad option", cli_hint="use --right-flag")

    assert cli_main(expected, lambda argv: None, []) == 2
    assert "error: bad option. use --right-flag" in capsys.readouterr().err

    def bug(_args):
        raise KeyError("a real bug")

    with pytest.raises(KeyError):
        cli_main(bug, lambda argv: None, [])


# ---------------------------------------------------------------------------- the model directory


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    ev = make_funnel_events(n_users=30)
    model = BehaviorLM("quick", epochs=1, dim=8, n_layers=1, n_heads=1, max_len=16, progress=False).fit(ev)
    return model


def test_format_1_directories_are_migrated(small_model, tmp_path):
    small_model.save(tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / MANIFEST).read_text())
    for key in ("format_version", "input_schema", "recipe", "behaviorlm_version"):
        manifest.pop(key)
    (tmp_path / "m" / MANIFEST).write_text(json.dumps(manifest))
    back = BehaviorLM.load(tmp_path / "m")
    assert back.input_schema_ == InputSchema()
    assert back.recommend([0], k=3)["item_id"].to_list() == small_model.recommend([0], k=3)["item_id"].to_list()


def test_newer_formats_are_refused_naming_both_versions(small_model, tmp_path):
    small_model.save(tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / MANIFEST).read_text())
    (tmp_path / "m" / MANIFEST).write_text(json.dumps(manifest | {"format_version": 99, "behaviorlm_version": "9.0"}))
    with pytest.raises(ModelFormatError, match=r"format version 99 \(written by behaviorlm 9.0\).*1 to 3"):
        BehaviorLM.load(tmp_path / "m")


def test_saving_is_atomic(small_model, tmp_path, monkeypatch):
    target = tmp_path / "m"
    small_model.save(target)
    before = (target / MANIFEST).read_text()

    def crash(self, path):
        raise OSError("disk full")

    monkeypatch.setattr(ActionTokenizer, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        small_model.save(target)
    assert (target / MANIFEST).read_text() == before and BehaviorLM.load(target) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder left behind


# ---------------------------------------------------------------------------- recipes


def test_the_default_estimator_is_the_benchmarked_ml1m_recipe():
    p = BehaviorLM().params
    # benchmarks/RESULTS.md section 1 (NDCG@10 0.1812): what the command line recorded there
    recorded = {"dim": 64, "n_layers": 2, "n_heads": 2, "ffn_mult": 1, "max_len": 200, "batch_size": 128}
    recorded |= {"lr": 2e-3, "dropout": 0.1, "epochs": 30, "loss": "full", "weight_decay": 0.1, "seed": 42}
    assert {k: p[k] for k in recorded} == recorded
    assert p == get_recipe("ml-1m").params


def test_recipes_are_named_versioned_and_overridable():
    assert {"ml-1m", "clickstream-small", "quick"} <= set(RECIPES)
    m = BehaviorLM("clickstream-small", epochs=3)
    assert m.params["epochs"] == 3 and m.params["n_negatives"] == 4096 and m.params["loss"] == "auto"
    assert "recipe='clickstream-small@2'" in repr(m) and "epochs=3" in repr(m)
    with pytest.raises(ConfigurationError, match="unknown recipe"):
        BehaviorLM("nope")
    with pytest.raises(ConfigurationError, match="has no version '9'; known: \\['ml-1m@1', 'ml-1m@2'\\]"):
        get_recipe("ml-1m@9")
    # a preview version is used only when named: the plain name keeps the latest released one
    assert get_recipe("ml-1m").ref == "ml-1m@1" and get_recipe("ml-1m@2").params["positions"] == "rope"
    # a new version leaves the old one loadable by name (a saved model names its version)
    assert get_recipe("clickstream-small@1").params["copy_head"] is False
    assert (
        get_recipe("clickstream-small").ref == "clickstream-small@2"
        and get_recipe("clickstream-small").params["copy_head"]
    )


def test_scikit_learn_protocol():
    m = BehaviorLM("quick", dim=16)
    c = clone(m)
    assert c.get_params() == m.get_params() and c is not m
    assert c.set_params(epochs=2).params["epochs"] == 2
    with pytest.raises(ConfigurationError, match="unknown BehaviorLM parameter"):
        m.set_params(wings=2)
    with pytest.raises(ConfigurationError, match="divisible"):
        BehaviorLM(dim=10, n_heads=3)


def test_format_2_directories_load_without_a_copy_head(small_model, tmp_path):
    """Folders written before the repeat-aware output (format 2, no copy_head in config.json)."""
    small_model.save(tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / MANIFEST).read_text())
    (tmp_path / "m" / MANIFEST).write_text(json.dumps(manifest | {"format_version": 2}))
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config.pop("copy_head")
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    back = BehaviorLM.load(tmp_path / "m")
    assert back.model_.copy_head is None and not back.model_.config.copy_head
    assert back.recommend([0], k=3)["item_id"].to_list() == small_model.recommend([0], k=3)["item_id"].to_list()


def test_one_model_version_before_and_after_saving(small_model, tmp_path):
    """Scores written before saving name the version the saved (and reloaded) model carries."""
    from behaviorlm.inference.batch import score_events

    before = small_model.model_version
    stamped = score_events(small_model.engine, small_model.history_events(), tmp_path / "s.parquet", progress=False)
    small_model.save(tmp_path / "m")
    assert small_model.model_version == before
    assert json.loads((tmp_path / "m" / MANIFEST).read_text())["model_version"] == before
    assert BehaviorLM.load(tmp_path / "m").model_version == before
    assert pl.read_parquet(stamped.out)["model_version"].unique().to_list() == [before]


def test_the_recipe_is_the_one_source_of_defaults():
    """TrainConfig and ModelConfig default to the recipes' base parameters (they disagreed once:
    ffn 1 vs 4, dropout 0.1 vs 0.2, epochs 30 vs 50, lr 2e-3 vs 1e-3)."""
    from dataclasses import fields

    from behaviorlm.nn.model import ModelConfig
    from behaviorlm.nn.training import TrainConfig
    from behaviorlm.recipes import BASE_PARAMS

    model, train = ModelConfig(10, 5, 5), TrainConfig()
    for cfg in (model, train):
        shared = [f.name for f in fields(cfg) if f.name in BASE_PARAMS]
        assert len(shared) >= 6
        assert {n: getattr(cfg, n) for n in shared} == {n: BASE_PARAMS[n] for n in shared}


def _copy_model(small_model, root, name):
    import shutil

    small_model.save(root / "orig")
    shutil.copytree(root / "orig", root / name)
    return root / name


def test_weights_from_another_model_are_refused(small_model, tmp_path):
    """Issue 31 item 4: the manifest's version is checked against the weights on load."""
    other = BehaviorLM("quick", epochs=1, dim=8, n_layers=1, n_heads=1, max_len=16, seed=7, progress=False)
    other.fit(make_funnel_events(n_users=30)).save(tmp_path / "other")  # same shapes, other weights
    swapped = _copy_model(small_model, tmp_path, "swapped")
    (swapped / "weights.pt").write_bytes((tmp_path / "other" / "weights.pt").read_bytes())
    with pytest.raises(ModelFormatError, match="weights.pt is not the model this folder describes"):
        BehaviorLM.load(swapped)
    text = cli_failed(runner.invoke(app, ["recommend", "--model", str(swapped), "--user", "0"]))
    assert "copy the whole model folder" in text


def test_a_vocabulary_of_another_size_is_refused(small_model, tmp_path):
    short = _copy_model(small_model, tmp_path, "short")
    tok = json.loads((short / "tokenizer.json").read_text())
    tok["items"] = tok["items"][:-3]
    tok["item_counts"] = tok["item_counts"][:-3]
    (short / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ModelFormatError, match="come from different models"):
        BehaviorLM.load(short)


def test_damaged_or_missing_files_are_one_line_without_unpickling_advice(small_model, tmp_path):
    """Issue 31 item 7: never torch's advice to load with weights_only=False."""
    bad = _copy_model(small_model, tmp_path, "bad")
    (bad / "weights.pt").write_bytes(b"not a checkpoint")
    text = cli_failed(runner.invoke(app, ["recommend", "--model", str(bad), "--user", "0"]))
    assert "weights.pt is damaged" in text and "weights_only" not in text
    gone = _copy_model(small_model, tmp_path, "gone")
    (gone / "seen.parquet").unlink()
    with pytest.raises(ModelFormatError, match="seen.parquet is missing"):
        BehaviorLM.load(gone)


def test_a_model_saved_before_0_8_is_checked_by_its_file_digest(small_model, tmp_path):
    import hashlib

    old = _copy_model(small_model, tmp_path, "old")
    manifest = json.loads((old / MANIFEST).read_text())
    manifest.pop("version_of")
    manifest["model_version"] = hashlib.sha256((old / "weights.pt").read_bytes()).hexdigest()[:12]
    (old / MANIFEST).write_text(json.dumps(manifest))
    assert BehaviorLM.load(old).model_version == manifest["model_version"]
    (old / MANIFEST).write_text(json.dumps({**manifest, "model_version": "0123456789ab"}))
    with pytest.raises(ModelFormatError, match="not the model this folder describes"):
        BehaviorLM.load(old)


def test_a_folder_that_does_not_say_what_its_version_digests_is_checked_both_ways(small_model, tmp_path):
    """Folders written while 0.8 was made recorded the tensor digest without ``version_of``:
    they load; a version matching neither digest is still refused."""
    interim = _copy_model(small_model, tmp_path, "interim")
    manifest = json.loads((interim / MANIFEST).read_text())
    manifest.pop("version_of")
    (interim / MANIFEST).write_text(json.dumps(manifest))
    assert BehaviorLM.load(interim).model_version == small_model.model_version
    (interim / MANIFEST).write_text(json.dumps({**manifest, "model_version": "0123456789ab"}))
    with pytest.raises(ModelFormatError, match="not the model this folder describes"):
        BehaviorLM.load(interim)
