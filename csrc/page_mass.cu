// Attention mass of every hi page for the demotion policy, from what the decode kernel left.
//
// paged_decode's hi pass writes, per slab of 1024 / head_dim rows of a hi page, each query
// head's log-sum-exp of the scores (slab_lse, log2 domain), and its reduction each head's final
// normaliser (lse). A page's mass for a head is then sum_slabs 2^(slab_lse - lse): this kernel
// reads a few floats per page and no keys. It adds the mass averaged over the query heads of a
// KV head, times `weight`, into mass[block]. Lo pages are skipped: they are demoted already.
//
// One thread per page, CTAs over (sequence, KV head, chunk of the block table's columns): a
// page's few floats are independent loads, so even one long sequence is a short loop. The grid
// depends on shapes only (CUDA graphs).
#include <torch/all.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "paged_decode.h"

namespace mikv {
namespace detail {

constexpr int kMassThreads = 128;

__global__ void __launch_bounds__(kMassThreads)
page_mass_kernel(const float* __restrict__ slab_lse, const int32_t* __restrict__ block_table,
                 int64_t bt_stride, const int32_t* __restrict__ seq_lens,
                 const float* __restrict__ lse, int num_q_heads, int group, int block_size,
                 int slab_rows, float* __restrict__ mass, float weight) {
  const int seq = blockIdx.x, kvh = blockIdx.y;
  const int h0 = kvh * group;
  const int slabs_per_block = block_size / slab_rows;
  const int seq_len = seq_lens[seq];
  const int pages = (seq_len + block_size - 1) / block_size;
  const float* total = lse + static_cast<int64_t>(seq) * num_q_heads + h0;
  for (int p = blockIdx.z * kMassThreads + threadIdx.x; p < pages; p += gridDim.z * kMassThreads) {
    const int entry = block_table[seq * bt_stride + p];
    if (entry < 0) continue;
    const int rows = min(block_size, seq_len - p * block_size);
    const int slabs = (rows + slab_rows - 1) / slab_rows;  // the slabs the decode kernel wrote
    const float* part = slab_lse + static_cast<int64_t>(entry) * slabs_per_block * num_q_heads + h0;
    float acc = 0.f;
    for (int slab = 0; slab < slabs; ++slab) {
      for (int g = 0; g < group; ++g) {
        const float t = total[g], x = part[slab * num_q_heads + g];
        // A slab's share is at most 1 (fp32 rounding can put it above); empty heads give
        // nothing; a NaN stays NaN (an unwritten slab must not pass for a real one).
        if (t != -INFINITY && x != -INFINITY) acc += x - t > 0.f ? 1.f : exp2f(x - t);
      }
    }
    atomicAdd(mass + entry, acc * weight / group);
  }
}

}  // namespace detail

void page_mass(torch::Tensor& mass, const torch::Tensor& slab_lse, const torch::Tensor& block_table,
               const torch::Tensor& seq_lens, const torch::Tensor& lse, int64_t block_size,
               int64_t num_kv_heads, double weight) {
  TORCH_CHECK(slab_lse.is_cuda() && slab_lse.scalar_type() == at::kFloat && slab_lse.dim() == 3 &&
                  slab_lse.is_contiguous(),
              "slab_lse must be the contiguous CUDA fp32 [num_blocks, slabs, q_heads] tensor "
              "paged_decode wrote");
  TORCH_CHECK(mass.is_cuda() && mass.scalar_type() == at::kFloat && mass.is_contiguous() &&
                  mass.numel() >= slab_lse.size(0),
              "mass must be a contiguous CUDA fp32 tensor with one entry per cache block");
  TORCH_CHECK(lse.is_cuda() && lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  lse.dim() == 2 && lse.size(1) == slab_lse.size(2),
              "lse must be fp32 contiguous [seqs, q_heads] (from paged_decode)");
  const int64_t num_seqs = lse.size(0), num_q_heads = lse.size(1);
  TORCH_CHECK(num_kv_heads >= 1 && num_q_heads % num_kv_heads == 0,
              "query heads must be a multiple of KV heads");
  TORCH_CHECK(slab_lse.size(1) >= 1 && block_size >= 1 && block_size % slab_lse.size(1) == 0,
              "block_size must be a multiple of slab_lse's slabs per block");
  TORCH_CHECK(block_table.is_cuda() && seq_lens.is_cuda() &&
                  block_table.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
                  block_table.stride(1) == 1 && block_table.size(0) >= num_seqs &&
                  seq_lens.size(0) >= num_seqs,
              "block_table/seq_lens must be int32 with a row per lse row");
  if (num_seqs == 0) return;
  const at::cuda::OptionalCUDAGuard guard(device_of(mass));
  const int group = static_cast<int>(num_q_heads / num_kv_heads);
  const int64_t chunks = std::min<int64_t>(
      64, std::max<int64_t>(1, (block_table.size(1) + detail::kMassThreads - 1) / detail::kMassThreads));
  detail::page_mass_kernel<<<dim3(num_seqs, num_kv_heads, chunks), detail::kMassThreads, 0,
                             at::cuda::getCurrentCUDAStream()>>>(
      slab_lse.data_ptr<float>(), block_table.data_ptr<int32_t>(), block_table.stride(0),
      seq_lens.data_ptr<int32_t>(), lse.data_ptr<float>(), static_cast<int>(num_q_heads), group,
      static_cast<int>(block_size), static_cast<int>(block_size / slab_lse.size(1)),
      mass.data_ptr<float>(), static_cast<float>(weight));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mikv
