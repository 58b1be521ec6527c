"""Write docs/cli.md from the typer app itself, so the CLI reference cannot drift from the code.

python docs/gen_cli.py            # rewrite docs/cli.md
python docs/gen_cli.py --check    # exit 1 if docs/cli.md is stale (tests/test_docs.py does this)
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any

import typer

from behaviorlm.cli import app

TARGET = Path(__file__).with_name("cli.md")


def _option_row(param: Any) -> str:
    names = " / ".join(f"`{n}`" for n in [*param.opts, *param.secondary_opts])
    if param.param_type_name == "argument":
        names = f"`{param.human_readable_name}` (argument)"
    help_text = (getattr(param, "help", None) or "").replace("|", "\\|").replace("\n", " ")
    default = param.default
    shown = "" if default is None or callable(default) or getattr(param, "is_flag", False) and not default else default
    if isinstance(shown, tuple | list):
        shown = ", ".join(map(str, shown))
    cell = f"`{shown}`" if shown not in ("", None) else ""
    required = " (required)" if param.required else ""
    return f"| {names}{required} | {help_text} | {cell} |"


def render() -> str:
    group: Any = typer.main.get_command(app)  # a click group (typer vendors click)
    ctx = group.make_context("behaviorlm", [], resilient_parsing=True)
    lines = [
        "# Command line",
        "",
        "Generated from `behaviorlm.cli` by `docs/gen_cli.py`; `behaviorlm COMMAND --help` prints the same.",
        "Every command that reads events takes `--events PATH` or `--dataset NAME` and the column",
        "options; a model's input schema is applied by default. Errors print one line naming the",
        "flag, the column or the row, and exit with status 2.",
        "",
        "`behaviorlm --version` prints the library, model-format, torch and Python versions.",
        "",
    ]
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if cmd is None or cmd.hidden:
            continue
        lines += [f"## `behaviorlm {name}`", "", inspect.cleandoc(cmd.help or ""), ""]
        params = [p for p in cmd.params if p.name != "help"]
        if params:
            lines += ["| option | meaning | default |", "|---|---|---|", *(_option_row(p) for p in params), ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET} is stale: run python docs/gen_cli.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
