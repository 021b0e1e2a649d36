// Demote pages to lo slots in place: the CUDA twin of mikv_vllm/quant.py:quantize_page.
//
// One CTA per (page, KV head). It stages the head's K rows of the page in shared memory as
// fp32 (a hi page's values, or a lo page's dequantized ones where a middle-tier page moves on
// to the 2-bit tier), writes one (scale, zero) pair per channel and the packed codes (in the
// decode kernel's fragment order), then does the same for V with one pair per (token, channel
// group). The scale is rounded to fp16 before the zero point and the codes are computed, with
// IEEE division and round-half-even, so the bytes match the torch reference (up to fp32 ties).
// With exact key outliers, the keys' channels are first stripped of the page's outliers one at
// a time (pick_outliers), their grids span what remains, and each outlier stores its fp16
// correction in order of position.
#include <torch/all.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "paged_decode.h"

namespace mikv {
namespace detail {

constexpr int kQuantThreads = 128;
constexpr int kMaxTileFloats = 8192;  // block_size * head_dim staged per pass (32 KB)

__device__ __forceinline__ float load_float(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float load_float(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_float(const uint8_t* p) {
  __half_raw h = __nv_cvt_fp8_to_halfraw(*p, __NV_E4M3);
  return __half2float(*reinterpret_cast<const __half*>(&h));
}

// Scale (fp16) and zero point (int8 steps) of a group spanning [lo, hi]: x ~ (code - zero) *
// scale, with the reference's IEEE operations in its order (mikv_vllm/quant.py).
struct GroupParams {
  __half scale;
  int zero;
};

__device__ __forceinline__ GroupParams group_params(float lo, float hi, int levels) {
  // Floor at fp16's smallest normal so a constant group never divides by zero.
  float scale = fmaxf(__fdiv_rn(hi - lo, static_cast<float>(levels)), 6.103515625e-05f);
  // The zero point must stay within int8 (with room for the scale's fp16 rounding).
  scale = fmaxf(fmaxf(scale, __fdiv_rn(fmaxf(-lo, 0.f), 126.f)), __fdiv_rn(fmaxf(lo, 0.f), 127.f));
  const __half s = __float2half_rn(scale);
  const float zero = fminf(fmaxf(rintf(__fdiv_rn(-lo, __half2float(s))), -128.f), 127.f);
  return {s, static_cast<int>(zero)};
}

__device__ __forceinline__ uint32_t quant_code(float x, GroupParams p, int levels) {
  const float s = __half2float(p.scale);
  const float c = rintf(__fdiv_rn(__fadd_rn(x, __fmul_rn(static_cast<float>(p.zero), s)), s));
  return static_cast<uint32_t>(fminf(fmaxf(c, 0.f), static_cast<float>(levels)));
}

// Writes codes[t * D + d] (one byte each in shared memory) of one KV head in the lo format's
// fragment order (mikv_vllm/quant.py): per 16-token tile, lane L's run of W = D * bits / 64
// words; slot i of word w (bits i * bits of each half: first elements low, second high) holds
// pair (chunk q / 2, r = 2 (q % 2) + w % 2) with q = i * W / 2 + w / 2 (quant.pair_slot's
// inverse).
__device__ void pack_fragment_codes(const uint8_t* codes, uint32_t* dst, int rows, int D,
                                    int bits, bool keys) {
  const int per_word = 16 / bits;
  const int lane_words = D * bits / 64;
  const int words = rows * D * bits / 32;
  for (int wi = threadIdx.x; wi < words; wi += blockDim.x) {
    const int run = wi / lane_words, w = wi % lane_words;
    const int tile = run / 32, lane = run % 32, g = lane / 4, j = lane % 4;
    uint32_t word = 0;
    for (int i = 0; i < per_word; ++i) {
      const int q = i * (lane_words / 2) + w / 2, chunk = q / 2, r = 2 * (q % 2) + w % 2;
      for (int e = 0; e < 2; ++e) {
        int t, d;
        if (keys) {
          t = 16 * tile + g + 8 * (r & 1);
          d = 16 * chunk + 2 * j + 8 * (r >> 1) + e;
        } else {
          d = 16 * chunk + g + 8 * (r & 1);
          t = 16 * tile + 2 * j + 8 * (r >> 1) + e;
        }
        word |= static_cast<uint32_t>(codes[t * D + d]) << (16 * e + i * bits);
      }
    }
    dst[wi] = word;
  }
}

// Code of element (t, d) of one head's K (`keys`) or V section in fragment order: the inverse
// of pack_fragment_codes.
__device__ __forceinline__ int fragment_code(const uint32_t* words, int t, int d, int D, int bits,
                                             bool keys) {
  const int tt = t % 16, dd = d % 16, tile = t / 16, chunk = d / 16;
  // keys: rows g + 8 (r & 1), channels 2j + 8 (r >> 1) + e; values: the two swapped
  const int x = keys ? tt : dd, y = keys ? dd : tt;
  const int g = x % 8, r = 2 * (y / 8) + x / 8, j = y % 8 / 2, e = y % 2;
  const int half_words = D * bits / 128;
  const int q = 2 * chunk + (r >> 1);
  const int i = q / half_words, w = 2 * (q % half_words) + (r & 1);
  const uint32_t word = words[(tile * 32 + 4 * g + j) * (2 * half_words) + w];
  return static_cast<int>((word >> (16 * e + i * bits)) & ((1u << bits) - 1u));
}

// Index of a group's scale or zero point within a head's runs ([runs, 2 (+0 | +8), 2 (e)], in
// elements) for position `x` (channel or token) of a 16-wide tile; `run` counts the runs:
// [j][chunk] for keys, [tile][group][j] for values (mikv_vllm/quant.py).
__device__ __forceinline__ int param_index(int run, int x) {
  const int r = x % 16;
  return (run * 2 + r / 8) * 2 + r % 2;
}

// The first byte of lo code `code`'s slot (its tier's layout: `mid` where flagged kMidTier).
__device__ __forceinline__ const uint8_t* lo_slot(int code, const LoLayout& lo,
                                                  const LoLayout& mid, const LoLayout** tier) {
  *tier = (code & kMidTier) ? &mid : &lo;
  code &= ~kMidTier;
  return (*tier)->base + static_cast<int64_t>(code / (*tier)->pack_factor) * (*tier)->block_bytes +
         static_cast<int64_t>(code % (*tier)->pack_factor) * (*tier)->page_bytes;
}

// Stages head h of a source page into `tile` [block_size][D] as fp32: a hi block's K or V
// (times the cache's fp8 scale), or a lo page's values (code - zero) * scale.
template <typename kv_t>
__device__ void stage_source(float* tile, bool keys, const kv_t* __restrict__ cache,
                             int64_t src, const uint8_t* src_page, const LoLayout* st,
                             int64_t stride_block, int64_t stride_tok, int64_t stride_head,
                             int block_size, int h, int D, float scale) {
  const int n = block_size * D;
  if (src_page == nullptr) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const int t = i / D, d = i % D;
      tile[i] = load_float(cache + src * stride_block + t * stride_tok + h * stride_head + d) * scale;
    }
    return;
  }
  const int64_t section = static_cast<int64_t>(block_size) * D * st->bits / 8;
  const uint32_t* words = reinterpret_cast<const uint32_t*>(
      src_page + (keys ? 0 : st->v_codes) + static_cast<int64_t>(h) * section);
  const __half* scales = reinterpret_cast<const __half*>(src_page + (keys ? st->k_scales : st->v_scales));
  const int8_t* zeros = reinterpret_cast<const int8_t*>(src_page + (keys ? st->k_zeros : st->v_zeros));
  const int groups = D / st->group;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int t = i / D, d = i % D;
    const int slot = keys ? h * D + param_index((d % 16 % 8 / 2) * (D / 16) + d / 16, d)
                          : h * block_size * groups +
                                param_index(((t / 16) * groups + d / st->group) * 4 + t % 16 % 8 / 2, t);
    const int c = fragment_code(words, t, d, D, st->bits, keys);
    tile[i] = __fmul_rn(static_cast<float>(c - zeros[slot]), __half2float(scales[slot]));
  }
  if (keys && st->outlier_slots > 0) {  // the source's exact keys: their corrections
    __syncthreads();
    const uint32_t* fixes = reinterpret_cast<const uint32_t*>(src_page + st->k_outliers) +
                            h * st->outlier_slots;
    if (threadIdx.x == 0)
      for (int r = 0; r < st->outlier_slots; ++r) {
        const uint32_t w = fixes[r];
        const __half_raw fix{static_cast<unsigned short>(w >> 16)};
        tile[w & 0xFFFFu] += __half2float(__half(fix));
      }
  }
}

// ---- exact key outliers (mikv_vllm/quant.py select_outliers, quantize_with_outliers) ----------
constexpr int kMaxDim = 256;

// What taking channel d's maximum or minimum out of its grid (skipping `keep`) saves in squared
// range, and which token that is: the reference's fp32 operations, unfused, with its ties (the
// first token of an extreme).
__device__ void outlier_gain(const float* tile, const uint8_t* keep, int block_size, int D, int d,
                             float* gain, int16_t* at) {
  float t0 = -INFINITY, t1 = -INFINITY, b0 = INFINITY, b1 = INFINITY;
  int i_hi = 0, i_lo = 0;
  for (int t = 0; t < block_size; ++t) {
    if (keep[t * D + d]) continue;
    const float x = tile[t * D + d];
    if (x > t0) { t1 = t0; t0 = x; i_hi = t; } else if (x > t1) { t1 = x; }
    if (x < b0) { b1 = b0; b0 = x; i_lo = t; } else if (x < b1) { b1 = x; }
  }
  const float span = __fsub_rn(t0, b0), span_hi = __fsub_rn(t1, b0), span_lo = __fsub_rn(t0, b1);
  const float whole = __fmul_rn(span, span);
  const float gain_hi = __fsub_rn(whole, __fmul_rn(span_hi, span_hi));
  const float gain_lo = __fsub_rn(whole, __fmul_rn(span_lo, span_lo));
  const bool use_hi = gain_hi >= gain_lo;
  gain[d] = use_hi ? gain_hi : gain_lo;
  at[d] = static_cast<int16_t>(use_hi ? i_hi : i_lo);
}

// (gain, channel) a beats b: more gain, or as much at a lower channel (argmax's first).
__device__ __forceinline__ bool beats(float ga, int ca, float gb, int cb) {
  return ga > gb || (ga == gb && ca < cb);
}

// Picks `slots` keys of one head's staged K tile, one at a time (the greedy of
// quant.select_outliers): flags them in `keep` and lists their positions t * D + c in `picks`.
__device__ void pick_outliers(const float* tile, uint8_t* keep, int block_size, int D, int slots,
                              uint16_t* picks) {
  __shared__ float gain[kMaxDim];
  __shared__ int16_t at[kMaxDim];
  __shared__ float warp_gain[kQuantThreads / 32];
  __shared__ int warp_ch[kQuantThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int i = threadIdx.x; i < block_size * D; i += blockDim.x) keep[i] = 0;
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += blockDim.x) outlier_gain(tile, keep, block_size, D, d, gain, at);
  __syncthreads();
  for (int r = 0; r < slots; ++r) {
    float g = -INFINITY;
    int ch = D;
    for (int d = threadIdx.x; d < D; d += blockDim.x)
      if (ch == D || gain[d] > g) { g = gain[d]; ch = d; }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) {
      const float go = __shfl_xor_sync(0xffffffffu, g, o);
      const int co = __shfl_xor_sync(0xffffffffu, ch, o);
      if (co < D && (ch == D || beats(go, co, g, ch))) { g = go; ch = co; }
    }
    if (lane == 0) { warp_gain[warp] = g; warp_ch[warp] = ch; }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 1; w < kQuantThreads / 32; ++w)
        if (warp_ch[w] < D && (ch == D || beats(warp_gain[w], warp_ch[w], g, ch))) {
          g = warp_gain[w];
          ch = warp_ch[w];
        }
      const int pos = at[ch] * D + ch;
      keep[pos] = 1;
      picks[r] = static_cast<uint16_t>(pos);
      outlier_gain(tile, keep, block_size, D, ch, gain, at);
    }
    __syncthreads();
  }
}

template <typename kv_t>
__global__ void __launch_bounds__(kQuantThreads)
quantize_pages_kernel(const kv_t* __restrict__ k_cache, const kv_t* __restrict__ v_cache,
                      int64_t stride_block, int64_t stride_tok, int64_t stride_head,
                      const int32_t* __restrict__ src_entries, const int32_t* __restrict__ dst_codes,
                      const LoLayout lo_tier, const LoLayout mid_tier, int block_size,
                      int num_kv_heads, int D, float k_scale, float v_scale) {
  extern __shared__ float tile[];                        // [block_size][D] fp32
  uint8_t* codes = reinterpret_cast<uint8_t*>(tile + block_size * D);  // [block_size][D]
  const int page = blockIdx.x, h = blockIdx.y;
  const int64_t src = src_entries[page];
  const LoLayout* st = nullptr;  // a lo source's tier
  const uint8_t* src_page = src < 0 ? lo_slot(static_cast<int>(-src - 1), lo_tier, mid_tier, &st)
                                    : nullptr;
  const LoLayout* dt = nullptr;
  uint8_t* dst = const_cast<uint8_t*>(lo_slot(dst_codes[page], lo_tier, mid_tier, &dt));
  const LoLayout& lo = *dt;
  const int levels = (1 << lo.bits) - 1;
  const int64_t section = static_cast<int64_t>(block_size) * D * lo.bits / 8;  // one head's codes

  // Keys: one (scale, zero) per channel over the page's tokens; with exact outliers, over the
  // tokens not picked (`codes` holds the picks' flags until a channel's codes replace them).
  stage_source(tile, true, k_cache, src, src_page, st, stride_block, stride_tok, stride_head,
               block_size, h, D, k_scale);
  __syncthreads();
  __shared__ uint16_t picks[kMaxOutlierSlots];
  __shared__ float k_step[kMaxDim];  // each channel's scale and zero point, for the corrections
  __shared__ int k_zero[kMaxDim];
  const int slots = lo.outlier_slots;
  if (slots > 0) pick_outliers(tile, codes, block_size, D, slots, picks);
  __half* k_scales = reinterpret_cast<__half*>(dst + lo.k_scales) + h * D;
  int8_t* k_zeros = reinterpret_cast<int8_t*>(dst + lo.k_zeros) + h * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float mn = INFINITY, mx = -INFINITY;
    for (int t = 0; t < block_size; ++t) {
      if (slots > 0 && codes[t * D + d]) continue;
      mn = fminf(mn, tile[t * D + d]);
      mx = fmaxf(mx, tile[t * D + d]);
    }
    const GroupParams p = group_params(mn, mx, levels);
    k_step[d] = __half2float(p.scale);
    k_zero[d] = p.zero;
    const int slot = param_index((d % 16 % 8 / 2) * (D / 16) + d / 16, d);  // run [j][chunk]
    k_scales[slot] = p.scale;
    k_zeros[slot] = static_cast<int8_t>(p.zero);
    for (int t = 0; t < block_size; ++t) codes[t * D + d] = quant_code(tile[t * D + d], p, levels);
  }
  __syncthreads();
  // Each pick's fp16 correction from its grid point, written in order of position.
  uint32_t* fixes = reinterpret_cast<uint32_t*>(dst + lo.k_outliers) + h * slots;
  for (int r = threadIdx.x; r < slots; r += blockDim.x) {
    const int pos = picks[r], d = pos % D;
    const float grid = __fmul_rn(static_cast<float>(static_cast<int>(codes[pos]) - k_zero[d]),
                                 k_step[d]);
    const __half_raw fix = __float2half_rn(__fsub_rn(tile[pos], grid));
    int rank = 0;
    for (int i = 0; i < slots; ++i) rank += picks[i] < pos;
    fixes[rank] = static_cast<uint32_t>(pos) | (static_cast<uint32_t>(fix.x) << 16);
  }
  pack_fragment_codes(codes, reinterpret_cast<uint32_t*>(dst + static_cast<int64_t>(h) * section),
                      block_size, D, lo.bits, true);
  __syncthreads();

  // Values: one (scale, zero) per (token, group of `lo.group` channels).
  stage_source(tile, false, v_cache, src, src_page, st, stride_block, stride_tok, stride_head,
               block_size, h, D, v_scale);
  __syncthreads();
  const int groups = D / lo.group;
  __half* v_scales = reinterpret_cast<__half*>(dst + lo.v_scales) + h * block_size * groups;
  int8_t* v_zeros = reinterpret_cast<int8_t*>(dst + lo.v_zeros) + h * block_size * groups;
  for (int i = threadIdx.x; i < block_size * groups; i += blockDim.x) {
    const float* x = tile + (i / groups) * D + (i % groups) * lo.group;
    uint8_t* c = codes + (i / groups) * D + (i % groups) * lo.group;
    float mn = x[0], mx = x[0];
    for (int j = 1; j < lo.group; ++j) {
      mn = fminf(mn, x[j]);
      mx = fmaxf(mx, x[j]);
    }
    const GroupParams p = group_params(mn, mx, levels);
    const int t = i / groups;
    const int slot = param_index(((t / 16) * groups + i % groups) * 4 + t % 16 % 8 / 2, t);
    v_scales[slot] = p.scale;
    v_zeros[slot] = static_cast<int8_t>(p.zero);
    for (int j = 0; j < lo.group; ++j) c[j] = quant_code(x[j], p, levels);
  }
  __syncthreads();
  pack_fragment_codes(codes, reinterpret_cast<uint32_t*>(dst + lo.v_codes + static_cast<int64_t>(h) * section),
                      block_size, D, lo.bits, false);
}

}  // namespace detail

void quantize_pages(const torch::Tensor& key_cache, const torch::Tensor& value_cache,
                    const torch::Tensor& src_entries, const torch::Tensor& dst_codes,
                    double k_scale, double v_scale, int64_t lo_pack_factor, int64_t lo_bits,
                    int64_t lo_group, int64_t mid_pack_factor, int64_t mid_bits,
                    int64_t outlier_slots) {
  TORCH_CHECK(key_cache.is_cuda() && key_cache.dim() == 4, "caches must be CUDA [blocks, block, heads, D]");
  TORCH_CHECK(key_cache.strides() == value_cache.strides() && key_cache.sizes() == value_cache.sizes(),
              "key and value caches must share shape and strides");
  TORCH_CHECK(src_entries.scalar_type() == at::kInt && dst_codes.scalar_type() == at::kInt &&
                  src_entries.numel() == dst_codes.numel(),
              "src_entries and dst_codes must be int32 of equal length");
  const int block_size = key_cache.size(1), heads = key_cache.size(2), D = key_cache.size(3);
  TORCH_CHECK(D <= detail::kMaxDim && valid_outlier_slots(outlier_slots),
              "quantize_pages: head_dim must be <= ", detail::kMaxDim, " and outlier_slots a "
              "multiple of 16 in [0, ", kMaxOutlierSlots, "]");
  TORCH_CHECK(block_size * D <= detail::kMaxTileFloats, "block_size * head_dim must be <= ",
              detail::kMaxTileFloats);
  const int64_t pages = src_entries.numel();
  if (pages == 0) return;
  DecodeArgs shape;  // reuse the decode launch's lo-layout arithmetic
  shape.num_kv_heads = heads;
  shape.block_size = block_size;
  shape.head_dim = D;
  LoLayout lo = make_lo_layout(shape, key_cache, lo_pack_factor, lo_bits, lo_group,
                               outlier_slots);
  LoLayout mid = make_mid_layout(shape, key_cache, lo_pack_factor, lo_bits, lo_group,
                                 mid_pack_factor, mid_bits, outlier_slots);

  const at::cuda::OptionalCUDAGuard guard(device_of(key_cache));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const size_t smem = block_size * D * (sizeof(float) + 1);
  dim3 grid(pages, heads);
  const auto kdt = key_cache.scalar_type();
#define MIKV_LAUNCH_QUANT(T)                                                                     \
  detail::quantize_pages_kernel<T><<<grid, detail::kQuantThreads, smem, stream>>>(               \
      static_cast<const T*>(key_cache.data_ptr()), static_cast<const T*>(value_cache.data_ptr()), \
      key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),                             \
      src_entries.data_ptr<int32_t>(), dst_codes.data_ptr<int32_t>(), lo, mid, block_size,     \
      heads, D, static_cast<float>(k_scale), static_cast<float>(v_scale))
  if (kdt == at::kBFloat16) MIKV_LAUNCH_QUANT(__nv_bfloat16);
  else if (kdt == at::kHalf) MIKV_LAUNCH_QUANT(__half);
  else if (kdt == at::kByte || kdt == at::kFloat8_e4m3fn) MIKV_LAUNCH_QUANT(uint8_t);
  else TORCH_CHECK(false, "cache dtype must be bf16, fp16 or fp8-e4m3");
#undef MIKV_LAUNCH_QUANT
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mikv
