"""`behaviorlm serve --workers 2` as a real process: both workers answer, /metrics pools them,
SIGTERM shuts down gracefully."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from behaviorlm.data.events import validate_events
from behaviorlm.recommender import BehaviorLM
from tests.conftest import make_events


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "model"
    BehaviorLM(max_len=16, dim=16, n_layers=1, n_heads=1, epochs=1, progress=False).fit(
        validate_events(make_events(n_users=20))
    ).save(path)
    return path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_workers_pool_metrics_and_stop_gracefully(model_dir, tmp_path):
    port = _port()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    cmd = [sys.executable, "-m", "behaviorlm.cli", "serve", "--model", str(model_dir), "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--workers", "2", "--log-level", "warning"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "the server exited"
            assert time.monotonic() < deadline, "not ready in 120 s"
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        # a gate, not a sleep: both workers loaded once 10 fresh connections in a row (the kernel
        # spreads them over the workers) find the model ready; a worker still loading answers 503
        ready_in_a_row = 0
        while ready_in_a_row < 10:
            assert time.monotonic() < deadline, "the second worker never became ready"
            ok = httpx.get(url + "/ready", timeout=2).status_code == 200
            ready_in_a_row = ready_in_a_row + 1 if ok else 0
            if not ok:
                time.sleep(0.2)
        with httpx.Client(base_url=url, timeout=10) as c:
            codes = [c.post("/v1/recommend", json={"user_id": u % 20, "k": 3}).status_code for u in range(40)]
            metrics = c.get("/metrics").text
        assert set(codes) == {200}
        line = next(x for x in metrics.splitlines() if x.startswith('behaviorlm_requests_total{route="/v1/recommend"'))
        assert float(line.rsplit(" ", 1)[1]) == 40.0  # pooled over both workers' files
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    assert rc == 0
