"""The worker side of demotion: a vLLM GPU Worker subclass (`ParallelConfig.worker_cls`) that,
before each step's forward, quantizes the pages the scheduler demoted into their pack slots in
every attention layer and points the pages' block-table entries at those slots.

Same CUDA stream, before the forward: the first point where a block the scheduler freed can be
rewritten, also under async scheduling. Every TP rank receives the same SchedulerOutput, so
every rank moves the same pages of its own KV heads."""
from __future__ import annotations

import functools

import torch
from vllm.v1.worker.gpu_worker import Worker

from mikv_vllm import ops
from mikv_vllm.attention.backend import split_kv_cache
from mikv_vllm.config import MikvConfig
from mikv_vllm.layout import cache_layout
from mikv_vllm.scheduler import DEMOTIONS_ATTR


class MikvWorker(Worker):
    @functools.cached_property
    def mikv_config(self) -> MikvConfig:
        return MikvConfig.from_additional_config(self.vllm_config.additional_config)

    def execute_model(self, scheduler_output):
        moves = getattr(scheduler_output, DEMOTIONS_ATTR, None)
        if moves:
            self.apply_demotions(moves)
        return super().execute_model(scheduler_output)

    def apply_demotions(self, moves) -> None:
        from vllm.config import get_layers_from_vllm_config
        from vllm.model_executor.layers.attention import Attention

        device = self.device
        src = torch.tensor([m.src_block for m in moves], dtype=torch.int32).to(device)
        dst = torch.tensor([m.dst_code for m in moves], dtype=torch.int32).to(device)
        cfg = self.mikv_config
        for layer in get_layers_from_vllm_config(self.vllm_config, Attention).values():
            key_cache, value_cache = split_kv_cache(layer.kv_cache, layer.head_size)
            layout = cache_layout(key_cache, cfg.lo_bits, cfg.value_group_size)
            ops.quantize_pages(key_cache, value_cache, src, dst, layout,
                               layer._k_scale_float, layer._v_scale_float)
        runner = self.model_runner
        table = runner.block_tables.block_tables[0]
        for m in moves:
            row = runner.req_states.req_id_to_index.get(m.req_id)
            if row is not None:  # staged writes land after this step's request updates
                table.stage_write(row, m.page, [-(1 + m.dst_code)])
