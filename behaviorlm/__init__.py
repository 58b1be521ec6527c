"""behaviorlm: user behaviour as a language.

Layers, each a sub-package, data flowing one way (see README "How it works"):
``data`` -> ``sequence`` -> ``nn`` -> ``inference`` -> (``recommender``, ``evaluation``,
``propensity``, ``segments``, ``explain``) -> ``tracking``, ``service``, ``cli``.
Importing the package is cheap: nothing heavy loads until a layer is used.
"""

from typing import Any

__version__ = "0.9.0"

#: The names a user reaches for first, imported from their layer on first use (PEP 562), so
#: ``from behaviorlm import BehaviorLM`` works and ``import behaviorlm`` loads nothing heavy.
_PUBLIC = {
    "BehaviorLM": "behaviorlm.recommender",
    "evaluate": "behaviorlm.evaluation",
    "leave_one_out": "behaviorlm.evaluation",
    "temporal_split": "behaviorlm.evaluation",
    "load_dataset": "behaviorlm.data.datasets",
    "validate_events": "behaviorlm.data.events",
    "fit_from_source": "behaviorlm.fitting",
    "PropensityModel": "behaviorlm.propensity",
    "user_propensities": "behaviorlm.propensity",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'behaviorlm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
