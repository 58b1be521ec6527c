"""Starting the service: one process, or ``--workers N`` processes behind one port.

One worker is the default and the measured production shape on a 2-core box (the event loop
and the inference thread fill it). More workers put one model copy in each process (memory per
worker is in benchmarks/RESULTS.md section 8) and need uvicorn to import the app by name, so the
settings travel in an environment variable and :func:`app_from_env` rebuilds the app in each
worker. Their Prometheus metrics are pooled through prometheus-client's multiprocess mode.

Slow or oversized requests are cut off by the server (:mod:`behaviorlm.service.connections`:
a read deadline per request and a header size limit), set in every worker from the same config.

Shutdown is graceful: on SIGTERM uvicorn stops accepting connections, lets in-flight requests
finish (up to ``graceful_timeout`` seconds), then the app's lifespan stops the registry
watcher and drains the micro-batcher.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

from behaviorlm.service.connections import MAX_HEADER_BYTES, READ_TIMEOUT_S, GuardedHttpTools, set_limits
from behaviorlm.service.rank_cache import DEFAULT_ENTRIES

CONFIG_ENV = "BEHAVIORLM_SERVE_CONFIG"


@dataclass
class ServeConfig:
    """What :func:`behaviorlm.service.api.create_app` is given, as plain values."""

    model: str
    segments: str | None = None
    max_batch: int = 32
    threads: int = 1
    reload_interval: float | None = None
    retrieval: str = "auto"
    engine: str = "torch"
    read_timeout: float = READ_TIMEOUT_S
    max_header_bytes: int = MAX_HEADER_BYTES
    rank_cache: int = DEFAULT_ENTRIES
    device: str = "auto"
    compile: bool = False

    def app(self):  # noqa: ANN201 - FastAPI, imported lazily
        from behaviorlm.service.api import create_app

        set_limits(self.read_timeout, self.max_header_bytes)  # this process's connections

        return create_app(
            self.model,
            self.segments,
            max_batch=self.max_batch,
            threads=self.threads,
            reload_interval=self.reload_interval,
            retrieval=self.retrieval,
            engine=self.engine,
            rank_cache=self.rank_cache,
            device=self.device,
            compile=self.compile,
        )


def app_from_env():  # noqa: ANN201
    """The app factory each worker process calls (uvicorn ``factory=True``)."""
    return ServeConfig(**json.loads(os.environ[CONFIG_ENV])).app()


def uvicorn_options(config: ServeConfig) -> dict[str, Any]:
    """What every server of this project runs with, whatever its host and port."""
    return {"http": GuardedHttpTools, "access_log": False, "h11_max_incomplete_event_size": config.max_header_bytes}


def run(config: ServeConfig, host: str, port: int, workers: int, graceful_timeout: float, log_level: str) -> None:
    import uvicorn

    common: dict[str, Any] = {
        **uvicorn_options(config),
        "host": host,
        "port": port,
        "log_level": log_level,
        "timeout_graceful_shutdown": graceful_timeout,
    }
    if workers == 1:
        uvicorn.run(config.app(), **common)
        return
    from behaviorlm.service.metrics import MULTIPROC_ENV

    os.environ[CONFIG_ENV] = json.dumps(asdict(config))
    os.environ.setdefault(MULTIPROC_ENV, tempfile.mkdtemp(prefix="behaviorlm-metrics-"))
    uvicorn.run("behaviorlm.service.launch:app_from_env", factory=True, workers=workers, **common)
