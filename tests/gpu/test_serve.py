"""`vllm serve --kv-cache-dtype mikv` with a real model answers the OpenAI API (GPU only).

The model comes from MIKV_SERVE_MODEL (a GGUF file or model dir) and MIKV_SERVE_TOKENIZER;
answers are written to MIKV_RESULTS_DIR/serve_answers.json when that is set."""
from __future__ import annotations

import json
import os
import sys
import urllib.request

import pytest

from mikv_vllm.eval.server import running_server

pytestmark = pytest.mark.gpu

MODEL = os.environ.get("MIKV_SERVE_MODEL")
TOKENIZER = os.environ.get("MIKV_SERVE_TOKENIZER")
PORT = int(os.environ.get("MIKV_SERVE_PORT", "8123"))
BASE = f"http://127.0.0.1:{PORT}"


def _post(path: str, body: dict) -> dict:
    req = urllib.request.Request(BASE + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not MODEL:
        pytest.skip("MIKV_SERVE_MODEL not set")
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", MODEL,
           "--served-model-name", "smollm2", "--kv-cache-dtype", "mikv",
           "--port", str(PORT), "--max-model-len", "2048", "--gpu-memory-utilization", "0.3",
           "--dtype", "bfloat16",
           "--additional-config", json.dumps({"mikv": {"sink_pages": 1, "recent_pages": 4}})]
    if TOKENIZER:
        cmd += ["--tokenizer", TOKENIZER]
    cmd += os.environ.get("MIKV_SERVE_EXTRA_ARGS", "").split()
    try:
        with running_server(cmd, log_path, BASE):
            yield log_path
    finally:
        results = os.environ.get("MIKV_RESULTS_DIR")
        if results and log_path.exists():
            with open(os.path.join(results, "serve.log"), "w") as f:
                f.write(log_path.read_text()[-200_000:])


def _record(name: str, value) -> None:
    results = os.environ.get("MIKV_RESULTS_DIR")
    if not results:
        return
    path = os.path.join(results, "serve_answers.json")
    data = json.load(open(path)) if os.path.exists(path) else {}
    data[name] = value
    json.dump(data, open(path, "w"), indent=1)


def test_backend_is_mikv(server):
    text = server.read_text()
    assert "mikv: hi pages" in text, "the mikv startup line is missing"
    assert "CUSTOM" in text


def test_completions(server):
    r = _post("/v1/completions", {"model": "smollm2", "prompt": "The capital of France is",
                                  "max_tokens": 24, "temperature": 0})
    text = r["choices"][0]["text"]
    _record("completion", {"prompt": "The capital of France is", "text": text})
    assert "Paris" in text


def test_chat_completions(server):
    msgs = [{"role": "user", "content": "What is the capital of Japan? Answer in one sentence."}]
    r = _post("/v1/chat/completions", {"model": "smollm2", "messages": msgs, "max_tokens": 48,
                                       "temperature": 0})
    text = r["choices"][0]["message"]["content"]
    _record("chat", {"messages": msgs, "text": text})
    assert "Tokyo" in text
