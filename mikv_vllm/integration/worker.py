"""The worker side of mikv: a vLLM GPU Worker subclass (`ParallelConfig.worker_cls`).

Before each step's forward it quantizes the pages the scheduler demoted into their pack slots in
every attention layer and points the pages' block-table entries at those slots: same CUDA
stream, before the forward, the first point where a block the scheduler freed can be
rewritten, also under async scheduling. Every TP rank receives the same SchedulerOutput, so
every rank moves the same pages of its own KV heads. It also owns the importance meter
(`mikv_vllm.importance`) and sends its reports back on the step's output."""
from __future__ import annotations

import functools

import torch
from vllm.utils.torch_utils import async_tensor_h2d
from vllm.v1.worker.gpu_worker import Worker

from mikv_vllm import ops
from mikv_vllm.config import MikvConfig
from mikv_vllm.importance import PageMassMeter, sampled_layers
from mikv_vllm.integration import protocol
from mikv_vllm.layout import PageLayout, split_kv_cache
from mikv_vllm.verify import DemotionVerifier, enabled as verify_enabled


class MikvWorker(Worker):
    mass_meter: PageMassMeter | None = None
    _report_due = False
    verifier: DemotionVerifier | None = None

    @functools.cached_property
    def mikv_config(self) -> MikvConfig:
        return MikvConfig.of(self.vllm_config)

    def initialize_from_config(self, kv_cache_config) -> None:
        if not self.use_v2_model_runner:
            raise RuntimeError("mikv: needs vLLM's V2 model runner (unset "
                               "VLLM_USE_V2_MODEL_RUNNER=0)")
        super().initialize_from_config(kv_cache_config)
        for layer in self.attention_layers:  # the one layout, from the KV cache spec
            layer.impl.layout = self.layout
        self._attach_mass_meter(kv_cache_config.num_blocks)
        if verify_enabled():
            self.verifier = DemotionVerifier()

    @functools.cached_property
    def attention_layers(self) -> list:
        """The model's attention layers in depth order (looked up once the model exists; every
        step with demotions walks them)."""
        from vllm.config import get_layers_from_vllm_config
        from vllm.model_executor.layers.attention import Attention
        from vllm.model_executor.models.utils import extract_layer_index

        layers = get_layers_from_vllm_config(self.vllm_config, Attention)
        return [layers[n] for n in sorted(layers, key=extract_layer_index)]

    def _attach_mass_meter(self, num_blocks: int) -> None:
        layers = self.attention_layers
        chosen = sampled_layers(len(layers))
        model, parallel = self.vllm_config.model_config, self.vllm_config.parallel_config
        sched = self.vllm_config.scheduler_config
        self.mass_meter = PageMassMeter(
            # decode rows of a step, CUDA-graph padding included
            num_blocks=num_blocks, max_rows=max(sched.max_num_seqs, sched.max_num_batched_tokens),
            num_q_heads=model.get_num_attention_heads(parallel),
            num_kv_heads=model.get_num_kv_heads(parallel), num_sampled_layers=len(chosen),
            tp_size=parallel.tensor_parallel_size, block_size=self.layout.block_size,
            head_dim=self.layout.head_size, device=self.device)
        for i in chosen:
            layers[i].impl.mass_meter = self.mass_meter

    def execute_model(self, scheduler_output):
        moves = protocol.get_demotions(scheduler_output)
        if self.verifier is not None and self.verifier.live:
            gone = set(scheduler_output.finished_req_ids) | set(
                getattr(scheduler_output, "preempted_req_ids", None) or ())
            self.verifier.check_live(self.attention_layers[0], self.layout,
                                     self.model_runner.block_tables.block_tables[0].gpu, gone)
        if moves:
            self.apply_demotions(moves)
        if self.mass_meter is not None and scheduler_output.total_num_scheduled_tokens:
            self._report_due |= self.mass_meter.step()
        return super().execute_model(scheduler_output)

    def sample_tokens(self, grammar_output):
        output = super().sample_tokens(grammar_output)
        # A step that scored prefill pages reports too: the scheduler waits for those scores
        # before it ranks the request's pages.
        due = self._report_due or (self.mass_meter is not None and self.mass_meter.observed)
        if due and output is not None:
            self._report_due = False
            output = protocol.send_block_mass(output, self.mass_meter.take(self._tp_all_reduce()))
        return output

    def _tp_all_reduce(self):
        if self.vllm_config.parallel_config.tensor_parallel_size == 1:
            return None
        from vllm.distributed import get_tp_group

        group = get_tp_group().device_group
        return lambda t: torch.distributed.all_reduce(t, group=group)

    def apply_demotions(self, moves) -> None:
        layout = self.layout
        # One launch reads every source while it writes every pack slot: no block may be both
        # (a middle-tier page moving on reads its own slot, which no move of the step writes).
        sources = {m.src for m in moves if m.src >= 0}
        clash = sources & {layout.locate(-1 - m.dst_code)[0] for m in moves}
        if clash:
            raise RuntimeError(f"mikv: blocks {sorted(clash)[:8]} are both demotion sources and "
                               "packs of one step (scheduler bug): refusing to corrupt them")
        # Pinned, non-blocking copies: a blocking one would wait for the previous step's GPU
        # work, which async scheduling lets run while this step is prepared.
        device = self.device
        src = async_tensor_h2d([m.src for m in moves], device, torch.int32)
        dst = async_tensor_h2d([m.dst_code for m in moves], device, torch.int32)
        if self.verifier is not None:
            self.verifier.save_sources(self.attention_layers[0], layout, moves)
        for layer in self.attention_layers:
            key_cache, value_cache = split_kv_cache(layer.kv_cache, layer.head_size)
            ops.quantize_pages(key_cache, value_cache, src, dst, layout,
                               layer._k_scale_float, layer._v_scale_float)
        # Point the pages' entries at their lo slots. Written straight into the runner's GPU
        # table (its staged writes take at most one write per table row and step, and only
        # append new pages or fill rows of new requests, never these old pages); stream order
        # puts this before the step's table gather.
        runner = self.model_runner
        index = runner.req_states.req_id_to_index
        kept = [m for m in moves if m.req_id in index]
        if kept:
            table = runner.block_tables.block_tables[0].gpu
            rows = async_tensor_h2d([index[m.req_id] for m in kept], device, torch.long)
            pages = async_tensor_h2d([m.page for m in kept], device, torch.long)
            codes = async_tensor_h2d([-(1 + m.dst_code) for m in kept], device, table.dtype)
            table[rows, pages] = codes
        if self.verifier is not None:
            self.verifier.check_moves(self.attention_layers[0], layout, moves,
                                      {m.req_id: index[m.req_id] for m in kept})

    @functools.cached_property
    def layout(self) -> PageLayout:
        """The page layout of every layer's cache (one KV cache group, so one layout; the
        scheduler refuses more groups): the scheduler's, from the same spec."""
        spec = self.model_runner.kv_cache_config.kv_cache_groups[0].kv_cache_spec
        cfg = self.mikv_config
        return PageLayout.from_spec(spec, **cfg.lo_format())
