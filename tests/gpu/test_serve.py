"""`vllm serve --kv-cache-dtype mikv` with a real model answers the OpenAI API (GPU only), at
the default policy and with demotion forced on (hi_budget 0.1: most of a long prompt's pages
go 2-bit while it decodes).

The model comes from MIKV_SERVE_MODEL (a GGUF file or model dir) and MIKV_SERVE_TOKENIZER;
answers are written to MIKV_RESULTS_DIR/serve_answers.json when that is set."""
from __future__ import annotations

import json
import os
import re
import sys
import time
import urllib.request

import pytest

from benchmarks.harness.server import running_server

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


POLICIES = {"default": {}, "hi_budget_0.1": {"hi_budget": 0.1}}


@pytest.fixture(scope="module", params=list(POLICIES))
def server(request, tmp_path_factory):
    if not MODEL:
        pytest.skip("MIKV_SERVE_MODEL not set")
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    knobs = {"sink_pages": 1, "recent_pages": 4, **POLICIES[request.param]}
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", MODEL,
           "--served-model-name", "smollm2", "--kv-cache-dtype", "mikv",
           "--port", str(PORT), "--max-model-len", "2048", "--gpu-memory-utilization", "0.3",
           "--dtype", "bfloat16",
           "--additional-config", json.dumps({"mikv": knobs})]
    if TOKENIZER:
        cmd += ["--tokenizer", TOKENIZER]
    cmd += os.environ.get("MIKV_SERVE_EXTRA_ARGS", "").split()
    try:
        with running_server(cmd, log_path, BASE):
            yield request.param, log_path
    finally:
        results = os.environ.get("MIKV_RESULTS_DIR")
        if results and log_path.exists():
            with open(os.path.join(results, f"serve_{request.param}.log"), "w") as f:
                f.write(log_path.read_text()[-200_000:])


def _get(path: str) -> str:
    with urllib.request.urlopen(BASE + path, timeout=30) as r:
        return r.read().decode()


def _record(name: str, value) -> None:
    results = os.environ.get("MIKV_RESULTS_DIR")
    if not results:
        return
    path = os.path.join(results, "serve_answers.json")
    data = json.load(open(path)) if os.path.exists(path) else {}
    data[name] = value
    json.dump(data, open(path, "w"), indent=1)


def test_backend_is_mikv(server):
    text = server[1].read_text()
    assert "mikv: hi pages" in text, "the mikv startup line is missing"
    assert "CUSTOM" in text


def test_completions(server):
    r = _post("/v1/completions", {"model": "smollm2", "prompt": "The capital of France is",
                                  "max_tokens": 24, "temperature": 0})
    text = r["choices"][0]["text"]
    _record(f"completion_{server[0]}", {"prompt": "The capital of France is", "text": text})
    assert "Paris" in text


def test_chat_completions(server):
    msgs = [{"role": "user", "content": "What is the capital of Japan? Answer in one sentence."}]
    r = _post("/v1/chat/completions", {"model": "smollm2", "messages": msgs, "max_tokens": 48,
                                       "temperature": 0})
    text = r["choices"][0]["message"]["content"]
    _record(f"chat_{server[0]}", {"messages": msgs, "text": text})
    assert "Tokyo" in text


FACTS = ("Canberra is the capital of Australia. Ottawa is the capital of Canada. Nairobi is the "
         "capital of Kenya. Lima is the capital of Peru. Oslo is the capital of Norway. Hanoi is "
         "the capital of Vietnam. Cairo is the capital of Egypt. Madrid is the capital of Spain. ")


def _demotions() -> float:
    found = re.findall(r"^vllm:mikv_demotions_total\{[^}]*\} ([\d.e+]+)$", _get("/metrics"), re.M)
    return sum(float(x) for x in found)


def test_long_prompt(server):
    """~1,500 tokens of context, the question in the recent window: under a 0.1 hi budget most
    of the context is read from 2-bit pages, yet the answer stays right and the text sane (a
    corrupted page shows as one token repeated)."""
    before = _demotions()
    prompt = (FACTS * 20 + "\n\nQuestion: what is the capital of France?\n"
              "Answer: The capital of France is")
    r = _post("/v1/completions", {"model": "smollm2", "prompt": prompt, "max_tokens": 48,
                                  "temperature": 0, "return_tokens_as_token_ids": True,
                                  "logprobs": 0})
    choice = r["choices"][0]
    for _ in range(10):  # the counters reach /metrics with the engine's next stats record
        demoted = _demotions() - before
        if demoted or server[0] == "default":
            break
        time.sleep(1)
    _record(f"long_prompt_{server[0]}", {"text": choice["text"], "demoted_pages": demoted,
                                         "prompt_tokens": r["usage"]["prompt_tokens"]})
    assert r["usage"]["prompt_tokens"] > 1000
    assert "Paris" in choice["text"]
    assert len(set(choice["logprobs"]["tokens"])) >= 8, choice["text"]
    if server[0] == "default":
        assert demoted == 0  # no memory pressure, no budget: every page stays hi
    else:
        assert demoted > 0
