"""Optional parts and the extra that installs each: one line telling the user what to install.

The core (training, evaluation, scoring, propensity, segments, explanations) needs only the
data-science stack; the HTTP service, ANN retrieval, ONNX, the dashboard and Spark live in extras so a notebook
user's environment does not pull a web server. Code that needs an extra calls
:func:`require_extra` before importing it, so a missing package reads as an instruction, not
as a ``ModuleNotFoundError`` deep inside an import chain.
"""

from __future__ import annotations

import importlib

from behaviorlm.errors import MissingExtraError

#: extra name -> the top-level modules it provides
EXTRAS: dict[str, tuple[str, ...]] = {
    "serve": ("fastapi", "uvicorn", "prometheus_client"),
    "ann": ("hnswlib",),
    "onnx": ("onnx", "onnxruntime", "onnxscript"),
    "dashboard": ("streamlit", "altair"),
    "spark": ("pyspark",),
}


def missing_extra(extra: str, feature: str, exc: ImportError) -> MissingExtraError:
    """The one-line error for ``feature`` failing to import a module of ``extra``."""
    module = getattr(exc, "name", None) or "a package"
    return MissingExtraError(
        f"{feature} needs the optional '{extra}' extra ({module} is not installed): pip install 'behaviorlm[{extra}]'"
    )


def require_extra(extra: str, feature: str) -> None:
    """Raise :class:`MissingExtraError` naming ``extra`` when one of its modules cannot be imported."""
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise missing_extra(extra, feature, exc) from exc
