"""The exceptions behaviorlm raises on purpose, so callers can tell a bad input from a bug.

Everything expected -- bad data, bad settings, an unreadable model directory -- is a
:class:`BehaviorLMError`. The CLI and the pipelines print such an error as one line and exit
with status 2; any other exception is a bug and keeps its traceback (exit 1).

An error can carry two phrasings of its remedy: ``hint`` in Python terms (the default
``str()``), and ``cli_hint`` in the command line's own flags, which the CLI prints instead.
The concrete classes subclass :class:`ValueError` where callers have always caught that.
"""

from __future__ import annotations


class BehaviorLMError(Exception):
    """Base class of every error behaviorlm raises deliberately."""

    def __init__(self, message: str, *, hint: str | None = None, cli_hint: str | None = None):
        super().__init__(message)
        self.message, self.hint, self.cli_hint = message, hint, cli_hint

    def __str__(self) -> str:
        return self.message + (f". {self.hint}" if self.hint else "")

    def cli_message(self) -> str:
        """The message with the remedy phrased in the CLI's flags (falls back to the Python hint)."""
        hint = self.cli_hint or self.hint
        return self.message + (f". {hint}" if hint else "")


class InputDataError(BehaviorLMError, ValueError):
    """Input data that cannot be used as given: the message names the column/field and a bad row."""


class ConfigurationError(BehaviorLMError, ValueError):
    """A parameter, option or combination of them that cannot work."""


class NotFittedError(BehaviorLMError, RuntimeError):
    """An estimator used before ``fit`` or ``load`` (a ``RuntimeError``, as it always was)."""


class ModelFormatError(BehaviorLMError):
    """A model directory (or another saved artifact) that is missing, incomplete or of another format version."""


class MissingExtraError(BehaviorLMError, ImportError):
    """An optional part was used without its extra installed (``pip install 'behaviorlm[serve]'``)."""
