"""The architecture, checked: layers import only downwards, no import cycles, no private reach-ins.

These read the source (``ast``), so they hold for lazy imports inside functions too; imports
under ``if TYPE_CHECKING:`` are type hints only and are not counted.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("behaviorlm", "pipelines", "dashboards")

#: What each layer of the library may import (besides itself and ``behaviorlm.errors``).
ALLOWED = {
    "data": set(),
    "sequence": {"data"},
    "nn": {"data", "sequence", "recipes"},  # data: the atomic-write helper; recipes: the default parameters
    "inference": {"data", "sequence", "nn"},
    "evaluation": {"data", "inference"},  # inference: the seen-item mask serving runs
    "plots": {"data"},
    "propensity": {"data", "sequence", "nn", "inference"},
    "segments": {"data", "plots", "propensity"},
    "explain": {"data", "sequence", "nn"},  # attribution: the vocabulary's specials, the copy mixture
    "finetune": {"data", "sequence", "nn"},  # the stages after pretraining: token contexts and the network
    "model_dir": {"data", "sequence", "nn"},
    "recipes": set(),
}
#: leaf modules any layer may use: the error types, and the missing-extra message built from them
LEAVES = ("errors", "extras")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in ast.walk(node):
                if hasattr(child, "lineno"):
                    lines.add(child.lineno)
    return lines


def _imports(name: str) -> set[str]:
    """Project modules ``name`` imports anywhere in its source (not under TYPE_CHECKING)."""
    tree = ast.parse(MODULES[name].read_text())
    skip = _type_checking_lines(tree)
    found = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name) for name in MODULES}


def _package_of(module: str) -> str:
    return module.split(".")[1] if module.startswith("behaviorlm.") and module.count(".") >= 1 else module


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Depth-first search; a package's ``__init__`` importing its own submodules is re-exporting."""
    state: dict[str, int] = defaultdict(int)  # 0 new, 1 on the stack, 2 done
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + "."):
                continue
            if state[nxt] == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif state[nxt] == 0:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(graph):
        if state[name] == 0:
            visit(name, [name])
    return cycles


def test_no_import_cycles():
    assert find_cycles(GRAPH) == []


def test_the_cycle_check_can_fail():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "p": {"p.x"}, "p.x": set()}) == [["a", "b", "c", "a"]]


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_import_only_what_they_may(layer):
    bad = []
    for name, deps in GRAPH.items():
        if _package_of(name) != layer:
            continue
        for dep in deps:
            if dep.startswith("behaviorlm.") and _package_of(dep) not in ALLOWED[layer] | {layer, *LEAVES}:
                bad.append(f"{name} imports {dep}")
    assert not bad, bad


def _private_definitions(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node.name.startswith("_"):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and node.attr.startswith("_"):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and node.id.startswith("_"):
            names.add(node.id)
    return names


def private_reach_ins(paths: list[Path]) -> list[str]:
    """``obj._name`` or ``from m import _name`` where ``_name`` is another module's private."""
    found = []
    for path in paths:
        tree = ast.parse(path.read_text())
        own = _private_definitions(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                found += [f"{path.name}:{node.lineno} imports {a.name}" for a in node.names if _private(a.name)]
            elif isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own:
                base = node.value.id if isinstance(node.value, ast.Name) else ""
                if base not in ("self", "cls"):
                    found.append(f"{path.name}:{node.lineno} uses .{node.attr}")
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_reaches_into_another_modules_privates():
    paths = [*MODULES.values(), *(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    assert private_reach_ins(paths) == []


def test_the_reach_in_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from behaviorlm.data.events import _example_row\nx = model._encode_users(None, None)\n")
    assert len(private_reach_ins([bad])) == 2


def test_pyfunc_class_keeps_its_registered_import_path():
    """Registered MLflow models pickle ``behaviorlm.tracking.BehaviorLMPyfunc``: it must stay there."""
    from behaviorlm.tracking import BehaviorLMPyfunc

    assert BehaviorLMPyfunc.__module__ == "behaviorlm.tracking"


def test_leaves_stay_leaves():
    """errors and extras may be used by every layer only while they import nothing else of ours."""
    for leaf in LEAVES:
        ours = {d for d in GRAPH[f"behaviorlm.{leaf}"] if d.startswith("behaviorlm.")}
        assert ours <= {"behaviorlm.errors"}, (leaf, ours)
