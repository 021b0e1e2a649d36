// Attention mass of every hi page for the demotion policy.
//
// The decode kernel leaves each query head's softmax normaliser (lse, log2 domain); this kernel
// re-reads the keys of the hi pages of one layer, recomputes the scores and adds
// sum_tokens 2^(s - lse), averaged over the query heads of a KV head, times `weight`, into
// mass[block]. Run on a few sampled layers, its cost is their keys read once more, and no
// per-token score buffer is needed. Lo pages are skipped: they are demoted already.
//
// One CTA per (sequence, KV head); each warp walks whole pages, lanes grouped D/8 per row.
#include <torch/all.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>
#include <cstdint>

#include "kv_vec.cuh"
#include "paged_decode.h"

namespace mikv {
namespace detail {

constexpr int kMassWarps = 4;

template <typename q_t, typename kv_t, int D>
__global__ void __launch_bounds__(kMassWarps * 32)
page_mass_kernel(const q_t* __restrict__ q, int64_t q_stride_tok, int64_t q_stride_head,
                 const kv_t* __restrict__ k_cache, int64_t stride_block, int64_t stride_tok,
                 int64_t stride_head, const int32_t* __restrict__ block_table, int64_t bt_stride,
                 const int32_t* __restrict__ seq_lens, const float* __restrict__ lse,
                 int num_q_heads, int group, int block_size, float q_mult,
                 float* __restrict__ mass, float weight) {
  constexpr int LPT = D / kElems;  // lanes per row
  constexpr int SUBS = 32 / LPT;   // rows per warp step
  using vec_t = typename RowVec<kv_t>::type;
  extern __shared__ float smem[];  // [group][D] scaled query, then [group] lse
  float* qs = smem;
  float* ls = smem + group * D;

  const int seq = blockIdx.x, kvh = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int sub = lane / LPT, sl = lane % LPT;
  const int h0 = kvh * group;
  for (int i = threadIdx.x; i < group * D; i += blockDim.x) {
    const int g = i / D, d = i % D;
    qs[i] = to_float(q[seq * q_stride_tok + (h0 + g) * q_stride_head + d]) * q_mult;
  }
  for (int g = threadIdx.x; g < group; g += blockDim.x) ls[g] = lse[seq * num_q_heads + h0 + g];
  __syncthreads();

  const int seq_len = seq_lens[seq];
  const int pages = (seq_len + block_size - 1) / block_size;
  for (int p = warp; p < pages; p += kMassWarps) {
    const int entry = block_table[seq * bt_stride + p];
    if (entry < 0) continue;
    const int rows = min(block_size, seq_len - p * block_size);
    float acc = 0.f;
    for (int r = sub; r < block_size; r += SUBS) {  // every lane runs the shuffles
      float kf[kElems] = {};
      if (r < rows) {
        const vec_t kv = *reinterpret_cast<const vec_t*>(
            k_cache + entry * stride_block + r * stride_tok + kvh * stride_head + sl * kElems);
        to_float8(kv, kf, static_cast<const kv_t*>(nullptr));
      }
      for (int g = 0; g < group; ++g) {
        const float* qg = qs + g * D + sl * kElems;
        float d = 0.f;
#pragma unroll
        for (int e = 0; e < kElems; ++e) d += qg[e] * kf[e];
#pragma unroll
        for (int o = LPT / 2; o > 0; o /= 2) d += __shfl_xor_sync(0xffffffffu, d, o);
        if (sl == 0 && r < rows && ls[g] != -INFINITY) acc += exp2f(d - ls[g]);
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) atomicAdd(mass + entry, acc * weight / group);
  }
}

template <typename q_t, typename kv_t, int D>
void launch_page_mass(const torch::Tensor& mass, const torch::Tensor& query,
                      const torch::Tensor& key_cache, const torch::Tensor& block_table,
                      const torch::Tensor& seq_lens, const torch::Tensor& lse, int group,
                      float q_mult, float weight, cudaStream_t stream) {
  const int num_seqs = query.size(0), num_kv_heads = key_cache.size(2);
  const size_t smem = (group * D + group) * sizeof(float);
  page_mass_kernel<q_t, kv_t, D><<<dim3(num_seqs, num_kv_heads), kMassWarps * 32, smem, stream>>>(
      static_cast<const q_t*>(query.data_ptr()), query.stride(0), query.stride(1),
      static_cast<const kv_t*>(key_cache.data_ptr()), key_cache.stride(0), key_cache.stride(1),
      key_cache.stride(2), block_table.data_ptr<int32_t>(), block_table.stride(0),
      seq_lens.data_ptr<int32_t>(), lse.data_ptr<float>(), query.size(1), group,
      key_cache.size(1), q_mult, mass.data_ptr<float>(), weight);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename q_t, typename kv_t>
void dispatch_page_mass(int head_dim, const torch::Tensor& mass, const torch::Tensor& query,
                        const torch::Tensor& key_cache, const torch::Tensor& block_table,
                        const torch::Tensor& seq_lens, const torch::Tensor& lse, int group,
                        float q_mult, float weight, cudaStream_t s) {
  switch (head_dim) {
    case 64: return launch_page_mass<q_t, kv_t, 64>(mass, query, key_cache, block_table, seq_lens, lse, group, q_mult, weight, s);
    case 128: return launch_page_mass<q_t, kv_t, 128>(mass, query, key_cache, block_table, seq_lens, lse, group, q_mult, weight, s);
    case 256: return launch_page_mass<q_t, kv_t, 256>(mass, query, key_cache, block_table, seq_lens, lse, group, q_mult, weight, s);
    default: TORCH_CHECK(false, "mikv page_mass: head_dim ", head_dim, " not in {64, 128, 256}");
  }
}

}  // namespace detail

void page_mass(torch::Tensor& mass, const torch::Tensor& query, const torch::Tensor& key_cache,
               const torch::Tensor& block_table, const torch::Tensor& seq_lens,
               const torch::Tensor& lse, double scale, double k_scale, double weight) {
  TORCH_CHECK(mass.is_cuda() && mass.scalar_type() == at::kFloat && mass.is_contiguous() &&
                  mass.numel() >= key_cache.size(0),
              "mass must be a contiguous CUDA fp32 tensor with one entry per cache block");
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1 && key_cache.dim() == 4 &&
                  key_cache.stride(3) == 1 && key_cache.size(3) == query.size(2),
              "query [seqs, q_heads, D] and key_cache [blocks, block, kv_heads, D] with "
              "contiguous last dims");
  TORCH_CHECK(query.size(1) % key_cache.size(2) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
                  block_table.stride(1) == 1 && block_table.size(0) >= query.size(0) &&
                  seq_lens.size(0) >= query.size(0),
              "block_table/seq_lens must be int32 with a row per query");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  lse.numel() >= query.size(0) * query.size(1),
              "lse must be fp32 contiguous [seqs, q_heads] (from paged_decode)");
  if (query.size(0) == 0) return;
  const auto qdt = query.scalar_type(), kdt = key_cache.scalar_type();
  const bool fp8 = kdt == at::kByte || kdt == at::kFloat8_e4m3fn;
  TORCH_CHECK(qdt == at::kBFloat16 || qdt == at::kHalf, "query must be bf16 or fp16");
  TORCH_CHECK(fp8 || kdt == qdt, "cache dtype must equal the query dtype or be fp8-e4m3");
  const int group = query.size(1) / key_cache.size(2);
  // Scores in the log2 units of paged_decode's lse: q . k * scale * log2(e) * k_scale.
  const float q_mult = static_cast<float>(scale * M_LOG2E * k_scale);
  const at::cuda::OptionalCUDAGuard guard(device_of(mass));
  cudaStream_t s = at::cuda::getCurrentCUDAStream();
  const int hd = query.size(2);
  const float w = static_cast<float>(weight);
  if (qdt == at::kBFloat16) {
    if (fp8) detail::dispatch_page_mass<__nv_bfloat16, uint8_t>(hd, mass, query, key_cache, block_table, seq_lens, lse, group, q_mult, w, s);
    else detail::dispatch_page_mass<__nv_bfloat16, __nv_bfloat16>(hd, mass, query, key_cache, block_table, seq_lens, lse, group, q_mult, w, s);
  } else {
    if (fp8) detail::dispatch_page_mass<__half, uint8_t>(hd, mass, query, key_cache, block_table, seq_lens, lse, group, q_mult, w, s);
    else detail::dispatch_page_mass<__half, __half>(hd, mass, query, key_cache, block_table, seq_lens, lse, group, q_mult, w, s);
  }
}

}  // namespace mikv
