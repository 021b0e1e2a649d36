"""What the workers would read after each step: the scheduler's demotions replayed on a model of
the V2 runner's block table and the KV memory (one tag per page), with vLLM's own scheduler
outputs, synchronous and asynchronous. Every page a request attends to must still hold that
request's data, wherever it lives (hi block or pack slot), and no cache write may land on a lo
page or a pack."""
from __future__ import annotations

import random

import pytest

from mikv_vllm.integration import protocol
from mikv_vllm.integration.scheduler import MikvAsyncScheduler, MikvScheduler
from test_scheduler import BLOCK, make_scheduler, request, schedule


class PagedMemory:
    """A worker's view: block-table rows per request, hi blocks and pack slots -> page tag."""

    def __init__(self, pack_factor: int, prompts: dict[str, list[int]]):
        self.n = pack_factor
        self.prompts = prompts
        self.rows: dict[str, list[int]] = {}
        self.hi: dict[int, tuple] = {}
        self.packs: dict[tuple[int, int], tuple[str, tuple]] = {}  # slot -> (owner, page tag)

    def tag(self, rid: str, page: int) -> tuple:
        """What a page holds: full prompt pages are named by their whole prefix (as vLLM's
        block hashes are, so requests sharing a prefix share them), other pages by request."""
        prompt = self.prompts[rid]
        if (page + 1) * BLOCK <= len(prompt):
            return ("prefix", hash(tuple(prompt[:(page + 1) * BLOCK])))
        return (rid, page)

    def execute(self, out) -> None:
        """One step in MikvWorker / GPUModelRunner order."""
        moves = protocol.get_demotions(out)
        # apply_demotions: one kernel launch reads every source and writes every slot at once,
        # so no block may be both a source and a pack of the same step.
        clash = {m.src for m in moves} & {m.dst_code // self.n for m in moves}
        assert not clash, f"blocks {sorted(clash)[:5]} are sources and packs of one step"
        for m in moves:
            assert self.hi.get(m.src) == self.tag(m.req_id, m.page), f"{m}: source " \
                f"holds {self.hi.get(m.src)}"
            assert self.rows[m.req_id][m.page] == m.src
        for m in moves:
            pack, slot = divmod(m.dst_code, self.n)
            self.hi.pop(pack, None)                        # lo bytes now fill the block
            self.packs[(pack, slot)] = (m.req_id, self.tag(m.req_id, m.page))
            self.rows[m.req_id][m.page] = -(1 + m.dst_code)
        gone = set(out.finished_req_ids) | set(getattr(out, "preempted_req_ids", None) or ())
        for rid in gone:                                   # their blocks and packs are free
            self.rows.pop(rid, None)
        for key in [k for k, (owner, _) in self.packs.items() if owner in gone]:
            del self.packs[key]
        for new in out.scheduled_new_reqs:                 # rows of new requests
            self.rows[new.req_id] = list(new.block_ids[0])
        cached = out.scheduled_cached_reqs
        for rid, ids in zip(cached.req_ids, cached.new_block_ids):
            if rid in cached.resumed_req_ids:
                self.rows[rid] = list(ids[0])
            elif ids is not None:
                self.rows[rid] += list(ids[0])
        computed = {new.req_id: new.num_computed_tokens for new in out.scheduled_new_reqs}
        computed.update(zip(cached.req_ids, cached.num_computed_tokens))
        for rid, k in out.num_scheduled_tokens.items():   # the forward
            row, first, end = self.rows[rid], computed[rid], computed[rid] + k
            for page in range(first // BLOCK, -(-end // BLOCK)):      # cache writes
                block = row[page]
                assert block >= 0, f"{rid} writes its page {page}, which is lo"
                for slot in range(self.n):
                    assert (block, slot) not in self.packs, f"{rid} overwrites a pack"
                self.hi[block] = self.tag(rid, page)
            for page in range(-(-end // BLOCK)):                       # attention reads
                e = row[page]
                got = self.hi.get(e) if e >= 0 else \
                    self.packs.get(divmod(-e - 1, self.n), (None, None))[1]
                assert got == self.tag(rid, page), f"{rid} page {page} (entry {e}) reads {got}"


@pytest.mark.parametrize("cls", [MikvScheduler, MikvAsyncScheduler])
@pytest.mark.parametrize("knobs,num_blocks,shared", [({"hi_budget": 0.1}, 2000, 0),
                                                     ({}, 150, 0), ({"hi_budget": 0.1}, 2000, 40)])
def test_every_page_reads_its_own_data(tiny_llama, cls, knobs, num_blocks, shared):
    rng = random.Random(5)
    sched = make_scheduler(tiny_llama, num_blocks, knobs, chunk=1024, cls=cls)
    prefix = [rng.randrange(1000) for _ in range(shared)]  # shared prompt start (prefix cache)
    prompts = {}
    for i in range(12):   # several requests reach decoding, and demote, in the same steps
        req = request(f"r{i}", rng.randrange(300, 700), rng.randrange(50, 300), rng, prefix)
        prompts[req.request_id] = list(req.prompt_token_ids)
        sched.add_request(req)
    mem = PagedMemory(sched.layout.pack_factor, prompts)
    pending, demoted = None, 0
    for _ in range(3000):  # the engine's order: step N + 1 is scheduled before N's output
        if not sched.has_requests() and pending is None:
            break
        out, runner_out = schedule(sched)
        demoted += len(protocol.get_demotions(out))
        mem.execute(out)
        if cls is MikvScheduler:
            sched.update_from_output(out, runner_out)
            continue
        if pending is not None:
            sched.update_from_output(*pending)
        pending = (out, runner_out) if out.num_scheduled_tokens else None
    assert not sched.has_requests() and demoted > 0
