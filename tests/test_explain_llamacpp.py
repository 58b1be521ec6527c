"""Opt-in: the explainer against a real small instruct model behind llama-cpp-python's server.

No small instruct model ships inside a package on the registries this project can reach, so
this test runs only when ``BEHAVIORLM_TEST_GGUF`` names a local GGUF file and
``pip install 'llama-cpp-python[server]'`` has been done. It binds to 127.0.0.1, bounds its
wait and its requests, and whatever the model says is still validated: the assertions are that
every rationale is grounded (the model's own when valid, the template's otherwise) and that most
are the model's own (a test of the final output alone would pass on templates only).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from behaviorlm.explain import LLMConfig, LLMExplainer, validate_rationales

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server():
    gguf = os.environ.get("BEHAVIORLM_TEST_GGUF")
    if not gguf:
        pytest.skip("set BEHAVIORLM_TEST_GGUF to a small instruct GGUF model to run this test")
    pytest.importorskip("llama_cpp.server")
    port = _free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--n_ctx", "4096"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"{base}/models", timeout=1) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        else:
            pytest.fail("llama.cpp server did not start within 120 s")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_real_model_rationales_are_grounded(llama_server, contexts):
    ex = LLMExplainer(LLMConfig(base_url=llama_server, model="local", timeout_s=120, max_retries=0, concurrency=1))
    for ctx in contexts:
        out = ex.explain(ctx)
        good, problems = validate_rationales(ctx, out)
        assert not problems and len(good) == len(ctx.recommendations)
    print(ex.stats.summary())
    # what is validated above has had the bad answers replaced by templates, so it passes whatever
    # the model says: the model's own answers must have been accepted for most items
    assert ex.stats.items == sum(len(c.recommendations) for c in contexts)
    assert ex.stats.llm_items >= 0.5 * ex.stats.items, ex.stats.summary()
    assert ex.stats.llm_items + ex.stats.fallback_items <= ex.stats.items  # cached items count in neither
