"""Where a benchmark figure came from: written into every JSON the benchmarks produce.

A figure without its commit, command and hardware cannot be reproduced or compared, so every
script writes its result through :func:`write_json`, which adds a ``provenance`` block: the git
commit (and whether the tree had uncommitted changes), the command line, behaviorlm / torch /
Python versions, CPU model and core count, and the UTC time.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance() -> dict[str, Any]:
    import torch

    import behaviorlm

    return {
        "commit": _git("rev-parse", "HEAD") or "unknown",
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "command": " ".join(["python", *sys.argv]),
        "behaviorlm": behaviorlm.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_json(path: Path, payload: Any) -> Path:
    """``payload`` (a dict, or anything under ``result``) plus ``provenance``, written atomically."""
    body = {"provenance": provenance(), **(payload if isinstance(payload, dict) else {"result": payload})}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(body, indent=2, default=str))
    tmp.replace(path)
    print(f"wrote {path} (commit {body['provenance']['commit'][:10]})")
    return path
