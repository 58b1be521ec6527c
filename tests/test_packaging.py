"""Installable beside other libraries: metadata ranges, extras, versions, the docs' CLI reference."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import behaviorlm
from behaviorlm.cli import app
from behaviorlm.errors import MissingExtraError
from behaviorlm.extras import EXTRAS, require_extra
from tests.conftest import cli_failed

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the metadata is the same on 3.10


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_torch_is_a_range_and_the_exact_pin_lives_in_constraints():
    deps = _project()["dependencies"]
    torch = next(d for d in deps if _name(d) == "torch")
    assert "==" not in torch and ">=" in torch, torch
    assert re.search(r"^torch==\d", (ROOT / "constraints.txt").read_text(), re.M)
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()
    assert _project()["requires-python"] == ">=3.10"


def test_core_is_the_data_science_stack_and_no_package_is_listed_twice():
    project = _project()
    core = {_name(d) for d in project["dependencies"]}
    assert not core & {"fastapi", "uvicorn", "streamlit", "altair", "pyspark"}
    seen: dict[str, str] = {name: "core" for name in core}
    for extra, reqs in project["optional-dependencies"].items():
        for req in reqs:
            name = _name(req)
            if name == "behaviorlm":  # dev = behaviorlm[serve,dashboard,spark,docs] + tools
                continue
            assert name not in seen, f"{name} in both {seen[name]} and {extra}"
            seen[name] = extra
    assert {"serve", "dashboard", "spark", "dev"} <= set(project["optional-dependencies"])


def test_a_missing_extra_is_one_line_naming_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn -> ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'behaviorlm\[serve\]'"):
        require_extra("serve", "behaviorlm serve")
    res = CliRunner().invoke(app, ["serve", "--model", "models:/behaviorlm@champion"])
    assert "needs the optional 'serve' extra (uvicorn is not installed)" in cli_failed(res)
    assert set(EXTRAS) >= {"serve", "dashboard", "spark"}


def test_version_everywhere():
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.startswith(f"behaviorlm {behaviorlm.__version__} (model format")
    assert f"## {behaviorlm.__version__}" in (ROOT / "CHANGELOG.md").read_text()


def test_the_cli_reference_matches_the_cli():
    from docs.gen_cli import TARGET, render

    assert TARGET.read_text() == render(), "docs/cli.md is stale: run python docs/gen_cli.py"


def test_the_public_names_come_from_the_package_root_lazily():
    """`from behaviorlm import BehaviorLM` works (issue 31, item 18), and `import behaviorlm`
    still loads neither torch nor polars."""
    import subprocess

    code = "import sys, behaviorlm; print('torch' in sys.modules, 'polars' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split() == [
        "False",
        "False",
    ]
    from behaviorlm import BehaviorLM, evaluate, load_dataset, user_propensities
    from behaviorlm.recommender import BehaviorLM as Estimator

    assert BehaviorLM is Estimator and callable(evaluate) and callable(load_dataset) and callable(user_propensities)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        behaviorlm.nope  # noqa: B018


def test_the_demo_install_has_every_extra_the_demo_uses():
    """Issue 31 item 17: `make demo` ranks Taobao's 55k items, past the ANN threshold, so its
    install carries the index library instead of printing that it is missing."""
    import re

    from behaviorlm.inference.retrieval import ANN_MIN_ITEMS

    make = (ROOT / "Makefile").read_text()
    recipe = make[make.index("$(STAMP_APP):") :].split("\n\n")[0]
    extras = set(re.search(r"-e '\.\[([a-z,]+)\]'", recipe).group(1).split(","))
    assert {"serve", "dashboard", "ann"} <= extras and ANN_MIN_ITEMS < 55_233


def test_the_readme_shows_the_demo_output_the_docs_show():
    """Issue 31 item 15: one recorded demo run (docs/demo-output.txt, regenerated from a fresh
    run), shown word for word in the README, so the two cannot drift apart."""
    recorded = (ROOT / "docs" / "demo-output.txt").read_text().strip()
    assert recorded.startswith("behaviorlm demo: the main job") and "promotion: behaviorlm v1 -> @" in recorded
    assert recorded in (ROOT / "README.md").read_text()
