"""Soak: a long, mixed OpenAI-API load against `vllm serve --kv-cache-dtype mikv` with the KV
pool under pressure, client aborts and malformed requests, then checks that nothing was lost.

    python benchmarks/soak.py --model DIR --duration 480 --out-dir OUT [--verify]

The server runs with a small `--kv-cache-memory-bytes`, so that demotion (and at times
preemption) runs all the time. Traffic, from `--concurrency` closed-loop clients: chat and
completions, streaming or not, `n` 1-4, short to long prompts (a share of them behind a few
shared system prompts: prefix-cache hits), clients that hang up mid-stream or time out, and a
trickle of malformed requests. Checked: every well-formed request that was not aborted gets a
well-shaped answer; every malformed one a 4xx; the server stays up; once the load drains the
pool is whole (vLLM's KV usage 0, and mikv's page and pack counters 0 after a probe request);
the server's GPU memory is sampled throughout; with `--verify` (MIKV_VERIFY_DEMOTIONS=1) the log
has no verify warning. One run writes `soak_<name>.json`; `--merge` sums runs into soak.json."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness.server import running_server  # noqa: E402

WORDS = ("time year people way day man thing woman life child world school state family student "
         "group country problem hand part place case week company system program question work "
         "government number night point home water room mother area money story fact month lot "
         "right study book eye job word business issue side kind head house service friend father "
         "power hour game line end member law car city community name president team minute idea "
         "kid body information back parent face others level office door health person art war "
         "history party result change morning reason research girl guy moment air teacher force "
         "education river garden bridge window letter music table paper market engine signal "
         "cloud forest valley ocean island mountain desert winter summer spring autumn").split()
MALFORMED = ("bad_json", "wrong_type", "negative_max_tokens", "absurd_max_tokens",
             "prompt_too_long", "missing_field", "bad_temperature", "unknown_model")


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


class Traffic:
    """Draws one request at a time from the soak's mix."""

    def __init__(self, seed: int, max_model_len: int, model: str, malformed_share: float,
                 unknown_field_share: float, abort_share: float) -> None:
        self.rng = random.Random(seed)
        self.max_model_len = max_model_len
        self.model = model
        self.malformed_share = malformed_share
        self.unknown_field_share = unknown_field_share
        self.abort_share = abort_share
        shared = random.Random(seed + 1)
        # A few long system prompts many requests share: prefix-cache hits across requests.
        self.system_prompts = [f"You are assistant {i}. " + words(shared, 600 + 200 * i)
                               for i in range(4)]

    def prompt_words(self) -> int:
        r = self.rng.random()
        if r < 0.5:
            return self.rng.randint(10, 200)
        if r < 0.85:
            return self.rng.randint(400, 2000)
        return self.rng.randint(2500, 4000)  # with a system prompt, < 6K tokens

    def next(self) -> dict:
        """{kind, path, body (dict or raw str), stream, n, max_tokens, abort_after}."""
        rng = self.rng
        r = rng.random()
        if r < self.malformed_share:
            return self.malformed(rng.choice(MALFORMED))
        chat = rng.random() < 0.5
        stream = rng.random() < 0.5
        n = 1 if rng.random() < 0.7 else rng.randint(2, 4)
        max_tokens = rng.choice((8, 32, 64, 128, 256, 512))
        body: dict = {"model": self.model, "max_tokens": max_tokens, "n": n, "stream": stream,
                      "temperature": rng.choice((0.0, 0.7, 1.0)), "seed": rng.randint(0, 1 << 30)}
        if n > 1 and body["temperature"] == 0.0:
            body["temperature"] = 0.8
        user = words(rng, self.prompt_words())
        if chat:
            messages = [{"role": "user", "content": user}]
            if rng.random() < 0.6:
                messages.insert(0, {"role": "system", "content": rng.choice(self.system_prompts)})
            body["messages"] = messages
            path = "/v1/chat/completions"
        else:
            prefix = rng.choice(self.system_prompts) + "\n" if rng.random() < 0.4 else ""
            body["prompt"] = prefix + user
            path = "/v1/completions"
        if stream:
            body["stream_options"] = {"include_usage": True}
        kind = "ok"
        if rng.random() < self.unknown_field_share:
            body["mikv_soak_unknown_field"] = {"x": 1}  # vLLM ignores unknown fields (200)
            kind = "unknown_field"
        abort_after = None
        if rng.random() < self.abort_share:
            # a streaming client hangs up after a few chunks; a blocking one times out
            abort_after = rng.randint(1, 8) if stream else rng.uniform(0.2, 2.0)
        return {"kind": kind, "path": path, "body": body, "stream": stream, "n": n,
                "max_tokens": max_tokens, "abort_after": abort_after}

    def malformed(self, what: str) -> dict:
        rng = self.rng
        body: dict = {"model": self.model, "prompt": words(rng, 20), "max_tokens": 16}
        if what == "bad_json":
            body = '{"model": "%s", "prompt": "unterminated' % self.model
        elif what == "wrong_type":
            body["max_tokens"] = "sixteen"
        elif what == "negative_max_tokens":
            body["max_tokens"] = -5
        elif what == "absurd_max_tokens":
            body["max_tokens"] = 10 ** 9
        elif what == "prompt_too_long":
            body["prompt"] = words(rng, int(self.max_model_len * 1.3))
        elif what == "missing_field":
            del body["prompt"]
        elif what == "bad_temperature":
            body["temperature"] = -1.0
        elif what == "unknown_model":
            body["model"] = "no-such-model"
        path = "/v1/chat/completions" if what == "missing_field" and rng.random() < 0.5 \
            else "/v1/completions"
        return {"kind": "malformed", "what": what, "path": path, "body": body, "stream": False,
                "n": 1, "max_tokens": 16, "abort_after": None}


def check_answer(req: dict, data: dict) -> str | None:
    """Why a non-streamed answer is ill-shaped, or None."""
    choices = data.get("choices")
    if not isinstance(choices, list) or len(choices) != req["n"]:
        return f"choices: want {req['n']}, got {None if choices is None else len(choices)}"
    chat = req["path"].endswith("chat/completions")
    for c in choices:
        text = (c.get("message") or {}).get("content") if chat else c.get("text")
        if not isinstance(text, str):
            return f"choice {c.get('index')}: no text"
        if c.get("finish_reason") not in ("stop", "length"):
            return f"choice {c.get('index')}: finish_reason {c.get('finish_reason')!r}"
    usage = data.get("usage") or {}
    if not 0 < usage.get("prompt_tokens", 0) or not (
            0 <= usage.get("completion_tokens", -1) <= req["n"] * req["max_tokens"]):
        return f"usage {usage}"
    return None


def check_stream(req: dict, events: list[dict]) -> str | None:
    """Why a complete stream is ill-shaped, or None."""
    finished: dict[int, str] = {}
    usage = None
    for e in events:
        usage = e.get("usage") or usage
        for c in e.get("choices") or ():
            i = c.get("index", -1)
            if not 0 <= i < req["n"]:
                return f"choice index {i} of n={req['n']}"
            if c.get("finish_reason"):
                finished[i] = c["finish_reason"]
    if sorted(finished) != list(range(req["n"])):
        return f"finished choices {sorted(finished)} of n={req['n']}"
    if any(r not in ("stop", "length") for r in finished.values()):
        return f"finish reasons {finished}"
    if not usage or not 0 <= usage.get("completion_tokens", -1) <= req["n"] * req["max_tokens"]:
        return f"usage {usage}"
    return None


class Tally:
    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.malformed_status: Counter = Counter()
        self.failures: list[str] = []
        self.latencies: list[float] = []

    def fail(self, why: str) -> None:
        self.counts["failed"] += 1
        if len(self.failures) < 30:
            self.failures.append(why[:300])


async def one_request(session, base: str, req: dict, tally: Tally) -> None:
    import aiohttp

    body = req["body"]
    data = body if isinstance(body, str) else json.dumps(body)
    kind = req["kind"]
    tally.counts["requests"] += 1
    tally.counts[f"sent_{kind}"] += 1
    start = time.monotonic()
    try:
        if req["stream"]:
            await _streamed(session, base, req, data, tally)
        else:
            timeout = aiohttp.ClientTimeout(total=req["abort_after"] or 900)
            async with session.post(base + req["path"], data=data, timeout=timeout,
                                    headers={"Content-Type": "application/json"}) as resp:
                text = await resp.text()
                status = resp.status
            if kind == "malformed":
                tally.malformed_status[f"{req['what']}:{status}"] += 1
                if 400 <= status < 500:
                    tally.counts["malformed_4xx"] += 1
                else:
                    tally.fail(f"malformed {req['what']} answered {status}: {text[:200]}")
                return
            if status != 200:
                tally.fail(f"{kind} {req['path']} status {status}: {text[:200]}")
                return
            why = check_answer(req, json.loads(text))
            if why:
                tally.fail(f"{req['path']} n={req['n']}: {why}")
                return
            tally.counts["completed"] += 1
            tally.counts[f"completed_{kind}"] += 1
            tally.latencies.append(time.monotonic() - start)
    except asyncio.TimeoutError:
        if req["abort_after"] is not None and not req["stream"]:
            tally.counts["aborted"] += 1  # the client's own deadline
        else:
            tally.fail(f"timeout {req['path']}")
    except aiohttp.ClientError as e:
        tally.fail(f"client error {type(e).__name__}: {e}")
    except Exception as e:  # an answer that is not what the API promises (bad JSON, ...)
        tally.fail(f"{req['path']}: {type(e).__name__}: {e}")


async def _streamed(session, base: str, req: dict, data: str, tally: Tally) -> None:
    events: list[dict] = []
    async with session.post(base + req["path"], data=data,
                            headers={"Content-Type": "application/json"}) as resp:
        if resp.status != 200:
            tally.fail(f"stream {req['path']} status {resp.status}: {(await resp.text())[:200]}")
            return
        done = False
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            payload = line[len("data: "):]
            if payload == "[DONE]":
                done = True
                break
            event = json.loads(payload)
            if "error" in event:
                tally.fail(f"stream error event: {payload[:200]}")
                return
            events.append(event)
            if req["abort_after"] is not None and len(events) >= req["abort_after"]:
                resp.close()  # the client hangs up mid-stream: the server must abort it
                tally.counts["aborted"] += 1
                return
    if not done:
        tally.fail(f"stream {req['path']} ended without [DONE]")
        return
    why = check_stream(req, events)
    if why:
        tally.fail(f"stream {req['path']} n={req['n']}: {why}")
        return
    tally.counts["completed"] += 1
    tally.counts[f"completed_{req['kind']}"] += 1


def scrape(base: str) -> dict[str, float]:
    """vLLM's /metrics as {name: value}, summed over label sets."""
    import urllib.request

    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        m = re.match(r"^(vllm:[A-Za-z0-9_:]+)(\{[^}]*\})?\s+(\S+)$", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


def process_tree(root: int) -> set[int]:
    """`root` and its descendants (vLLM's engine core runs in a child process)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo += children.get(pid, [])
    return tree


def server_gpu_mib(root: int) -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    tree = process_tree(root)
    used = []
    for line in out.splitlines():
        pid, _, mib = line.partition(",")
        try:
            if int(pid) in tree:
                used.append(float(mib))
        except ValueError:  # "[N/A]" and the like
            continue
    return sum(used) if used else None


async def monitor(base: str, proc, deadline: float, every: float, samples: list[dict],
                  tally: Tally, partial: Path) -> None:
    """Samples the server every `every` seconds; also leaves the tally so far in `partial`
    (what survives a run that is killed before its end)."""
    loop = asyncio.get_running_loop()
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            m = await loop.run_in_executor(None, scrape, base)
        except OSError:
            m = {}
        mib = await loop.run_in_executor(None, server_gpu_mib, proc.pid)
        samples.append({"t": round(time.monotonic(), 1), "gpu_mib": mib,
                        "demotions": m.get("vllm:mikv_demotions_total"),
                        "pressure_demotions": m.get("vllm:mikv_preemptions_avoided_total"),
                        "preemptions": m.get("vllm:num_preemptions_total"),
                        "running": m.get("vllm:num_requests_running"),
                        "waiting": m.get("vllm:num_requests_waiting"),
                        "kv_usage": m.get("vllm:kv_cache_usage_perc"),
                        "lo_pages": m.get("vllm:mikv_lo_pages")})
        partial.write_text(json.dumps({"counts": dict(tally.counts),
                                       "malformed_status": dict(tally.malformed_status),
                                       "failure_samples": tally.failures,
                                       "samples": samples}))
        await asyncio.sleep(every)


async def drive(base: str, proc, args, tally: Tally,
                samples: list[dict]) -> tuple[float, int]:
    """The load: (its seconds, how many of `samples` were taken during it)."""
    import aiohttp

    traffic = Traffic(args.seed, args.max_model_len, args.served_name, args.malformed_share,
                      args.unknown_field_share, args.abort_share)
    start = time.monotonic()
    deadline = start + args.duration
    connector = aiohttp.TCPConnector(limit=args.concurrency + 8)
    # no overall limit (aiohttp's default is 5 minutes): a stream fails only if it goes silent
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async def client(i: int) -> None:
            await asyncio.sleep(i * 0.05)
            while time.monotonic() < deadline and proc.poll() is None:
                await one_request(session, base, traffic.next(), tally)

        mon = asyncio.create_task(monitor(
            base, proc, deadline + 3600, args.sample_every, samples, tally,
            Path(args.out_dir) / f"soak_{args.name}.partial.json"))
        await asyncio.gather(*(client(i) for i in range(args.concurrency)))
        elapsed = time.monotonic() - start
        mon.cancel()
    return elapsed, len(samples)


def settle(base: str, served_name: str, timeout: float = 180) -> dict:
    """After the load: wait for the engine to drain, then one probe request (so that the
    stats describe the pool after the last frees), and read the counters that must be zero."""
    import urllib.request

    end = time.time() + timeout
    drained = False
    while time.time() < end and not drained:
        m = scrape(base)
        drained = not m.get("vllm:num_requests_running") and not m.get(
            "vllm:num_requests_waiting")
        if not drained:
            time.sleep(2)
    if not drained:
        return {"error": f"requests still running {timeout:.0f} s after the load"}
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(
        {"model": served_name, "prompt": "probe", "max_tokens": 2}).encode(),
        headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=60).read()
    time.sleep(6)  # the stat loggers' interval
    m = scrape(base)
    keys = ("vllm:kv_cache_usage_perc", "vllm:mikv_hi_pages", "vllm:mikv_lo_pages",
            "vllm:mikv_pack_blocks", "vllm:mikv_mid_pages", "vllm:num_requests_running",
            "vllm:num_requests_waiting", "vllm:mikv_demotions_total",
            "vllm:mikv_preemptions_avoided_total", "vllm:num_preemptions_total")
    return {k.split(":", 1)[1]: m.get(k) for k in keys}


def run(args) -> dict:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    port = args.port
    base = f"http://127.0.0.1:{port}"
    log_path = out_dir / f"soak_{args.name}.server.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", args.model,
           "--served-model-name", args.served_name, "--port", str(port),
           "--kv-cache-dtype", args.kv_cache_dtype, "--max-model-len", str(args.max_model_len),
           "--kv-cache-memory-bytes", str(args.kv_cache_memory_bytes),
           "--gpu-memory-utilization", str(args.gpu_util), "--enable-prefix-caching",
           "--load-format", args.load_format, "--dtype", "bfloat16"]
    template = Path(args.model) / "chat_template.jinja"
    if template.exists():
        cmd += ["--chat-template", str(template)]
    if args.kv_cache_dtype == "mikv" and args.knobs:
        cmd += ["--additional-config", json.dumps({"mikv": json.loads(args.knobs)})]
    cmd += args.server_args
    env = dict(os.environ)
    if args.verify:
        env["MIKV_VERIFY_DEMOTIONS"] = "1"
    tally, samples = Tally(), []
    crashed, settled, elapsed, load_samples, startup_s = 0, {}, 0.0, 0, 0.0
    t0 = time.time()
    try:
        with running_server(cmd, log_path, base, timeout=args.start_timeout, env=env) as proc:
            startup_s = time.time() - t0
            elapsed, load_samples = asyncio.run(drive(base, proc, args, tally, samples))
            if proc.poll() is not None:
                crashed = 1
            else:
                try:
                    settled = settle(base, args.served_name)
                except OSError as e:  # the server stopped answering: no pool check possible
                    settled = {"error": f"{type(e).__name__}: {e}"}
                crashed = int(proc.poll() is not None)
    except RuntimeError as e:  # it never came up (running_server: exited or not healthy)
        crashed, settled = 1, {"error": str(e)[-2000:]}
    log = log_path.read_text(errors="replace")
    warnings = [line for line in log.splitlines() if "mikv verify:" in line and "WARNING" in line]
    mib = [s["gpu_mib"] for s in samples if s["gpu_mib"] is not None]
    warm = mib[len(mib) // 10:] or mib  # past the first tenth: CUDA graphs and pools settled
    demotions, seen = [], 0.0
    for sample in samples[:load_samples]:  # a failed scrape carries the last value forward
        seen = sample["demotions"] if sample["demotions"] is not None else seen
        demotions.append(seen)
    # demotion "throughout": every minute of the load saw new demotions
    per_minute = max(1, int(60 / args.sample_every))
    windows = [demotions[i + per_minute] - demotions[i]
               for i in range(0, max(0, len(demotions) - per_minute), per_minute)]
    c = tally.counts
    last = samples[-1] if samples else {}
    leak = None
    if settled and "error" not in settled:
        leak = int((settled.get("mikv_lo_pages") or 0) + (settled.get("mikv_pack_blocks") or 0)
                   + (settled.get("mikv_hi_pages") or 0) if args.kv_cache_dtype == "mikv" else 0)
        if settled.get("kv_cache_usage_perc"):
            leak = max(leak, 1)
    row = {
        "name": args.name, "kv_cache_dtype": args.kv_cache_dtype, "knobs": args.knobs,
        "verify": args.verify, "duration_s": round(elapsed, 1), "startup_s": round(startup_s, 1),
        "requests": c["requests"], "completed": c["completed"], "failed": c["failed"],
        "aborted": c["aborted"], "malformed_sent": c["sent_malformed"],
        "malformed_4xx": c["malformed_4xx"], "unknown_field_sent": c["sent_unknown_field"],
        "unknown_field_completed": c["completed_unknown_field"],
        "server_crashes": crashed, "block_leak": leak,
        # from the counters after the drain, else from the last sample of the load
        "demotions": settled.get("mikv_demotions_total", last.get("demotions")),
        "pressure_demotions": settled.get("mikv_preemptions_avoided_total",
                                          last.get("pressure_demotions")),
        "preemptions": settled.get("num_preemptions_total", last.get("preemptions")),
        "minutes_without_demotion": sum(1 for w in windows if w <= 0),
        "verify_warnings": len(warnings), "verify_warning_samples": warnings[:5],
        "gpu_mib_first": warm[0] if warm else None, "gpu_mib_last": warm[-1] if warm else None,
        "gpu_mib_max": max(warm) if warm else None, "after_drain": settled,
        "malformed_status": dict(tally.malformed_status), "failure_samples": tally.failures,
        "median_latency_s": (sorted(tally.latencies)[len(tally.latencies) // 2]
                             if tally.latencies else None),
        "traffic": {"concurrency": args.concurrency, "malformed_share": args.malformed_share,
                    "unknown_field_share": args.unknown_field_share,
                    "abort_share": args.abort_share, "max_model_len": args.max_model_len,
                    "kv_cache_memory_bytes": args.kv_cache_memory_bytes,
                    "mix": "chat/completions 1:1, stream 1:1, n=1 70% else 2-4, prompts 10-200 "
                           "words 50% / 400-2000 35% / 2500-4000 15%, shared system prompts "
                           "60% of chat and 40% of completions, max_tokens 8-512",
                    "server_args": cmd[4:]},
        "samples": samples,
    }
    (out_dir / f"soak_{args.name}.json").write_text(json.dumps(row, indent=1))
    return row


SUMMED = ("duration_s", "requests", "completed", "failed", "aborted", "malformed_sent",
          "malformed_4xx", "server_crashes", "block_leak", "demotions", "verify_warnings",
          "minutes_without_demotion")


def merge(paths: list[str], out: str, extra: dict) -> dict:
    """soak.json: the runs' totals (issue 25's fields), the runs without their samples, and
    `extra` (sanitizer counts, versions)."""
    runs = [json.loads(Path(p).read_text()) for p in paths if Path(p).exists()]
    total = {k: sum(r.get(k) or 0 for r in runs) for k in SUMMED}
    total["longest_run_s"] = max((r["duration_s"] for r in runs), default=0)
    # a run whose pool could not be checked after the drain proves no absence of leaks
    total["block_leak_unchecked_runs"] = sum(r.get("block_leak") is None for r in runs)
    total["missing_runs"] = [p for p in paths if not Path(p).exists()]
    total.update(extra)
    total["runs"] = [{k: v for k, v in r.items() if k != "samples"} for r in runs]
    Path(out).write_text(json.dumps(total, indent=1))
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model")
    p.add_argument("--name", default="soak")
    p.add_argument("--served-name", default="soak")
    p.add_argument("--out-dir", default="soak-out")
    p.add_argument("--duration", type=float, default=480)
    p.add_argument("--concurrency", type=int, default=48)
    p.add_argument("--kv-cache-dtype", default="mikv")
    p.add_argument("--knobs", default="", help="mikv knobs as JSON")
    p.add_argument("--verify", action="store_true", help="MIKV_VERIFY_DEMOTIONS=1 on the server")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=1_500_000_000)
    p.add_argument("--gpu-util", type=float, default=0.5)
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--port", type=int, default=8191)
    p.add_argument("--start-timeout", type=float, default=420)
    p.add_argument("--sample-every", type=float, default=10)
    p.add_argument("--malformed-share", type=float, default=0.04)
    p.add_argument("--unknown-field-share", type=float, default=0.02)
    p.add_argument("--abort-share", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--merge", nargs="+", help="soak_<name>.json files to sum into --out")
    p.add_argument("--extra", default="{}", help="JSON merged into the summary (with --merge)")
    p.add_argument("--out", default="soak.json")
    p.add_argument("server_args", nargs="*", help="more `vllm serve` arguments (after --)")
    args = p.parse_args()
    if args.merge:
        total = merge(args.merge, args.out, json.loads(args.extra))
        print(json.dumps({k: v for k, v in total.items() if k != "runs"}))
        return
    if not args.model:
        p.error("--model is required")
    row = run(args)
    print(json.dumps({k: v for k, v in row.items() if k not in ("samples", "traffic")}))


if __name__ == "__main__":
    main()
