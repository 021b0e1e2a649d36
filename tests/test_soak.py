"""The soak driver's own logic (benchmarks/soak.py), on the CPU: the traffic mix, the answer
checks that decide `failed`, and the summary of runs (the GPU runs it against `vllm serve`)."""
from __future__ import annotations

import json
from collections import Counter

from benchmarks import soak


def test_traffic_mixes_what_a_server_meets():
    traffic = soak.Traffic(seed=0, max_model_len=8192, model="m", malformed_share=0.05,
                           unknown_field_share=0.02, abort_share=0.1)
    reqs = [traffic.next() for _ in range(3000)]
    kinds = Counter(r["kind"] for r in reqs)
    assert 100 < kinds["malformed"] < 200 and kinds["unknown_field"] > 20
    assert set(r["what"] for r in reqs if r["kind"] == "malformed") == set(soak.MALFORMED)
    ok = [r for r in reqs if r["kind"] != "malformed"]
    assert {r["path"] for r in ok} == {"/v1/chat/completions", "/v1/completions"}
    assert {r["n"] for r in ok} == {1, 2, 3, 4} and any(r["stream"] for r in ok)
    assert any(r["abort_after"] for r in ok)
    # well-formed prompts stay well inside the context (a word is ~1.1 tokens)
    longest = max(len(json.dumps(r["body"]).split()) for r in ok)
    assert longest + 512 < 8192 / 1.2
    systems = Counter(m["content"] for r in ok for m in r["body"].get("messages", ())
                      if m["role"] == "system")
    assert len(systems) == 4 and min(systems.values()) > 50  # shared: prefix-cache hits


def test_answers_are_checked_for_shape():
    req = {"n": 2, "max_tokens": 8, "path": "/v1/completions"}
    good = {"choices": [{"index": i, "text": "x", "finish_reason": "length"} for i in range(2)],
            "usage": {"prompt_tokens": 5, "completion_tokens": 16}}
    assert soak.check_answer(req, good) is None
    assert "choices" in soak.check_answer(req, {**good, "choices": good["choices"][:1]})
    assert "usage" in soak.check_answer(req, {**good, "usage": {"prompt_tokens": 5,
                                                                 "completion_tokens": 17}})
    chat = {"n": 1, "max_tokens": 4, "path": "/v1/chat/completions"}
    assert "no text" in soak.check_answer(chat, {"choices": [{"index": 0, "text": "x",
                                                              "finish_reason": "stop"}]})


def test_streams_must_finish_every_choice():
    req = {"n": 2, "max_tokens": 4}
    events = [{"choices": [{"index": 0, "text": "a"}, {"index": 1, "text": "b"}]},
              {"choices": [{"index": 0, "finish_reason": "stop"}]},
              {"choices": [{"index": 1, "finish_reason": "length"}]},
              {"choices": [], "usage": {"completion_tokens": 5}}]
    assert soak.check_stream(req, events) is None
    assert "finished choices [0]" in soak.check_stream(req, events[:2] + events[3:])
    assert "index 2" in soak.check_stream(req, [{"choices": [{"index": 2}]}])


def test_runs_are_summed_into_soak_json(tmp_path):
    rows = []
    for i, (secs, warnings) in enumerate([(540.0, 0), (360.0, 0)]):
        row = {k: 1 for k in soak.SUMMED} | {"duration_s": secs, "verify_warnings": warnings,
                                              "samples": [{"t": 0}], "name": f"r{i}"}
        path = tmp_path / f"soak_r{i}.json"
        path.write_text(json.dumps(row))
        rows.append(str(path))
    unchecked = tmp_path / "soak_r2.json"  # a run whose pool could not be checked
    unchecked.write_text(json.dumps({"duration_s": 10.0, "block_leak": None}))
    missing = str(tmp_path / "soak_r3.json")  # a run that wrote nothing
    total = soak.merge(rows + [str(unchecked), missing], str(tmp_path / "soak.json"),
                       {"sanitizer_errors": 0})
    assert total["duration_s"] == 910.0 and total["longest_run_s"] == 540.0
    assert total["requests"] == 2 and total["sanitizer_errors"] == 0
    assert total["block_leak_unchecked_runs"] == 1 and total["missing_runs"] == [missing]
    assert all("samples" not in r for r in total["runs"])
    assert json.loads((tmp_path / "soak.json").read_text()) == total
