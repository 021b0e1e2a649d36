// Host-side view of one paged decode launch (shapes, strides, raw pointers).
#pragma once
#include <torch/all.h>
#include <cstdint>

namespace mikv {

struct DecodeArgs {
  const void* q = nullptr;
  void* out = nullptr;
  const void* k_cache = nullptr;
  const void* v_cache = nullptr;
  const int32_t* block_table = nullptr;
  const int32_t* seq_lens = nullptr;
  float* part_acc = nullptr;
  float* part_ml = nullptr;
  int64_t q_stride_tok = 0, q_stride_head = 0, out_stride_tok = 0, out_stride_head = 0;
  int64_t kv_stride_block = 0, kv_stride_tok = 0, kv_stride_head = 0, bt_stride = 0;
  int num_seqs = 0, num_q_heads = 0, num_kv_heads = 0, group = 1, head_dim = 0;
  int block_size = 0, num_splits = 1;
  float scale_log2 = 0.f, k_scale = 1.f, v_scale = 1.f;
};

void paged_decode(torch::Tensor& out, const torch::Tensor& query, const torch::Tensor& key_cache,
                  const torch::Tensor& value_cache, const torch::Tensor& block_table,
                  const torch::Tensor& seq_lens, double scale, double k_scale, double v_scale,
                  int64_t num_splits);

}  // namespace mikv
