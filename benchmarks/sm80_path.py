"""The A100 route of mikv, driven on a Hopper GPU; writes sm80_path.json.

An A100 runs vLLM's attention through FlashAttention 2 (no FA3, no fp8 attention), so there
mikv prefills through FA2, split decode is off, hi_dtype fp8 is refused and every decode runs
the fused kernel compiled for sm80. Here the extension comes from a wheel built for compute_80
PTX only (`TORCH_CUDA_ARCH_LIST="8.0+PTX" pip wheel --no-build-isolation --no-deps .`), which the
driver JIT-compiles on the Hopper GPU, and every engine is pinned to FA2 with vLLM's
`--attention-config '{"flash_attn_version": 2}'`. Then, in order:

1. the GPU kernel tests against the torch reference;
2. hi_dtype fp8 must be refused at startup (one-line error);
3. greedy tokens of mikv with every page hi against auto (both on FA2), on a real model;
4. forced demotion (hi_budget 0.1) with MIKV_VERIFY_DEMOTIONS=1: it completes, no verify warning;
5. throughput of auto and mikv on FA2 (dummy Llama-3.1-8B weights).

    python benchmarks/sm80_path.py --wheel W.whl --model HF_DIR --out DIR \
        [--probe-trials benchmarks/longctx trials.jsonl] [--gpu-util 0.9] [--stages ...]

--stages picks steps (tests refusal allhi forced tput); a later run into the same --out adds
its steps to the sm80_path.json already there, so throughput can be measured apart from the
correctness steps, on a GPU nobody else is using.

vLLM must be importable. The run uses a private copy of this tree with the wheel's kernels
first on PYTHONPATH, so the engines' worker processes load the sm80 build too."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from benchmarks.harness.proc import run_logged  # noqa: E402
from benchmarks.harness.stats import token_match  # noqa: E402
FA2 = '{"flash_attn_version": 2}'
KERNEL_TESTS = ["tests/gpu/test_decode_kernel.py", "tests/gpu/test_lo_pages.py",
                "tests/gpu/test_page_mass.py", "tests/gpu/test_split_decode.py"]
ROUTE = re.compile(r"mikv: prefill FlashAttention (\S+), decode (.+)")
VERIFY_WARNING = re.compile(r"WARNING.*mikv verify")


def private_tree(wheel: str, dest: str) -> str:
    """A copy of the package, tests and benchmarks with the wheel's compiled kernels."""
    shutil.rmtree(dest, ignore_errors=True)
    for part in ("mikv_vllm", "tests", "benchmarks"):
        shutil.copytree(os.path.join(ROOT, part), os.path.join(dest, part),
                        ignore=shutil.ignore_patterns("_C*.so", "results", "__pycache__"))
    for name in ("pyproject.toml", "setup.py"):
        shutil.copy(os.path.join(ROOT, name), dest)
    with zipfile.ZipFile(wheel) as z:
        (so,) = [n for n in z.namelist() if n.startswith("mikv_vllm/_C")]
        with z.open(so) as src, open(os.path.join(dest, so), "wb") as dst:
            shutil.copyfileobj(src, dst)
    return os.path.join(dest, so)


def embedded_archs(so: str) -> dict:
    """The GPU code in the extension: SASS per sm and PTX per compute capability."""
    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"),
                                                "bin", "nvcc")
    tool = shutil.which("cuobjdump") or os.path.join(os.path.dirname(nvcc), "cuobjdump")

    def listing(flag: str) -> list[str]:
        try:
            out = subprocess.run([tool, flag, so], capture_output=True, text=True).stdout
        except FileNotFoundError:
            return ["cuobjdump not found"]
        return sorted(set(re.findall(r"\.(sm_\d+)\.", out)))
    return {"sass": listing("--list-elf"), "ptx": listing("--list-ptx")}


def device_and_versions(env: dict) -> dict:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    code = "import sys, torch, vllm; print(sys.version.split()[0], torch.__version__, vllm.__version__)"
    py, torch_v, vllm_v = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                         text=True).stdout.split()[-3:]
    return {"device": gpu, "python": py, "torch": torch_v, "vllm": vllm_v}


def junit_counts(path: str) -> dict:
    if not os.path.exists(path):
        return {"tests_passed": 0, "tests_failed": None}
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failed = int(suite.get("tests")), int(suite.get("failures")) + int(suite.get("errors"))
    skipped = int(suite.get("skipped"))
    return {"tests_passed": total - failed - skipped, "tests_failed": failed,
            "tests_skipped": skipped}


def fp8_refusal(model: str, cwd: str, env: dict) -> str | None:
    """The startup error of hi_dtype fp8 on the FA2 route (None: it was accepted)."""
    code = f"""
import json
from vllm.engine.arg_utils import EngineArgs
from mikv_vllm import plugin
from mikv_vllm.config import MikvConfigError
plugin.register()
args = EngineArgs(model={model!r}, skip_tokenizer_init=True, kv_cache_dtype="mikv",
                  attention_config={FA2},
                  additional_config={{"mikv": {{"hi_dtype": "fp8"}}}})
try:
    args.create_engine_config()
    print(json.dumps(None))
except MikvConfigError as e:
    print(json.dumps(str(e)))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=300)
    lines = out.stdout.strip().splitlines()
    return json.loads(lines[-1]) if out.returncode == 0 and lines else f"error: {out.stderr[-500:]}"


def probe_file(trials: str, out: str, n: int = 16) -> str:
    """Real-text probes: the first prompts of the long-context suite's shortest cell."""
    rows = [json.loads(line) for line in open(trials)]
    shortest = min(r["length"] for r in rows)
    rows = sorted((r for r in rows if r["length"] == shortest), key=lambda r: (r["index"], r["task"]))
    json.dump([r["prompt_ids"] for r in rows[:n]], open(out, "w"))
    return out


def e2e(tree: str, env: dict, out: str, tag: str, kv: list[str], extra: list[str],
        timeout: int) -> list[dict]:
    cmd = [sys.executable, "benchmarks/e2e_compare.py", "--out-dir", out, "--tag", tag,
           "--kv", *kv, "--attention-config", FA2, "--timeout", str(timeout), *extra]
    run_logged(cmd, os.path.join(out, f"e2e_{tag}.driver.log"), timeout * len(kv) + 120, cwd=tree,
               env=env)
    path = os.path.join(out, f"e2e_summary_{tag}.json")
    return json.load(open(path)) if os.path.exists(path) else []


def engine_log(out: str, kv: str, tag: str) -> str:
    path = os.path.join(out, f"e2e_{kv}_{tag}.log")
    return open(path).read() if os.path.exists(path) else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--wheel", required=True, help="the wheel built for 8.0+PTX")
    ap.add_argument("--model", required=True, help="an HF model directory (bf16)")
    ap.add_argument("--load-format", default="auto",
                    help="dummy: random weights of the model's config (no tokenizer needed)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--probe-trials", default=None,
                    help="benchmarks/longctx trials.jsonl: real-text probes (else random ids)")
    ap.add_argument("--gpu-util", type=float, default=0.9)
    ap.add_argument("--tput-prompts", type=int, default=128)
    ap.add_argument("--eager", action="store_true",
                    help="the token and demotion checks without torch.compile or CUDA graphs")
    ap.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    tree = os.path.join(a.out, "tree")
    so = private_tree(a.wheel, tree)
    env = {**os.environ, "PYTHONPATH": tree + os.pathsep + os.environ.get("PYTHONPATH", "")}
    path = os.path.join(a.out, "sm80_path.json")
    result: dict = json.load(open(path)) if os.path.exists(path) else {}
    result.update({**device_and_versions(env), "extension": embedded_archs(so),
                   "attention_config": json.loads(FA2),
                   "model": a.model, "load_format": a.load_format})
    real = ["--model", a.model, "--load-format", a.load_format, "--dtype", "bfloat16",
            *(["--tokenizer", a.model] if a.load_format != "dummy" else []),
            "--num-prompts", "0", "--probe-prompts", "16", "--probe-tokens", "64",
            "--max-model-len", "4608", "--gpu-util", str(a.gpu_util),
            *(["--enforce-eager"] if a.eager else [])]
    if a.probe_trials:
        real += ["--probe-file", probe_file(a.probe_trials, os.path.join(a.out, "probe.json"))]
    for stage in a.stages:
        result.update(STAGES[stage](a, tree, env, real))
        json.dump(result, open(path, "w"), indent=1)
    print(json.dumps(result, indent=1))


def stage_tests(a, tree: str, env: dict, real: list[str]) -> dict:
    junit = os.path.join(a.out, "kernels.xml")
    run_logged([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                *KERNEL_TESTS], os.path.join(a.out, "kernels.log"), 1200, cwd=tree, env=env)
    return junit_counts(junit)


def stage_refusal(a, tree: str, env: dict, real: list[str]) -> dict:
    return {"fp8_hi_refused": fp8_refusal(a.model, tree, env)}


def stage_allhi(a, tree: str, env: dict, real: list[str]) -> dict:
    result = {}
    allhi = {r["kv"]: r for r in e2e(tree, env, a.out, "allhi", ["auto", "mikv"], real, 400)}
    result.update(answer_match(a, "mikv_allhi"))
    route = ROUTE.search(engine_log(a.out, "mikv", "allhi"))
    result["route"] = {"prefill_flash_attn": route.group(1), "decode": route.group(2).strip()} \
        if route else None
    return result


def stage_forced(a, tree: str, env: dict, real: list[str]) -> dict:
    result = {}
    env_verify = {**env, "MIKV_VERIFY_DEMOTIONS": "1"}
    forced = e2e(tree, env_verify, a.out, "forced", ["mikv"],
                 real + ["--mikv-knobs", '{"hi_budget": 0.1}'], 400)
    log = engine_log(a.out, "mikv", "forced")
    row = forced[0] if forced else {}
    result["forced_demotion_completed"] = row.get("rc") == 0 and bool(row.get("demotions"))
    result["forced_demotions"] = row.get("demotions")
    result["verify_warnings"] = len(VERIFY_WARNING.findall(log))
    result["verify_checked_steps"] = log.count("mikv verify")
    result.update({f"forced_{k}": v for k, v in answer_match(a, "mikv_forced").items()})
    return result


def eos_ids(model: str) -> set[int]:
    """The model's end-of-sequence tokens (generation_config.json, else config.json)."""
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(model, name)
        if os.path.exists(path):
            eos = json.load(open(path)).get("eos_token_id")
            if eos is not None:
                return set(eos) if isinstance(eos, list) else {eos}
    return set()


def answer_match(a, run: str) -> dict:
    """Greedy tokens of `run` against auto's all-hi ones. The probes ignore EOS (dummy weights
    never emit it), so past a real model's answer both engines free-run on text the model was
    not asked for, where near-tied logits part them; the answer is the tokens up to auto's first
    EOS. Both are reported."""
    auto = os.path.join(a.out, "e2e_auto_allhi.json")
    other = os.path.join(a.out, f"e2e_{run}.json")
    if not (os.path.exists(auto) and os.path.exists(other)):
        return {}
    ref = json.load(open(auto))["probe_tokens"]
    got = json.load(open(other))["probe_tokens"]
    eos = eos_ids(a.model) if a.load_format != "dummy" else set()
    ends = [next((i + 1 for i, t in enumerate(x) if t in eos), len(x)) for x in ref]
    return {"token_match_vs_auto": token_match([x[:n] for x, n in zip(ref, ends)],
                                               [y[:n] for y, n in zip(got, ends)]),
            "token_match_vs_auto_past_eos": token_match(ref, got)}


def stage_tput(a, tree: str, env: dict, real: list[str]) -> dict:
    tput = e2e(tree, env, a.out, "tput", ["auto", "mikv"],
               ["--num-prompts", str(a.tput_prompts), "--input-len", "2048", "--output-len", "256",
                "--probe-prompts", "0", "--max-model-len", "4096", "--gpu-util", str(a.gpu_util)],
               400)
    keys = ("kv", "rc", "workload", "kv_capacity_tokens", "kv_tokens", "total_tok_s",
            "gen_tok_s", "preemptions", "demotions", "total_vs_auto")
    return {"throughput": [{k: r.get(k) for k in keys} for r in tput],
            "throughput_model": "Llama-3.1-8B config, dummy weights"}


STAGES = {"tests": stage_tests, "refusal": stage_refusal, "allhi": stage_allhi,
          "forced": stage_forced, "tput": stage_tput}


if __name__ == "__main__":
    main()
