"""MikvScheduler driven like the engine drives vLLM's Scheduler (schedule ->
update_from_output), on CPU with real vLLM 0.26 objects: demotion comes before preemption."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from vllm import SamplingParams
from vllm.engine.arg_utils import EngineArgs
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

from conftest import GPU_WORKER, one_layer_kv_cache_config
from mikv_vllm.importance import request_page_mass
from mikv_vllm.integration import protocol
from mikv_vllm.integration.scheduler import MikvAsyncScheduler, MikvScheduler

BLOCK = 16
init_none_hash(sha256)
HASHER = get_request_block_hasher(BLOCK, sha256)


def make_scheduler(model: str, num_blocks: int, knobs: dict | None = None,
                   log_stats: bool = False, chunk: int = 2048, cls=MikvScheduler,
                   max_num_seqs: int = 16, **engine):
    args = EngineArgs(model=model, kv_cache_dtype="mikv", skip_tokenizer_init=True, **engine,
                      worker_cls=GPU_WORKER, block_size=BLOCK, max_num_seqs=max_num_seqs,
                      max_num_batched_tokens=chunk, async_scheduling=cls is MikvAsyncScheduler,
                      additional_config={"mikv": knobs or {}}, enable_prefix_caching=True)
    vllm_config = args.create_engine_config()
    kv_config = one_layer_kv_cache_config(num_blocks, BLOCK, num_kv_heads=2, head_size=64)
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    return cls(vllm_config, kv_config, StructuredOutputManager(vllm_config),
               block_size=BLOCK, log_stats=log_stats)


def request(rid: str, prompt_len: int, max_tokens: int, rng: random.Random,
            prefix: list[int] = ()) -> Request:
    return Request(rid, list(prefix) + [rng.randrange(1000) for _ in range(prompt_len)],
                   SamplingParams(max_tokens=max_tokens, ignore_eos=True), None,
                   block_hasher=HASHER)


def schedule(sched: MikvScheduler):
    """One schedule() and the runner output its step will produce (a token for each request
    past its prompt)."""
    out = sched.schedule()
    ids = list(out.num_scheduled_tokens)
    sampled = []
    for rid in ids:
        req = sched.requests[rid]
        done_prefill = req.num_computed_tokens >= req.num_prompt_tokens  # after schedule()
        sampled.append([5] if done_prefill else [])
    return out, ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                  sampled_token_ids=sampled)


def step(sched: MikvScheduler):
    out, runner_out = schedule(sched)
    sched.update_from_output(out, runner_out)
    return out


def steps(sched: MikvScheduler, limit: int):
    """Steps `sched` while it has requests, at most `limit` times; yields each step's output."""
    for _ in range(limit):
        if not sched.has_requests():
            return
        yield step(sched)


def page_mass(sched: MikvScheduler, request) -> torch.Tensor:
    """The ranking's mass per page of `request` (0 for lo pages, whose entry is the null
    block)."""
    pages = -(-request.num_computed_tokens // sched.layout.block_size)
    blocks = sched.demoter.manager.req_to_blocks.get(request.request_id, [])[:pages]
    mass = request_page_mass(sched.block_mass, [b.block_id for b in blocks])
    return torch.cat([mass, mass.new_zeros(pages - mass.numel())])


def preemptions(out) -> int:
    """Requests vLLM preempted in the step of `out`."""
    return len(getattr(out, "preempted_req_ids", None) or ())


def test_memory_pressure_demotes_instead_of_preempting(tiny_llama):
    rng = random.Random(0)
    sched = make_scheduler(tiny_llama, num_blocks=120, log_stats=True)
    n = sched.layout.pack_factor
    assert n >= 2
    for i in range(4):
        sched.add_request(request(f"r{i}", 400, 300, rng))  # 4 x 44 pages > 119 blocks
    moves, preempted, finished = [], 0, set()
    for out in steps(sched, 800):
        moves += protocol.get_demotions(out)
        preempted += preemptions(out)
        finished |= set(out.finished_req_ids)
        if sched.demoter.num_lo_pages():
            lo_seen = sched.make_stats().mikv  # what vLLM's stat loggers receive
    assert finished == {f"r{i}" for i in range(4)}
    assert moves, "no page was demoted"
    assert lo_seen["lo_pages"] > 0 and lo_seen["pack_blocks"] > 0
    assert lo_seen["demotions_total"] == lo_seen["pressure_demotions_total"] > 0
    assert lo_seen["max_resident_tokens"] > (120 - 1) * BLOCK  # more than the hi pool holds
    final = sched.make_stats().mikv
    assert final["demotions_total"] == len(moves) and final["preemptions_total"] == 0
    assert preempted == 0, f"{preempted} preemptions despite demotion"
    assert sched.demoter.num_pack_blocks() == 0
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == 120 - 1
    # idle, the counters vLLM's loggers get read 0; a block nobody holds would show as hi
    assert final["hi_pages"] == final["lo_pages"] == final["pack_blocks"] == 0
    assert final["resident_tokens"] == 0
    sched.kv_cache_manager.block_pool.get_new_blocks(1)
    assert sched.make_stats().mikv["hi_pages"] == 1
    # every move names a page that left its request for a pack slot of another block
    assert all(m.src != m.dst_code // n for m in moves)


def test_one_sequence_whole_prompts_demotes_its_own_pages(tiny_llama):
    """--max-num-seqs 1 and chunked prefill off: a lone request that outgrows the pool makes
    room from its own cold pages, and the next one runs after it."""
    rng = random.Random(0)
    sched = make_scheduler(tiny_llama, num_blocks=40, log_stats=True, max_num_seqs=1,
                           enable_chunked_prefill=False)
    for i in range(2):
        sched.add_request(request(f"r{i}", 400, 400, rng))  # 50 pages each > 39 blocks
    moves, preempted, finished = [], 0, set()
    for out in steps(sched, 2000):
        assert len(out.num_scheduled_tokens) <= 1
        moves += protocol.get_demotions(out)
        preempted += preemptions(out)
        finished |= set(out.finished_req_ids)
    assert finished == {"r0", "r1"} and moves and preempted == 0
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == 40 - 1


def test_tiers_take_4_bit_first_and_2_bit_when_short(tiny_llama):
    """With lo_bits [4, 2] memory pressure moves pages to 4-bit; once 4-bit alone cannot make
    room, whole 4-bit packs move on to 2-bit (requantized by the workers): more tokens fit
    than in all-4-bit, nothing is preempted, and the pool is whole at the end."""
    from mikv_vllm.layout import MID_TIER

    rng = random.Random(0)
    blocks = 100
    sched = make_scheduler(tiny_llama, num_blocks=blocks, log_stats=True,
                           knobs={"lo_bits": [4, 2]})
    mid, lo = sched.layout.mid.pack_factor, sched.layout.pack_factor
    assert 2 <= mid < lo
    for i in range(6):  # 6 x 50 pages: 6 x (5 hi + 15) blocks all-4-bit, 6 x (5 + 9) all-2-bit
        sched.add_request(request(f"r{i}", 600, 200, rng))
    moves, preempted, stats = [], 0, []
    for out in steps(sched, 1000):
        moves += protocol.get_demotions(out)
        preempted += preemptions(out)
        stats.append(sched.make_stats().mikv)
    to_mid = [m for m in moves if m.src >= 0 and m.dst_code & MID_TIER]
    on_to_lo = [m for m in moves if m.src < 0]
    direct = [m for m in moves if m.src >= 0 and not m.dst_code & MID_TIER]
    assert to_mid and on_to_lo and not any(m.dst_code & MID_TIER for m in on_to_lo)
    assert {-1 - m.src for m in on_to_lo} <= {m.dst_code for m in to_mid}
    # the first 2-bit move comes only once pages are 4-bit, and hi pages go straight to
    # 2-bit only once 4-bit packs have had to move on
    assert moves.index(on_to_lo[0]) > moves.index(to_mid[0])
    assert direct and moves.index(direct[0]) > moves.index(on_to_lo[0])
    assert preempted == 0
    assert max(s["mid_pages"] for s in stats) > 0 and max(s["mid_pack_blocks"] for s in stats)
    assert max(s["max_resident_tokens"] for s in stats) > (blocks - 1) * BLOCK * 2
    final = stats[-1]
    assert 0 < final["left_kv_bytes_ratio"] < 1
    assert sched.demoter.num_pack_blocks() == 0 and not sched.demoter.requests
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == blocks - 1


def test_key_outliers_size_the_schedulers_lo_pages(tiny_llama):
    """The key_outliers knob reaches the scheduler's layout (the bytes kv_budget counts and the
    pack factor the demoter fills) the way the worker derives it from the same spec."""
    plain = make_scheduler(tiny_llama, num_blocks=60)
    sched = make_scheduler(tiny_llama, num_blocks=60, knobs={"key_outliers": True})
    lay = sched.layout
    assert lay.key_outliers and lay.outlier_slots == 16 and not plain.layout.key_outliers
    assert lay.lo_page_bytes == plain.layout.lo_page_bytes + lay.num_kv_heads * 16 * 4
    assert sched.page_costs[-1] == lay.lo_page_bytes / lay.bf16_page_bytes


def test_moves_survive_the_trip_to_the_workers(tiny_llama):
    """The multiprocessing and Ray executors pickle the SchedulerOutput to every rank: the
    step's moves must arrive whole (and a step without moves carries an empty list)."""
    import pickle

    rng = random.Random(1)
    sched = make_scheduler(tiny_llama, num_blocks=400, knobs={"hi_budget": 0.25})
    sched.add_request(request("a", 640, 40, rng))
    outputs = [step(sched) for _ in range(6)]
    sent = [protocol.get_demotions(o) for o in outputs]
    assert any(sent) and not all(sent)
    assert [protocol.get_demotions(pickle.loads(pickle.dumps(o))) for o in outputs] == sent


def test_shared_prefix_pages_do_not_stop_demotion(tiny_llama):
    """Requests sharing a cached system prompt: its pages stay hi (shared blocks free
    nothing), and must not take the places of the request's own cold pages in the ranking:
    with no mass reported yet the oldest pages rank coldest, and those are the shared ones."""
    rng = random.Random(2)
    sched = make_scheduler(tiny_llama, num_blocks=100)
    prefix = [rng.randrange(1000) for _ in range(20 * BLOCK)]
    reqs = [request(f"r{i}", 200, 300, rng, prefix=prefix) for i in range(4)]
    assert run_to_completion(sched, reqs) == 0
    assert sched.demoter.total_demoted > 0
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == 100 - 1


@pytest.mark.parametrize("lo_bits,budget", [(2, 0.25), ([4, 2], 0.25), ([4, 2], 0.4)])
def test_kv_budget_is_met_by_the_mix_that_loses_least(tiny_llama, lo_bits, budget):
    """kv_budget, a share of bf16's bytes, without pressure: a request leaves within it (to a
    pack of slack); with two tiers a loose budget keeps its demoted pages 4-bit and a tight one
    sends only what it must to 2-bit, the coldest pages straight from hi (one quantization
    from the original values, not a 4-bit copy's requantization)."""
    rng = random.Random(3)
    sched = make_scheduler(tiny_llama, num_blocks=400,
                           knobs={"kv_budget": budget, "lo_bits": lo_bits, "recent_pages": 2})
    sched.add_request(request("a", 1200, 60, rng))
    moves = [m for out in steps(sched, 120) for m in protocol.get_demotions(out)]
    s = sched.page_stats.stats
    assert s.left_requests == 1 and s.left_pages == 79 and moves
    assert budget - 0.05 < s.left_kv_bytes_ratio <= budget + 0.01
    assert s.pressure_demotions_total == 0
    if lo_bits == 2:
        assert s.left_mid_pages == 0
    elif budget == 0.4:  # all-4-bit fits: nothing goes to 2-bit
        assert s.left_mid_pages == s.left_lo_pages and all(m.src >= 0 for m in moves)
    else:
        from mikv_vllm.layout import MID_TIER

        assert 0 < s.left_mid_pages < s.left_lo_pages
        direct = [m for m in moves if m.src >= 0 and not m.dst_code & MID_TIER]
        requantized = [m for m in moves if m.src < 0]
        assert direct and len(requantized) < len(direct)
        assert len(moves) == s.left_lo_pages + len(requantized)  # each page leaves hi once
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == 400 - 1


def test_hi_budget_demotes_without_pressure(tiny_llama):
    rng = random.Random(1)
    sched = make_scheduler(tiny_llama, num_blocks=400,
                           knobs={"hi_budget": 0.25, "sink_pages": 1, "recent_pages": 2})
    sched.add_request(request("a", 640, 40, rng))
    moves = [m for out in steps(sched, 60) for m in protocol.get_demotions(out)]
    pages = {m.page for m in moves}
    assert 0 not in pages                      # the sink stays hi
    assert len(pages) >= 40 * 0.75 - 3         # ~75% of 40+ pages went lo
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == 400 - 1
    # the bytes it was answered from: its pages as it left, over bf16's
    s, lay = sched.page_stats.stats, sched.layout
    assert (s.left_requests, s.left_pages, s.left_lo_pages) == (1, 43, len(pages))
    want = ((43 - len(pages)) * lay.hi_page_bytes + len(pages) * lay.lo_page_bytes) / (
        43 * lay.hi_page_bytes)
    assert s.left_kv_bytes_ratio == pytest.approx(want) and want < 0.5


def test_abort_mid_demotion_returns_everything(tiny_llama):
    rng = random.Random(2)
    sched = make_scheduler(tiny_llama, num_blocks=200, knobs={"hi_budget": 0.2})
    for i in range(3):
        sched.add_request(request(f"r{i}", 300, 500, rng))
    for _ in range(30):
        step(sched)
    assert sched.demoter.num_lo_pages() > 0
    sched.finish_requests(["r0", "r1", "r2"], finished_status=__import__(
        "vllm.v1.request", fromlist=["RequestStatus"]).RequestStatus.FINISHED_ABORTED)
    assert sched.demoter.num_pack_blocks() == 0
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == 200 - 1


def random_schedule(sched, rng: random.Random, num_requests: int, prompt_lens: range,
                    output_lens: range, prompts: list[list[int]] | None = None):
    """Random arrivals (a fifth of the steps) of `num_requests` requests, each on one of
    `prompts` if given, and random aborts, until every request is done; checks that each one
    not aborted got all its tokens. Returns (requests, finished, aborted, pages demoted,
    preemptions)."""
    from vllm.v1.request import RequestStatus

    reqs, aborted, finished, preempted, moves = {}, set(), set(), 0, 0
    for _ in range(125 * num_requests):  # 3000 steps for 24 requests
        if len(reqs) < num_requests and rng.random() < 0.2:
            rid = f"r{len(reqs)}"
            max_tokens = rng.randrange(output_lens.start, output_lens.stop)
            prompt_len = rng.randrange(prompt_lens.start, prompt_lens.stop)
            prefix = rng.choice(prompts) if prompts else ()
            reqs[rid] = request(rid, prompt_len, max_tokens, rng, prefix=prefix)
            sched.add_request(reqs[rid])
        if sched.running and rng.random() < 0.01:
            rid = rng.choice(sched.running).request_id
            sched.finish_requests([rid], finished_status=RequestStatus.FINISHED_ABORTED)
            aborted.add(rid)
        if not sched.has_requests():
            if len(reqs) == num_requests:
                break
            continue
        out = step(sched)
        moves += len(protocol.get_demotions(out))
        preempted += preemptions(out)
        for rid in out.finished_req_ids:
            if rid not in aborted:
                finished.add(rid)
                assert reqs[rid].num_output_tokens == reqs[rid].max_tokens
    assert not sched.has_requests() and len(reqs) == num_requests
    assert finished | aborted == set(reqs), "a request was lost"
    return reqs, finished, aborted, moves, preempted


def test_random_arrivals_aborts_and_preemption_fallback_lose_nothing(tiny_llama):
    """Random arrivals, lengths and aborts on a pool that demotion alone cannot stretch far
    enough (every request keeps sink + recent pages hi): vLLM still preempts when demotion can
    free nothing, every request that was not aborted finishes with all its tokens, and the pool
    is whole at the end."""
    rng = random.Random(5)
    blocks = 60
    sched = make_scheduler(tiny_llama, num_blocks=blocks, log_stats=True,
                           knobs={"sink_pages": 1, "recent_pages": 4})
    _, _, aborted, moves, preempted = random_schedule(sched, rng, 24, range(16, 200),
                                                      range(8, 120))
    print(f"{moves} pages demoted, {preempted} preemptions, {len(aborted)} aborted")
    assert moves > 0 and preempted > 0  # demotion first, preemption as the fallback
    assert sched.demoter.num_pack_blocks() == 0 and not sched.demoter.requests
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == blocks - 1


@pytest.mark.parametrize("seed", range(4))
def test_random_schedules_with_shared_prefixes_leak_nothing(tiny_llama, seed):
    """Random arrivals sharing cached prompts (or not), random aborts, pressure, with and
    without a hi budget: every request that was not aborted gets all its tokens, and the pool,
    the packs and the scheduler's per-request state are whole again at the end."""
    rng = random.Random(seed)
    blocks = rng.choice([60, 90, 140])
    sched = make_scheduler(tiny_llama, num_blocks=blocks, max_num_seqs=rng.choice([4, 16, 32]),
                           knobs=rng.choice([{}, {"hi_budget": 0.3}, {"lo_bits": [4, 2]},
                                             {"lo_bits": [4, 2], "hi_budget": 0.3}]))
    prompts = [[rng.randrange(1000) for _ in range(rng.randrange(1, 12) * BLOCK)]
               for _ in range(3)] + [[]]
    _, _, _, moves, _ = random_schedule(sched, rng, 30, range(16, 300), range(8, 150), prompts)
    assert moves > 0 and sched.demoter.total_demoted > 0
    assert sched.demoter.num_pack_blocks() == 0 and not sched.demoter.requests
    assert not sched._nothing_movable
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == blocks - 1


def run_to_completion(sched, reqs) -> int:
    """Steps `sched` until every request in `reqs` finished; returns vLLM's preemptions."""
    for r in reqs:
        sched.add_request(r)
    preempted = sum(preemptions(out) for out in steps(sched, 100_000))
    assert not sched.has_requests()
    assert all(r.num_output_tokens == r.max_tokens for r in reqs)
    return preempted


@pytest.mark.parametrize("headroom", [True, False])
def test_admissions_leave_demotion_room_to_open_packs(tiny_llama, headroom):
    """Demotion needs free blocks to open packs in, and its sources come back only after the
    step is planned. Without an admission watermark vLLM could admit waiting requests into
    every block demotion had just freed, and the next step could open only a pack or two:
    vLLM preempted (3 times in workload a's 256 x (2048 + 256) at auto's pool). mikv turns
    vLLM's own --watermark on; with it, no preemption here."""
    sched = make_scheduler(tiny_llama, num_blocks=768, max_num_seqs=64)
    assert sched.vllm_config.scheduler_config.watermark == MikvScheduler.free_watermark
    if not headroom:
        sched.kv_cache_manager.watermark_blocks = 0
    rng = random.Random(0)
    preempted = run_to_completion(sched, [request(f"r{i}", 256, 64, rng) for i in range(64)])
    assert (preempted == 0) == headroom, preempted
    assert sched.demoter.total_demoted > 0


def test_explicit_watermark_is_kept(tiny_llama):
    args = EngineArgs(model=tiny_llama, kv_cache_dtype="mikv", skip_tokenizer_init=True,
                      worker_cls=GPU_WORKER, watermark=0.05)
    assert args.create_engine_config().scheduler_config.watermark == 0.05


def test_pressure_ranks_only_requests_with_hi_demotable_pages(tiny_llama):
    """Under lasting pressure, once a request's demotable range is all lo, ranking it finds
    nothing: the pressure loop must not rank it (it ranked all 64 requests of 64 x 32K on every
    step of the decode tail, ~25 ms of the scheduler's time per step)."""
    sched = make_scheduler(tiny_llama, num_blocks=52, knobs={"sink_pages": 1, "recent_pages": 2})
    ranked = []
    movable = sched._movable
    sched._movable = lambda r: ranked.append(r.request_id) or movable(r)
    rng = random.Random(1)
    reqs = [request(f"r{i}", 600, 150, rng) for i in range(4)]
    for r in reqs:
        sched.add_request(r)
    saturated = 0
    while sched.has_requests():
        before = len(ranked)
        decoding = [r for r in sched.running if r.num_computed_tokens >= r.num_prompt_tokens]
        nothing_left = decoding and not any(sched._has_hi_demotable(r) for r in decoding)
        step(sched)
        if nothing_left:
            saturated += 1
            assert len(ranked) == before, "ranked a request with nothing left to demote"
    assert saturated > 0 and sched.demoter.total_demoted > 0
    assert all(r.num_output_tokens == 150 for r in reqs)


def test_importance_reports_rank_pages(tiny_llama):
    """A worker report (mass per physical block, on the step's ModelRunnerOutput) reaches the
    request's ranking; the budget then demotes the pages that got no attention first."""

    rng = random.Random(3)
    sched = make_scheduler(tiny_llama, num_blocks=400, knobs={"sink_pages": 1, "recent_pages": 2})
    sched.add_request(request("a", 320, 100, rng))  # 20 pages
    step(sched)                                       # prefill
    blocks = [b.block_id for b in sched.demoter.manager.req_to_blocks["a"]]
    hot = {3, 7, 11}
    block_mass = torch.zeros(400)
    block_mass[[blocks[p] for p in hot]] = 0.3
    out = sched.schedule()
    runner_out = ModelRunnerOutput(req_ids=["a"], req_id_to_index={"a": 0},
                                   sampled_token_ids=[[5]])
    protocol.put_block_mass(runner_out, block_mass.numpy())
    sched.update_from_output(out, runner_out)
    mass = page_mass(sched, sched.requests["a"])
    assert mass[sorted(hot)].tolist() == pytest.approx([0.3] * 3)
    assert float(mass.sum()) == pytest.approx(0.9)
    # A budget of 4 hi pages of 21 keeps sink + 2 recent + 1 more: the 15 cold demotable pages
    # go first, then 2 of the 3 hot ones.
    sched.mikv_policy = dataclasses.replace(sched.mikv_policy, hi_budget=0.2)
    demoted = {m.page for m in protocol.get_demotions(step(sched))}
    assert len(demoted) == 17 and len(hot - demoted) == 1, sorted(demoted)


def test_budget_waits_for_the_prefill_scores(tiny_llama):
    """Under async scheduling the first decode is scheduled before the prefill's output (and
    the window scores riding on it) is back: nothing may be ranked then, or the budget would
    demote by age alone. One step later the scored page stays hi."""

    rng = random.Random(4)
    sched = make_scheduler(tiny_llama, num_blocks=400, cls=MikvAsyncScheduler,
                           knobs={"hi_budget": 0.2, "sink_pages": 1, "recent_pages": 2})
    sched.add_request(request("a", 320, 20, rng))  # 20 pages
    prefill = sched.schedule()
    first_decode = sched.schedule()
    assert protocol.get_demotions(first_decode) == []
    blocks = [b.block_id for b in sched.demoter.manager.req_to_blocks["a"]]
    report = torch.zeros(400)
    report[blocks[9]] = 0.5  # the page the prompt's question attended to
    out = ModelRunnerOutput(req_ids=["a"], req_id_to_index={"a": 0}, sampled_token_ids=[[5]])
    protocol.put_block_mass(out, report.numpy())
    sched.update_from_output(prefill, out)
    demoted = {m.page for m in protocol.get_demotions(sched.schedule())}
    assert len(demoted) >= 14 and not demoted & {0, 9}, sorted(demoted)


def test_one_report_reaches_every_running_request(tiny_llama):
    """The report is gathered for all running requests at once: each gets its own pages."""

    rng = random.Random(4)
    sched = make_scheduler(tiny_llama, num_blocks=400)
    for rid, pages in (("a", 12), ("b", 7), ("c", 20)):
        sched.add_request(request(rid, pages * BLOCK, 10, rng))
    step(sched)                                       # prefill all three
    block_mass = torch.zeros(400)
    hot = {"a": 2, "b": 5, "c": 11}
    for rid, page in hot.items():
        block_mass[sched.demoter.manager.req_to_blocks[rid][page].block_id] = 0.5
    out, runner_out = schedule(sched)
    protocol.put_block_mass(runner_out, block_mass.numpy())
    sched.update_from_output(out, runner_out)
    for rid, page in hot.items():
        mass = page_mass(sched, sched.requests[rid])
        assert mass.numel() == len(sched.demoter.manager.req_to_blocks[rid])
        assert mass.nonzero().flatten().tolist() == [page] and float(mass[page]) == 0.5


def test_a_reused_block_starts_cold(tiny_llama):
    """Mass is kept per physical block: a block that leaves its request (here an abort) is
    cleared, so the next request that gets it does not inherit the old page's ranking."""
    from vllm.v1.request import RequestStatus


    rng = random.Random(6)
    sched = make_scheduler(tiny_llama, num_blocks=40)
    sched.add_request(request("a", 10 * BLOCK, 50, rng))
    step(sched)
    old = {b.block_id for b in sched.demoter.manager.req_to_blocks["a"]}
    out, runner_out = schedule(sched)
    report = torch.zeros(40)
    report[sorted(old)] = 1.0  # workers report mass only for the blocks decodes read
    protocol.put_block_mass(runner_out, report.numpy())
    sched.update_from_output(out, runner_out)
    assert page_mass(sched, sched.requests["a"])[:10].tolist() == [1.0] * 10
    sched.finish_requests(["a"], finished_status=RequestStatus.FINISHED_ABORTED)
    sched.add_request(request("b", 30 * BLOCK, 5, rng))
    step(sched)
    new = {b.block_id for b in sched.demoter.manager.req_to_blocks["b"]}
    assert old & new, "the pool did not hand a's blocks to b"
    assert float(page_mass(sched, sched.requests["b"]).abs().sum()) == 0.0


def test_a_report_late_for_a_demoted_page_is_dropped(tiny_llama):
    """Under async scheduling the report of step N arrives after step N + 1 was scheduled, so
    it can still carry mass for a page that N + 1 demoted: the freed block keeps none of it."""

    rng = random.Random(7)
    sched = make_scheduler(tiny_llama, num_blocks=100,
                           knobs={"hi_budget": 0.3, "sink_pages": 1, "recent_pages": 2})
    sched.add_request(request("a", 20 * BLOCK, 30, rng))
    step(sched)                                   # prefill
    out, runner_out = schedule(sched)             # the budget demotes here
    sources = [m.src for m in protocol.get_demotions(out)]
    assert sources
    late = torch.zeros(100)
    late[sources] = 1.0                           # read by the step before the demotion
    protocol.put_block_mass(runner_out, late.numpy())
    sched.update_from_output(out, runner_out)
    assert float(sched.block_mass[sources].abs().sum()) == 0.0


def test_block_mass_of_lo_and_null_pages_is_zero():
    block_mass = torch.arange(10, dtype=torch.float32)
    assert request_page_mass(block_mass, [4, 0, 9]).tolist() == [4.0, 0.0, 9.0]
    assert request_page_mass(block_mass, []).numel() == 0


def test_long_prompts_are_admitted_beyond_the_hi_pool(tiny_llama):
    """vLLM admits a request only if its whole prompt fits (scheduler_reserve_full_isl): with
    prompts longer than a prefill chunk and a pool for 3 of them, demotion must make room for
    the next whole prompt, or mikv holds no more requests than bf16 would."""
    rng = random.Random(4)
    sched = make_scheduler(tiny_llama, num_blocks=200, log_stats=True, chunk=512)
    assert sched.scheduler_reserve_full_isl
    for i in range(6):
        sched.add_request(request(f"r{i}", 1000, 200, rng))  # 63 pages each, 3 fit hi
    most_running, preempted = 0, 0
    for out in steps(sched, 2000):
        most_running = max(most_running, len(sched.running))
        preempted += preemptions(out)
    assert not sched.has_requests()
    assert most_running >= 5, most_running
    assert preempted == 0
    assert sched.make_stats().mikv["max_resident_tokens"] > 199 * BLOCK * 1.5
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == 200 - 1


def test_scheduler_step_benchmark_runs_real_schedulers():
    """benchmarks/scheduler_step.py drives vLLM's Scheduler and MikvScheduler to completion
    (timings are not checked: benchmarks are not timed tests)."""
    import argparse
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "scheduler_step.py")
    spec = importlib.util.spec_from_file_location("scheduler_step", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = argparse.Namespace(model=os.path.join(os.path.dirname(path), "configs", "llama-3.1-8b"),
                              requests=4, prompt=64, output=24, chunk=256, blocks=0)
    auto = bench.run("auto", None, args)
    mikv = bench.run("mikv", {"hi_budget": 0.5}, args)
    assert auto["scheduler"] == "Scheduler" and mikv["scheduler"] == "MikvScheduler"
    assert auto["steps"] == mikv["steps"] and mikv["report_steps"] > 0
