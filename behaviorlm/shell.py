"""What the command line and the pipelines' entry points share: the words of their common
options and the one rule for errors.

The rule: a deliberate error (:class:`~behaviorlm.errors.BehaviorLMError`) is one line phrased
in the shell's own flags and exit status 2; anything else is a bug and keeps its traceback.
Kept free of heavy imports: ``behaviorlm --help`` loads it.
"""

from __future__ import annotations

from collections.abc import Callable

from behaviorlm.errors import BehaviorLMError

#: The help of the options ``behaviorlm`` and the pipeline entry points both declare.
OPTION_HELP = {
    "action": "rank by P(item | next action = ACTION)",
    "quantize": "int8: torch dynamic quantisation of Linear layers",
    "threads": "torch threads (default: $OMP_NUM_THREADS, else all cores)",
    "events": "events file (.csv[.gz], .tsv, .parquet)",
    "dataset": "bundled dataset name instead of --events",
}


def exit_status(run: Callable[[], object], say: Callable[[str], None]) -> int:
    """Run ``run``; 0, or 2 after ``say``-ing a deliberate error's one-line message (in CLI
    terms). Any other exception propagates: it is a bug, and its traceback is the report."""
    try:
        run()
    except BehaviorLMError as exc:
        say(exc.cli_message())
        return 2
    return 0
