"""An output path never deletes what the project did not write (issue 31, item 1): `train --out`
and `export --out` replace only a folder of their own kind, refuse anything else naming --force,
and refuse the current folder, its parents, the root, an empty name and a file outright."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from behaviorlm.cli import app
from behaviorlm.data.io import check_output_dir
from behaviorlm.errors import ConfigurationError
from tests.conftest import cli_failed, make_events

runner = CliRunner()
SMALL = ["--epochs", "1", "--dim", "8", "--layers", "1", "--heads", "1", "--max-len", "8", "--batch-size", "32"]


@pytest.fixture(scope="module")
def events_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("ev") / "events.csv"
    make_events(n_users=20).write_csv(path)
    return path


def _user_folder(root):
    (root / "sub").mkdir(parents=True)
    (root / "notes.txt").write_text("hi")
    return root


def test_train_refuses_a_folder_it_did_not_write_and_replaces_it_with_force(events_csv, tmp_path):
    x = _user_folder(tmp_path / "x")
    train = ["train", "--events", str(events_csv), *SMALL, "--out", str(x)]
    text = cli_failed(runner.invoke(app, train))
    assert "--force" in text and "estimator.json" in text
    assert (x / "notes.txt").read_text() == "hi" and (x / "sub").is_dir()  # untouched
    assert runner.invoke(app, [*train, "--force"]).exit_code == 0
    assert (x / "estimator.json").is_file() and not (x / "notes.txt").exists()
    again = runner.invoke(app, train)  # a model folder is replaced without --force: a rerun
    assert again.exit_code == 0, again.output


def test_export_never_replaces_the_model_it_exports(events_csv, tmp_path):
    model = tmp_path / "m"
    assert runner.invoke(app, ["train", "--events", str(events_csv), *SMALL, "--out", str(model)]).exit_code == 0
    before = sorted(p.name for p in model.iterdir())
    for force in ([], ["--force"]):
        text = cli_failed(runner.invoke(app, ["export", "--model", str(model), "--out", str(model), *force]))
        assert "is the --model folder itself" in text
    assert sorted(p.name for p in model.iterdir()) == before
    other = _user_folder(tmp_path / "other")
    assert "--force" in cli_failed(runner.invoke(app, ["export", "--model", str(model), "--out", str(other)]))
    assert (other / "notes.txt").exists()


@pytest.mark.parametrize("bad", ["", ".", "..", "/", "x/.."])
def test_names_that_are_never_an_output(bad, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x").mkdir()
    with pytest.raises(ConfigurationError) as e:
        check_output_dir(bad, "estimator.json", "model folder", force=True)
    assert "--out" in e.value.cli_message()
    assert (tmp_path / "x").is_dir()


def test_a_file_where_a_folder_is_expected(tmp_path, events_csv):
    f = tmp_path / "model.txt"
    f.write_text("not a folder")
    text = cli_failed(runner.invoke(app, ["train", "--events", str(events_csv), *SMALL, "--out", str(f)]))
    assert "is a file" in text and f.read_text() == "not a folder"
