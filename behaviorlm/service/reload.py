"""Hot reload: follow a registry alias (``models:/behaviorlm@champion``) while serving.

A background thread asks the registry, every ``interval`` seconds, which version the alias
names. When it moves, that exact version (``models:/name/<v>``, so a second move during the
load cannot mix two versions) is loaded and made ready off to the side -- known users encoded,
batcher started -- and then swapped in with one assignment. Requests that already hold the old
version finish on it; its batcher closes when the last of them leaves
(:meth:`behaviorlm.service.api.ServiceState.swap`). A failed load keeps the old version serving,
counts a failed reload and says why on ``/ready``. A version that failed is retried with
exponential back-off (the poll interval doubled per failure, at most :data:`MAX_BACKOFF_S`) and
its traceback logged once, later failures of the same version in one line, so a broken version
left under the alias neither floods the log nor reloads at every poll; a new version under the
alias is tried at the next poll.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from behaviorlm.data.timestamps import UTC

log = logging.getLogger("behaviorlm.service.reload")
MAX_BACKOFF_S = 3600.0


class RegistryWatcher:
    """Polls a registry alias and hot-swaps the served model when the alias moves."""

    def __init__(
        self,
        uri: str,
        interval: float,
        provenance: dict[str, Any],
        build: Callable[[Any, dict[str, Any]], Any],
        swap: Callable[[Any], Any],
        metrics: Any = None,
        load_options: dict[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if interval <= 0:
            raise ValueError(f"reload interval must be > 0 seconds, got {interval}")
        self.uri, self.interval = uri, interval
        self.name, _, self.alias = uri.removeprefix("models:/").partition("@")
        if not self.alias:
            raise ValueError(f"hot reload follows an alias (models:/name@alias), not {uri!r}")
        self.version: str | None = provenance.get("registry_version")
        self.build, self.swap, self.metrics = build, swap, metrics
        self.load_options = load_options or {}
        self.checked_at: str | None = None
        self.last_error: str | None = None
        self.last_swap_seconds: float | None = None
        self.reloads = 0
        self.failures: dict[str, int] = {}  # version -> failed loads in a row
        self._retry_at: dict[str, float] = {}  # version -> monotonic time of its next try
        self._clock = clock  # for the back-off; a test passes its own
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="registry-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def status(self) -> dict[str, Any]:
        return {
            "follows": self.uri,
            "interval_s": self.interval,
            "registry_version": self.version,
            "checked_at": self.checked_at,
            "reloads": self.reloads,
            "last_swap_seconds": self.last_swap_seconds,
            "last_error": self.last_error,
        }

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.check()

    def check(self) -> bool:
        """One poll: swap in the alias's version if it moved. True when a new version went live."""
        from behaviorlm.tracking import alias_version, load_model_ref

        version: str | None = None
        try:
            version = alias_version(self.name, self.alias)
            self.checked_at = datetime.now(UTC).isoformat(timespec="seconds")
            if version == self.version or self._clock() < self._retry_at.get(version, 0.0):
                return False
            t0 = time.perf_counter()
            model, provenance = load_model_ref(f"models:/{self.name}/{version}", **self.load_options)
            serving = self.build(model, provenance | {"model_uri": self.uri, "registry_version": version})
            self.swap(serving)
            gc.freeze()  # the new version's objects join the start-up ones outside the cyclic GC (see api._first_load)
        except Exception as e:  # keep serving the old version; say why on /ready
            self._failed(version, e)
            return False
        self.last_swap_seconds = time.perf_counter() - t0
        self.version, self.last_error, self.reloads = version, None, self.reloads + 1
        log.info("hot reload: %s now serves registry version %s (%.1fs)", self.uri, version, self.last_swap_seconds)
        if self.metrics is not None:
            self.metrics.reloaded(True, self.last_swap_seconds)
        return True

    def _failed(self, version: str | None, error: Exception) -> None:
        """Record a failed poll or load; back off from ``version`` and log its traceback once."""
        self.last_error = f"{type(error).__name__}: {error}"
        if self.metrics is not None:
            self.metrics.reloaded(False)
        if version is None:  # the registry itself did not answer: try again at the next poll
            log.warning("hot reload of %s: registry not reachable (%s)", self.uri, self.last_error)
            return
        n = self.failures.get(version, 0) + 1
        self.failures[version] = n
        wait = min(self.interval * 2**n, MAX_BACKOFF_S)
        self._retry_at[version] = self._clock() + wait
        message = "hot reload of %s failed (registry version %s, attempt %d); still serving version %s; retry in %.0fs"
        args = (self.uri, version, n, self.version, wait)
        if n == 1:
            log.exception(message, *args)
        else:
            log.warning(message + ": %s", *args, self.last_error)
