// Paged decode attention over a request's mixed pages, split-K: hi pages (bf16/fp16 or
// fp8-e4m3) and lo pages (2/4-bit codes, fp16 scales, int8 zeros, mikv_vllm/quant.py's format,
// named by negative block-table entries), in one pass.
//
// One CTA owns (sequence, KV head, chunk of up to MAX_G query heads of that KV head, split):
// every K/V row of the KV head is read once for all its query heads (GQA), in two passes over
// the split's pages, each with its own online softmax (fp32, base 2: log2(e) is folded into the
// scale), merged at the end:
// - hi pass: lanes grouped D/8 per token row (8 elements, a 16-byte load for bf16), kUnroll
//   rows in flight per group; a warp's slab of rows lies in one page, so lo pages are skipped
//   per slab.
// - lo pass (lo_pass below): a warp takes whole lo pages, two 16-token tiles at a time, on
//   tensor cores (mma.m16n8k16, fp16 in, fp32 accumulate): S^T = K Q^T with the tile's tokens
//   as M and up to 8 query heads as N, then O^T += V^T P^T. The lo format stores every lane's
//   codes, scales and zero points in fragment order (mikv_vllm/quant.py); each warp stages its
//   next pair of tiles into shared memory with cp.async while it computes the current one, and
//   a lane turns 2 codes into an fp16x2 operand of code - zero with a mask-or and an fma;
//   the scales multiply the other operand (Q per key channel, P per value token), once per
//   16-channel chunk or value group.
//   Pages that keep exact keys add their corrections to S^T with one more mma per 16 of them
//   (fix_pair / query_pair).
// With several splits the CTAs write unnormalised partials and decode_reduce_kernel combines
// them; it also leaves each head's log-sum-exp when asked, and the hi pass each slab's (the
// importance signal, csrc/page_mass.cu). Given another part's log-sum-exps (merge_lse), the
// last write merges this part into the attention `out` already holds (split decode's hi part).
#include <torch/all.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "graph_gate.h"
#include "kv_vec.cuh"
#include "paged_decode.h"

namespace mikv {
// Not an anonymous namespace: nvcc 13's launch stubs break on internal-linkage templates.
namespace detail {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kUnroll = 4;  // rows per lane group in flight

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_float(float x) { return __float2half(x); }

// exp2 of (a - b) that is 0 when a is -inf (an empty partial), never NaN.
__device__ __forceinline__ float exp2_diff(float a, float b) {
  return a == -INFINITY ? 0.f : exp2f(a - b);
}

// Split decode's merge, in the kernel's last write: `hi_o` and its natural-log lse `hi_lse`
// (FlashAttention's, +-inf for a row without hi keys) are the attention over the row's hi
// pages, `lo_o` and its log2 lse `lo_lse2` over its lo pages; softmax weights combine them.
__device__ __forceinline__ float merge_parts(float hi_o, float hi_lse, float lo_o, float lo_lse2) {
  if (isinf(hi_lse)) return lo_o;
  const float hi2 = hi_lse * 1.4426950408889634f;
  const float mx = fmaxf(hi2, lo_lse2);
  const float wh = exp2f(hi2 - mx), wl = exp2f(lo_lse2 - mx);
  return (wh * hi_o + wl * lo_o) / (wh + wl);
}

// The last write of one output element: this part's `o` (softmax sum `sum`, log2 lse `lse2`),
// or, given split decode's merge_lse, `o` merged into what `out` holds at `o_ptr` (a row without
// pages here, sum 0, keeps it).
template <typename q_t>
__device__ __forceinline__ void store_output(q_t* o_ptr, float o, float sum, float lse2,
                                             const float* merge_lse, int64_t merge_at) {
  if (merge_lse == nullptr) {
    *o_ptr = from_float<q_t>(o);
  } else if (sum > 0.f) {
    *o_ptr = from_float<q_t>(merge_parts(to_float(*o_ptr), merge_lse[merge_at], o, lse2));
  }
}

// ---- lo pass: tensor cores over 2/4-bit pages ----------------------------------------------

__device__ __forceinline__ uint32_t h2_bits(__half2 x) { return *reinterpret_cast<uint32_t*>(&x); }
__device__ __forceinline__ __half2 bits_h2(uint32_t x) { return *reinterpret_cast<__half2*>(&x); }

// (x & mask) | bits in one instruction: written as lop3 so that the compiler cannot split it
// into an and and an or with two immediates (it did, one extra instruction per code pair).
__device__ __forceinline__ uint32_t and_or(uint32_t x, uint32_t mask, uint32_t bits) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(x), "r"(mask), "r"(bits));
  return d;
}

// Two int8 zero points (bytes 2 * half and 2 * half + 1 of `zeros`), biased to unsigned bytes
// (z + 128) and permuted into the low mantissa byte of fp16 1024: fp16x2 of 1152 + z, exact,
// without integer-to-float conversions.
__device__ __forceinline__ uint32_t zero_pair_bits(uint32_t zeros, int half) {
  return __byte_perm(zeros ^ 0x80808080u, 0x64646464u, half ? 0x4342u : 0x4140u);
}

// The A operand (4 fp16x2 registers) of 16-channel chunk (keys) or m-tile (values) `c` from a
// lane's code words `w` (and the same words shifted down a byte, `w8`): the whole numbers
// code - zero, exact in fp16. quant.pair_slot puts register r's pair in slot i of a word; its
// codes are masked in place into the mantissa of fp16 1024 (f = 1024 + code * 2^p, p = i * BITS,
// or p - 8 from `w8` where the code lies above the mantissa), and one fma with 2^-p and
// -(1024 * 2^-p + zero) leaves code - zero. Registers 0, 1 take the zero points `zb0`, 2, 3
// `zb1` (zero_pair_bits). The scales go into the B operand instead (keys: per channel, into Q;
// values: per token, into P), where one multiply serves a whole chunk or group.
template <int BITS, int LW>
__device__ __forceinline__ void a_fragment(const uint32_t (&w)[LW], const uint32_t (&w8)[LW],
                                           int c, uint32_t zb0, uint32_t zb1, uint32_t (&a)[4]) {
  constexpr int kHalfWords = LW / 2;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int q = 2 * c + (r >> 1);
    const int word = (r & 1) + 2 * (q % kHalfWords);
    const int p = (q / kHalfWords) * BITS;
    const bool above = p + BITS > 10;  // not inside the 10 mantissa bits: take it from w8
    const int pe = above ? p - 8 : p;
    const uint32_t mask = (((1u << BITS) - 1u) << pe) * 0x00010001u;
    const uint32_t f = and_or(above ? w8[word] : w[word], mask, 0x64006400u);
    const float step = 1.f / static_cast<float>(1 << pe);
    // 1152 - 1024 * 2^-p - (1152 + z) = -(1024 * 2^-p + z), exact.
    const __half2 nz = __hsub2(__float2half2_rn(1152.f - 1024.f * step), bits_h2(r < 2 ? zb0 : zb1));
    a[r] = h2_bits(__hfma2(bits_h2(f), __float2half2_rn(step), nz));
  }
}

// A lane's code words shifted down a byte, for the pairs whose codes lie above fp16's 10
// mantissa bits (a_fragment).
template <int LW>
__device__ __forceinline__ void shifted_words(const uint32_t (&w)[LW], uint32_t (&w8)[LW]) {
#pragma unroll
  for (int i = 0; i < LW; ++i) w8[i] = w[i] >> 8;
}

// Exact key outliers (mikv_vllm/quant.py): a page's words (position t * D + c, fp16 correction
// above it) enter S^T as one more product E Wq per 16 of them, E[token][slot] the slot's
// correction at its token, Wq[slot][head] the head's (scaled) query at its channel. For the A
// operand: the corrections of a slot pair (words w.x, w.y) whose keys sit at token `row`.
template <int D>
__device__ __forceinline__ uint32_t fix_pair(uint2 w, int row) {
  const uint32_t lo = (w.x & 0xFFFFu) / D == static_cast<uint32_t>(row) ? w.x >> 16 : 0u;
  const uint32_t hi = (w.y & 0xFFFFu) / D == static_cast<uint32_t>(row) ? w.y & 0xFFFF0000u : 0u;
  return lo | hi;
}
// Row stride (halves) of the kernel's fp16 copy of the query heads: 2 more than D puts the 8
// heads' copies of a channel in 8 different banks (a B operand reads one channel per head).
template <int D> constexpr int kQRow = D + 2;
// For the B operand: one head's query (`q_row`, fp16, scaled) at the channels of a slot pair.
template <int D>
__device__ __forceinline__ uint32_t query_pair(const __half* q_row, uint2 w) {
  return h2_bits(__halves2half2(q_row[(w.x & 0xFFFFu) % D], q_row[(w.y & 0xFFFFu) % D]));
}

// A B-operand register times a pair of fp16 scales.
__device__ __forceinline__ uint32_t scaled(uint32_t b, uint32_t scales) {
  return h2_bits(__hmul2(bits_h2(b), bits_h2(scales)));
}

// ---- lo-tile staging: cp.async into a per-warp shared-memory ring ---------------------------
// A ring of kLoStages tiles per warp keeps several tiles' bytes in flight without spending
// registers on them. Measured on an H200 it saved only 5-13% over one tile's loads in flight:
// the lo pass is bound by its instructions per tile, not by its loads
// (benchmarks/results/2026-12-02-h200-staging-and-split-decode/).
constexpr int kLoPair = 2;    // tiles a warp computes per iteration (their chains overlap)
constexpr int kLoStages = 4;  // ring slots: one pair computed while the next is in flight
// Row stride (halves) of the per-warp P^T transpose buffer: 24 keeps both its fp16 stores
// (rows 2j, columns g) and its fp16x2 loads (rows g, columns 2j) free of bank conflicts; 16
// made the stores 2-way (ncu).
constexpr int kPStride = 24;

// Bytes of one staged (KV head, 16-token tile): K and V codes, then the page's K scales and
// zeros of this head, then the tile's V scales and zeros (sized for the smallest group, 16);
// then, where pages keep exact keys, the page's outlier words of this head (4 B a slot).
template <int D, int BITS> constexpr int lo_tile_bytes() { return D * (4 * BITS + 6); }
// One warp's ring of staged tiles.
template <int D, int BITS>
__host__ __device__ __forceinline__ int lo_ring_bytes(int outlier_slots) {
  return kLoStages * (lo_tile_bytes<D, BITS>() + 4 * outlier_slots);
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
template <int LW>
__device__ __forceinline__ void load_words(const uint8_t* p, uint32_t (&w)[LW]) {
  if constexpr (LW == 2) {
    const uint2 x = *reinterpret_cast<const uint2*>(p);
    w[0] = x.x;
    w[1] = x.y;
  } else {
#pragma unroll
    for (int i = 0; i < LW / 4; ++i) {
      const uint4 x = reinterpret_cast<const uint4*>(p)[i];
      w[4 * i] = x.x;
      w[4 * i + 1] = x.y;
      w[4 * i + 2] = x.z;
      w[4 * i + 3] = x.w;
    }
  }
}

// The pages of one split of a sequence: split s of S takes pages s, s + S, s + 2S, ...,
// computed from the sequence's own length so that the grid depends on the batch shape only
// (CUDA-graph replays see new lengths). Dealt rather than cut into S ranges because hi pages
// cluster (the sink, the recent window): ranges left the last split most of them, and its CTAs
// set the kernel's time (H200, 32K context, batch 16, GQA 4, 10% hi: 371 us, 1.6x all lo's time
// for 1.4x its bytes; dealt: 279 us). Dealing chunks of 4 or 16 pages instead timed the same.
struct SplitPages {
  int splits, split;
  int count;  // pages of this split

  __device__ __forceinline__ SplitPages(int num_pages, int num_splits, int s)
      : splits(num_splits), split(s), count(s < num_pages ? (num_pages - 1 - s) / num_splits + 1 : 0) {}
  // The sequence page of the split's page i.
  __device__ __forceinline__ int page(int i) const { return i * splits + split; }
};

// Walks one warp's lo tiles of one tier in order: the warp's pages are the split's pages
// warp + kWarps * i; a window of 32 of them is read with one load per lane and a ballot, so the
// table costs one load per 32 pages and hi pages (and the other tier's) cost nothing.
struct LoCursor {
  SplitPages pages;
  int base;        // first split page of the current window
  int entry;       // this lane's table entry in the window
  uint32_t todo;   // window lanes whose page is of this tier and not yet started
  int code, page, tile;  // the current lo page, a sequence page (page < 0: none)
  int32_t tier_flag;  // the tier walked: codes whose kMidTier flag equals this

  __device__ __forceinline__ void load_window(const int32_t* __restrict__ bt, int lane) {
    const int p = base + lane * kWarps;
    entry = p < pages.count ? bt[pages.page(p)] : 0;
    todo = __ballot_sync(0xffffffffu, entry < 0 && ((-entry - 1) & kMidTier) == tier_flag);
  }
  // Moves to the next lo tile (code, page, tile); false when the warp's share is done.
  __device__ __forceinline__ bool next(const int32_t* __restrict__ bt, int t_end, int block_size,
                                       int lane) {
    if (page >= 0 && ++tile * 16 < block_size && page * block_size + tile * 16 < t_end) return true;
    while (todo == 0) {
      base += 32 * kWarps;
      if (base >= pages.count) { page = -1; return false; }
      load_window(bt, lane);
    }
    const int i = __ffs(todo) - 1;
    todo &= todo - 1;
    page = pages.page(base + i * kWarps);
    code = (-__shfl_sync(0xffffffffu, entry, i) - 1) & ~kMidTier;
    tile = 0;
    return true;
  }
  __device__ __forceinline__ int tok0(int block_size) const { return page * block_size + tile * 16; }
};

// D[16 x 8] += A[16 x 16] B[16 x 8], fp16 in, fp32 accumulate (sm_80+).
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// One warp's share of the lo pages of one tier (`lo`, whose codes carry lo.tier_flag) among the
// split's `pages` (tokens from t_end on are masked),
// merged into the warp's slot of hi-pass results (sm_ml / sm_acc, in the hi path's units:
// values / v_scale). Lane L = 4g + j holds the
// scores of tokens {g, g + 8} x heads {2j, 2j + 1} of a tile and the outputs of channels
// {16n + g, 16n + g + 8} x the same heads; the fragment layouts are mma.m16n8k16's. Tiles are
// computed in pairs and staged through `ring` (kLoStages x lo_tile_bytes, this warp's) one pair
// ahead.
template <int BITS, typename q_t, int D, int MAX_G>
__device__ __forceinline__ void lo_pass(const q_t* __restrict__ q_heads, int64_t q_stride_head,
                                        int ng, const int32_t* __restrict__ bt,
                                        const SplitPages& pages, int t_end, int block_size, int kvh,
                                        float scale_log2, float inv_v_scale, const LoLayout& lo,
                                        float (&sm_ml)[MAX_G][2], float (&sm_acc)[MAX_G][D],
                                        __half (&sm_p)[kLoPair][8][kPStride],
                                        uint8_t* __restrict__ ring,
                                        int (&sm_tok)[kLoStages],
                                        const __half* __restrict__ sm_q) {
  constexpr int KC = D / 16;             // 16-channel chunks: k-steps of S, m-tiles of O
  constexpr int LW = D * BITS / 64;      // code words per lane per tile (K and V each)
  constexpr int kCodeBytes = 32 * LW * 4;  // one tile's K (or V) codes of one head
  constexpr int kTileBytes = lo_tile_bytes<D, BITS>();
  const int slots = lo.outlier_slots, tile_stride = kTileBytes + 4 * slots;
  const bool pow2_block = (block_size & (block_size - 1)) == 0;
  // Sections of a staged tile: K codes, V codes, K scales (4 runs of KC x 8 B, interleaved 16 B
  // at a time), K zeros (4 runs of KC x 4 B), V scales (groups x 4 x 8 B), V zeros (groups x 4 x 4 B).
  constexpr int kKs = 2 * kCodeBytes, kKz = kKs + 32 * KC, kVs = kKz + 16 * KC;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, j = lane % 4;
  const int tiles = block_size / 16, groups = D / lo.group;
  // Value groups are 16 << gshift channels (multiples of 16 dividing D: powers of two).
  const int gshift = max(__ffs(lo.group >> 4) - 1, 0);
  const int kVz = kVs + 32 * groups;

  // Q^T as the B operand of S^T = K Q^T: channels 16c + 2j + {0, 1} (+8) of head g.
  uint32_t qb[KC][2];
#pragma unroll
  for (int c = 0; c < KC; ++c) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int ch = 16 * c + 2 * j + 8 * half;
      float x0 = 0.f, x1 = 0.f;
      if (g < ng) {
        x0 = to_float(q_heads[g * q_stride_head + ch]) * scale_log2;
        x1 = to_float(q_heads[g * q_stride_head + ch + 1]) * scale_log2;
      }
      qb[c][half] = h2_bits(__floats2half2_rn(x0, x1));
    }
  }
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f}, acc[KC][4];
#pragma unroll
  for (int n = 0; n < KC; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;

  // A lane's part in staging a tile is the same for every tile: its source offset in a lo page
  // of each section (for the page's tile 0; tile t adds t times the section's tile stride), its
  // destination and whether it copies there. Hoisted out of the loop, a staged tile costs its
  // page address, an add per copy and the copies (SASS: ~20 instructions a tile fewer).
  constexpr int kCodeRounds = (kCodeBytes + 511) / 512;
  const int head_tiles = kvh * tiles;
  const int src_codes = head_tiles * kCodeBytes + lane * 16;
  const int src_ks = lo.k_scales + kvh * 32 * KC + lane * 16;
  const int src_kz = lo.k_zeros + kvh * 16 * KC + lane * 16;
  const int src_vs = lo.v_scales + head_tiles * groups * 32 + lane * 16;
  const int src_vz = lo.v_zeros + head_tiles * groups * 16 + lane * 16;
  // The K scales' four runs (one per j, KC x 8 B) are interleaved 16 bytes at a time, so that
  // lanes of different j read different banks (run after run, j and j + 2 collided).
  const int dst_ks = kKs + (lane % (KC / 2)) * 64 + (lane / (KC / 2)) * 16;
  // groups <= KC: lo groups are multiples of 16 channels.
  const bool ks_on = lane < 2 * KC, kz_on = lane < KC, vs_on = lane < 2 * groups,
             vz_on = lane < groups, out_on = lane < slots / 4;
  const int src_out = lo.k_outliers + kvh * slots * 4 + lane * 16;
  uint8_t* const ring_lane = ring + lane * 16;

  // Stage the next lo tile (if any) into ring slot `stage`; sm_tok says which tokens it holds
  // (-1: none, and none after it). Every call commits one cp.async group, empty or not.
  LoCursor cur{pages, warp, 0, 0u, 0, -1, 0, lo.tier_flag};
  cur.load_window(bt, lane);
  auto stage_next = [&](int stage) {
    int tok0 = -1;
    if (cur.next(bt, t_end, block_size, lane)) {
      const int code = cur.code, tile = cur.tile;
      tok0 = cur.tok0(block_size);
      const int blk = lo.pack_factor == 1
                          ? code
                          : static_cast<int>(__umulhi(static_cast<uint32_t>(code), lo.pack_magic));
      // A block is < 4 GiB (checked at launch): one 32 x 32 -> 64-bit multiply-add.
      const uint8_t* page = lo.base +
                            static_cast<uint64_t>(static_cast<uint32_t>(blk)) *
                                static_cast<uint32_t>(lo.block_bytes) +
                            static_cast<uint32_t>(code - blk * lo.pack_factor) *
                                static_cast<uint32_t>(lo.page_bytes);
      const int t_codes = tile * kCodeBytes, t_vs = tile * groups * 32;
      uint8_t* dst = ring_lane + stage * tile_stride;
      const uint8_t* codes = page + (src_codes + t_codes);
#pragma unroll
      for (int k = 0; k < kCodeRounds; ++k) {
        if (kCodeBytes % 512 == 0 || k * 512 + lane * 16 < kCodeBytes) {
          cp_async16(dst + k * 512, codes + k * 512);
          cp_async16(dst + kCodeBytes + k * 512, codes + lo.v_codes + k * 512);
        }
      }
      if (ks_on) cp_async16(ring + stage * tile_stride + dst_ks, page + src_ks);
      if (kz_on) cp_async16(dst + kKz, page + src_kz);
      if (vs_on) cp_async16(dst + kVs, page + (src_vs + t_vs));
      if (vz_on) cp_async16(dst + kVz, page + (src_vz + t_vs / 2));
      if (out_on) cp_async16(dst + kTileBytes, page + src_out);
    }
    if (lane == 0) sm_tok[stage] = tok0;
    cp_async_commit();
  };
  // Tiles go in pairs: slots {0, 1} and {2, 3} of the ring alternate, one pair computed while
  // the other is in flight. A pair's second tile may be missing (the warp's last, odd tile):
  // its scores are masked and its P x value-scale operand is zero, so whatever its slot holds
  // (finite codes, any scales) adds nothing.
  static_assert(kLoStages == 2 * kLoPair, "the ring holds two pairs");
#pragma unroll
  for (int t = 0; t < kLoPair; ++t) stage_next(t);

  for (int it = 0;; ++it) {
    const int cur_slot = (it & 1) * kLoPair;
    __syncwarp();  // every lane is done with the other pair's slots (read last iteration)
#pragma unroll
    for (int t = 0; t < kLoPair; ++t) stage_next(kLoPair - cur_slot + t);
    cp_async_wait<kLoPair>();
    __syncwarp();  // the current pair's bytes and sm_tok are visible
    int tok0[kLoPair];
#pragma unroll
    for (int t = 0; t < kLoPair; ++t) tok0[t] = sm_tok[cur_slot + t];
    if (tok0[0] < 0) break;
    const bool have[kLoPair] = {true, tok0[1] >= 0};

    // S^T[tokens x heads] = (K codes - zeros) (Q^T x the channels' key scales), per chunk; the
    // pair's two accumulation chains are independent, so their mma latencies overlap.
    uint32_t vw[kLoPair][LW];
    float s[kLoPair][4];
#pragma unroll
    for (int t = 0; t < kLoPair; ++t) {
      const uint8_t* tile_smem = ring + (cur_slot + t) * tile_stride;
      uint32_t kw[LW], kw8[LW];
      load_words<LW>(tile_smem + lane * LW * 4, kw);
      shifted_words<LW>(kw, kw8);
      load_words<LW>(tile_smem + kCodeBytes + lane * LW * 4, vw[t]);
      const uint8_t* k_scales = tile_smem + kKs + j * 16;  // chunk c at (c / 2) * 64 + (c % 2) * 8
      const uint32_t* k_zeros = reinterpret_cast<const uint32_t*>(tile_smem + kKz) + j * KC;
      s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.f;
#pragma unroll
      for (int c = 0; c < KC; ++c) {
        uint32_t a[4];
        const uint2 ks = *reinterpret_cast<const uint2*>(k_scales + (c / 2) * 64 + (c % 2) * 8);
        const uint32_t kz = k_zeros[c];
        a_fragment<BITS>(kw, kw8, c, zero_pair_bits(kz, 0), zero_pair_bits(kz, 1), a);
        mma_16816(s[t], a, scaled(qb[c][0], ks.x), scaled(qb[c][1], ks.y));
      }
      // Exact keys: 16 of the page's outliers per mma (those at other tokens add zeros). A
      // missing second tile's row is garbage, but its scores are masked below.
      if (slots > 0) {
        const uint32_t* fixes = reinterpret_cast<const uint32_t*>(tile_smem + kTileBytes);
        const int tile_row = pow2_block ? tok0[t] & (block_size - 1) : tok0[t] % block_size;
        const int row = tile_row + g;
        const __half* q_row = sm_q + g * kQRow<D>;
        for (int k = 0; k < slots; k += 16) {
          const uint2 w0 = *reinterpret_cast<const uint2*>(fixes + k + 2 * j);
          const uint2 w1 = *reinterpret_cast<const uint2*>(fixes + k + 2 * j + 8);
          const uint32_t a[4] = {fix_pair<D>(w0, row), fix_pair<D>(w0, row + 8),
                                 fix_pair<D>(w1, row), fix_pair<D>(w1, row + 8)};
          mma_16816(s[t], a, query_pair<D>(q_row, w0), query_pair<D>(q_row, w1));
        }
      }
    }

    // Online softmax over the pair; s[t][e], s[t][e + 2] are head 2j + e at tokens g, g + 8.
    float pr[kLoPair][4], alpha[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const bool head = 2 * j + e < ng;
      float sv[kLoPair][2], mx = -INFINITY;
#pragma unroll
      for (int t = 0; t < kLoPair; ++t) {
        sv[t][0] = head && have[t] && tok0[t] + g < t_end ? s[t][e] : -INFINITY;
        sv[t][1] = head && have[t] && tok0[t] + g + 8 < t_end ? s[t][e + 2] : -INFINITY;
        mx = fmaxf(mx, fmaxf(sv[t][0], sv[t][1]));
      }
#pragma unroll
      for (int o = 4; o < 32; o *= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float mn = fmaxf(m[e], mx);
      alpha[e] = exp2_diff(m[e], mn);
      float sum = 0.f;
#pragma unroll
      for (int t = 0; t < kLoPair; ++t) {
        pr[t][e] = sv[t][0] == -INFINITY ? 0.f : exp2f(sv[t][0] - mn);
        pr[t][e + 2] = sv[t][1] == -INFINITY ? 0.f : exp2f(sv[t][1] - mn);
        sum += pr[t][e] + pr[t][e + 2];
      }
      l[e] = l[e] * alpha[e] + sum;
      m[e] = mn;
    }
    // Once the running maxima settle, alpha is exactly 1 for every lane: skip the rescale.
    if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
      for (int n = 0; n < KC; ++n) {
        acc[n][0] *= alpha[0];
        acc[n][2] *= alpha[0];
        acc[n][1] *= alpha[1];
        acc[n][3] *= alpha[1];
      }
    }
    // P^T as the B operand of O^T += V^T P^T: tokens 2j + {0, 1} (+8) of head g.
    uint32_t pb[kLoPair][2];
#pragma unroll
    for (int t = 0; t < kLoPair; ++t) {
      sm_p[t][2 * j][g] = __float2half_rn(pr[t][0]);
      sm_p[t][2 * j + 1][g] = __float2half_rn(pr[t][1]);
      sm_p[t][2 * j][g + 8] = __float2half_rn(pr[t][2]);
      sm_p[t][2 * j + 1][g + 8] = __float2half_rn(pr[t][3]);
    }
    __syncwarp();
#pragma unroll
    for (int t = 0; t < kLoPair; ++t) {
      pb[t][0] = *reinterpret_cast<const uint32_t*>(&sm_p[t][g][2 * j]);
      pb[t][1] = *reinterpret_cast<const uint32_t*>(&sm_p[t][g][2 * j + 8]);
    }

    // O^T += (V codes - zeros)^T (P^T x the tokens' value scales); a lane's tokens are
    // 2j + {0, 1} (+8), whose scales and zeros are read once per value group.
    uint32_t vb[kLoPair][2] = {}, vzb[kLoPair][2] = {}, vw8[kLoPair][LW];
#pragma unroll
    for (int t = 0; t < kLoPair; ++t) shifted_words<LW>(vw[t], vw8[t]);
#pragma unroll
    for (int n = 0; n < KC; ++n) {
#pragma unroll
      for (int t = 0; t < kLoPair; ++t) {
        if ((n & ((1 << gshift) - 1)) == 0) {  // the first m-tile of a value group
          const uint8_t* tile_smem = ring + (cur_slot + t) * tile_stride;
          const uint2 vs = reinterpret_cast<const uint2*>(tile_smem + kVs)[j + (n >> gshift) * 4];
          const uint32_t vz =
              reinterpret_cast<const uint32_t*>(tile_smem + kVz)[j + (n >> gshift) * 4];
          vb[t][0] = have[t] ? scaled(pb[t][0], vs.x) : 0u;
          vb[t][1] = have[t] ? scaled(pb[t][1], vs.y) : 0u;
          vzb[t][0] = zero_pair_bits(vz, 0);
          vzb[t][1] = zero_pair_bits(vz, 1);
        }
        uint32_t a[4];
        a_fragment<BITS>(vw[t], vw8[t], n, vzb[t][0], vzb[t][1], a);
        mma_16816(acc[n], a, vb[t][0], vb[t][1]);
      }
    }
  }
  cp_async_wait<0>();

  // Sum the lanes' partial l over tokens, then merge into the hi pass's slot.
#pragma unroll
  for (int e = 0; e < 2; ++e)
#pragma unroll
    for (int o = 4; o < 32; o *= 2) l[e] += __shfl_xor_sync(0xffffffffu, l[e], o);
  __syncwarp();
  float mh[2], lh[2];
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int h = 2 * j + e;
    mh[e] = h < ng ? sm_ml[h][0] : -INFINITY;
    lh[e] = h < ng ? sm_ml[h][1] : 0.f;
  }
  __syncwarp();
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int h = 2 * j + e;
    if (h >= ng) continue;
    const float mx = fmaxf(mh[e], m[e]);
    const float a = exp2_diff(mh[e], mx), b = exp2_diff(m[e], mx);
#pragma unroll
    for (int n = 0; n < KC; ++n) {
      float* row = sm_acc[h] + 16 * n + g;
      row[0] = row[0] * a + acc[n][e] * b * inv_v_scale;
      row[8] = row[8] * a + acc[n][e + 2] * b * inv_v_scale;
    }
    if (g == 0) {
      sm_ml[h][0] = mx;
      sm_ml[h][1] = lh[e] * a + l[e] * b;
    }
  }
}

// The importance signal, fused into the hi pass: each slab's log-sum-exp per query head (log2
// domain), from the lane groups' running maxima and the slab's probabilities relative to them.
// page_mass (csrc/page_mass.cu) turns these into page masses with the step's final lse, so no
// key is read twice. Lanes of one lane group agree on m and sum; the groups are merged here.
template <int LPT, int MAX_G>
__device__ __forceinline__ void write_slab_lse(const float (&m)[MAX_G], const float (&sum)[MAX_G],
                                               float* __restrict__ slab_lse, int entry, int slab,
                                               int block_size, int slab_rows, int num_q_heads,
                                               int h0, int ng) {
  const int lane = threadIdx.x % 32;
  const int64_t row = (static_cast<int64_t>(entry) * (block_size / slab_rows) +
                       slab % block_size / slab_rows) * num_q_heads + h0;
#pragma unroll
  for (int g = 0; g < MAX_G; ++g) {
    float mg = m[g], sg = sum[g];
#pragma unroll
    for (int o = LPT; o < 32; o *= 2) {
      const float mo = __shfl_xor_sync(0xffffffffu, mg, o);
      const float so = __shfl_xor_sync(0xffffffffu, sg, o);
      const float mn = fmaxf(mg, mo);
      sg = sg * exp2_diff(mg, mn) + so * exp2_diff(mo, mn);
      mg = mn;
    }
    if (lane == g && g < ng) slab_lse[row + g] = sg > 0.f ? mg + log2f(sg) : -INFINITY;
  }
}

// The result of a part with no pages (query heads h0 .. h0 + ng - 1 of row `seq`): softmax sum
// 0, so an output of 0 (kept as it is under merge_lse) and a log-sum-exp of -inf; as a split's
// partial, only its (max, sum) = (-inf, 0), which decode_reduce_kernel skips.
template <typename q_t>
__device__ void write_empty_part(q_t* out_row, int64_t out_stride_head, float* part_ml,
                                 float* lse, const float* merge_lse, int64_t merge_lse_stride,
                                 int seq, int h0, int ng, int num_q_heads, int split,
                                 int num_splits, int head_dim) {
  if (num_splits > 1) {
    for (int g = threadIdx.x; g < ng; g += blockDim.x) {
      const int64_t row = (static_cast<int64_t>(seq) * num_q_heads + h0 + g) * num_splits + split;
      part_ml[row * 2] = -INFINITY;
      part_ml[row * 2 + 1] = 0.f;
    }
    return;
  }
  for (int i = threadIdx.x; i < ng * head_dim; i += blockDim.x) {
    const int h = h0 + i / head_dim;
    store_output(out_row + h * out_stride_head + i % head_dim, 0.f, 0.f, -INFINITY, merge_lse,
                 h * merge_lse_stride + seq);
    if (lse != nullptr && i % head_dim == 0) lse[seq * num_q_heads + h] = -INFINITY;
  }
}

// CTAs per SM the register budget must allow: three where the kernel fits in 168 registers
// (D <= 128, up to 4 heads per CTA), so that decode_num_splits' grid of about twice the SMs'
// count runs in one wave; the rest take what they need.
template <int D, int MAX_G> constexpr int min_ctas_per_sm() { return D <= 128 && MAX_G <= 4 ? 3 : 1; }

template <typename q_t, typename kv_t, int D, int MAX_G>
__global__ void __launch_bounds__(kThreads, min_ctas_per_sm<D, MAX_G>())
paged_decode_kernel(const q_t* __restrict__ q, int64_t q_stride_tok, int64_t q_stride_head,
                    const kv_t* __restrict__ k_cache, const kv_t* __restrict__ v_cache,
                    int64_t kv_stride_block, int64_t kv_stride_tok, int64_t kv_stride_head,
                    const int32_t* __restrict__ block_table, int64_t bt_stride,
                    const int32_t* __restrict__ seq_lens,
                    q_t* __restrict__ out, int64_t out_stride_tok, int64_t out_stride_head,
                    float* __restrict__ part_acc, float* __restrict__ part_ml,
                    int num_q_heads, int group, int head_chunks, int block_size,
                    float scale_log2, float k_scale, float v_scale, const LoLayout two,
                    const LoLayout four, float* __restrict__ lse, float* __restrict__ slab_lse,
                    const int32_t* __restrict__ slab_gate, const float* __restrict__ merge_lse,
                    int64_t merge_lse_stride) {
  constexpr int LPT = D / kElems;   // lanes per token row
  constexpr int SUBS = 32 / LPT;    // rows per warp per step
  using vec_t = typename RowVec<kv_t>::type;

  const int seq = blockIdx.x;
  const int kvh = blockIdx.y / head_chunks;
  const int chunk = blockIdx.y % head_chunks;
  const int split = blockIdx.z;
  const int num_splits = gridDim.z;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int sub = lane / LPT;
  const int sl = lane % LPT;

  // The slab output only where asked and, with a gate (a device flag, so CUDA graphs stay the
  // same), only on the steps that measure importance: it costs the hi pass up to ~18%.
  const bool write_slabs = slab_lse != nullptr && (slab_gate == nullptr || *slab_gate != 0);
  const int h0 = kvh * group + chunk * MAX_G;                 // first query head of this CTA
  const int ng = min(MAX_G, group - chunk * MAX_G);           // query heads of this CTA

  const int seq_len = seq_lens[seq];
  const int num_pages = (seq_len + block_size - 1) / block_size;
  const SplitPages pages(num_pages, num_splits, split);
  if (pages.count == 0) {
    // An empty part (a split past the row's pages; every row of split decode's lo table while
    // nothing is demoted) leaves its result at once: loading queries and staging nothing, such
    // CTAs took 41 us a layer at batch 128, now 9 (benchmarks/results/2026-12-07-h100-empty-
    // decode-parts/).
    write_empty_part(out + seq * out_stride_tok, out_stride_head, part_ml, lse, merge_lse,
                     merge_lse_stride, seq, h0, ng, num_q_heads, split, num_splits, D);
    return;
  }

  // Where lo pages keep exact keys, every warp's lo pass reads the query heads (scaled, fp16, as
  // the lo pass's own operands) at the outliers' channels: rows of heads past ng are zeros.
  const int outlier_slots = max(two.outlier_slots, four.outlier_slots);
  __shared__ __half sm_q[8][kQRow<D>];
  if (outlier_slots > 0) {
    for (int i = threadIdx.x; i < 8 * D; i += kThreads) {
      const int g = i / D, d = i % D;
      sm_q[g][d] = __float2half_rn(
          g < ng ? to_float(q[seq * q_stride_tok + (h0 + g) * q_stride_head + d]) * scale_log2
                 : 0.f);
    }
    __syncthreads();
  }

  // Lo pages hold real values; the hi path's results are in cache units (times v_scale later).
  const float inv_v_scale = 1.f / v_scale;
  const int split_rows = pages.count * block_size;  // row r: page r / block_size of the split

  // Query rows of this lane's 8 dims, pre-scaled so that q.k lands in log2 units.
  float qf[MAX_G][kElems];
#pragma unroll
  for (int g = 0; g < MAX_G; ++g) {
#pragma unroll
    for (int e = 0; e < kElems; ++e) qf[g][e] = 0.f;
    if (g < ng) {
      const q_t* qp = q + seq * q_stride_tok + (h0 + g) * q_stride_head + sl * kElems;
#pragma unroll
      for (int e = 0; e < kElems; ++e) qf[g][e] = to_float(qp[e]) * scale_log2 * k_scale;
    }
  }

  float m[MAX_G], l[MAX_G], acc[MAX_G][kElems];
#pragma unroll
  for (int g = 0; g < MAX_G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < kElems; ++e) acc[g][e] = 0.f;
  }

  const int32_t* bt = block_table + seq * bt_stride;
  const int64_t head_off = kvh * kv_stride_head + sl * kElems;
  constexpr int kRowsPerStep = kWarps * SUBS * kUnroll;

  // The split's rows (its pages, in order) go in steps of kRowsPerStep: in each step warp w
  // owns the slab of kUnroll * SUBS consecutive rows at w * kUnroll * SUBS (lane group `sub`
  // takes rows sub, sub + SUBS, ...). The slab size (1024 / D rows) divides every supported
  // block size, so a slab lies in one page: one table entry per slab, and hi/lo is uniform
  // across the warp.
  constexpr int kSlab = kUnroll * SUBS;
  static_assert(kSlab * D == kSlabElems, "slab size and kSlabElems disagree");
  // The warp's next 32 slabs are looked up together, one table load per lane, and a ballot
  // keeps the hi ones: lo pages (lo_pass reads them) and slabs past the end cost nothing here.
  // One dependent load per slab instead drew 26% of an all-lo step's stall samples (ncu).
  for (int base0 = 0; base0 < split_rows; base0 += 32 * kRowsPerStep) {
    const int my_row = base0 + lane * kRowsPerStep + warp * kSlab;  // a row of the split
    int my_slab = 0, my_entry = -1;  // the slab's first sequence row and its table entry
    if (my_row < split_rows) {
      const int page = pages.page(my_row / block_size);
      my_slab = page * block_size + my_row % block_size;
      if (my_slab < seq_len) my_entry = bt[page];
    }
    for (uint32_t todo = __ballot_sync(0xffffffffu, my_entry >= 0); todo; todo &= todo - 1) {
      const int i = __ffs(todo) - 1;
      const int slab = __shfl_sync(0xffffffffu, my_slab, i);
      const int entry = __shfl_sync(0xffffffffu, my_entry, i);
      vec_t kr[kUnroll], vr[kUnroll];
      bool valid[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int t = slab + u * SUBS + sub;
        valid[u] = t < seq_len;
        if (!valid[u]) continue;
        const int64_t off = entry * kv_stride_block + (t % block_size) * kv_stride_tok + head_off;
        kr[u] = *reinterpret_cast<const vec_t*>(k_cache + off);
        vr[u] = *reinterpret_cast<const vec_t*>(v_cache + off);
      }
      float s[kUnroll][MAX_G], slab_sum[MAX_G];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        float kf[kElems];
        to_float8(kr[u], kf, static_cast<const kv_t*>(nullptr));
#pragma unroll
        for (int g = 0; g < MAX_G; ++g) {
          float d = 0.f;
#pragma unroll
          for (int e = 0; e < kElems; ++e) d += qf[g][e] * kf[e];
#pragma unroll
          for (int o = LPT / 2; o > 0; o /= 2) d += __shfl_xor_sync(0xffffffffu, d, o);
          s[u][g] = valid[u] ? d : -INFINITY;
        }
      }
#pragma unroll
      for (int g = 0; g < MAX_G; ++g) {
        float mc = m[g];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) mc = fmaxf(mc, s[u][g]);
        const float alpha = exp2_diff(m[g], mc);
        l[g] *= alpha;
#pragma unroll
        for (int e = 0; e < kElems; ++e) acc[g][e] *= alpha;
        m[g] = mc;
        slab_sum[g] = 0.f;
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (!valid[u]) continue;
        float vf[kElems];
        to_float8(vr[u], vf, static_cast<const kv_t*>(nullptr));
#pragma unroll
        for (int g = 0; g < MAX_G; ++g) {
          const float p = exp2f(s[u][g] - m[g]);
          slab_sum[g] += p;
#pragma unroll
          for (int e = 0; e < kElems; ++e) acc[g][e] += p * vf[e];
        }
      }
#pragma unroll
      for (int g = 0; g < MAX_G; ++g) l[g] += slab_sum[g];
      if (write_slabs)
        write_slab_lse<LPT, MAX_G>(m, slab_sum, slab_lse, entry, slab, block_size, kSlab,
                                   num_q_heads, h0, ng);
    }
  }

  // Merge the lane groups of a warp (same dims, different rows).
#pragma unroll
  for (int o = LPT; o < 32; o *= 2) {
#pragma unroll
    for (int g = 0; g < MAX_G; ++g) {
      const float mo = __shfl_xor_sync(0xffffffffu, m[g], o);
      const float lo = __shfl_xor_sync(0xffffffffu, l[g], o);
      const float mn = fmaxf(m[g], mo);
      const float a = exp2_diff(m[g], mn), b = exp2_diff(mo, mn);
      l[g] = l[g] * a + lo * b;
#pragma unroll
      for (int e = 0; e < kElems; ++e) {
        const float ao = __shfl_xor_sync(0xffffffffu, acc[g][e], o);
        acc[g][e] = acc[g][e] * a + ao * b;
      }
      m[g] = mn;
    }
  }

  // Merge the warps through shared memory.
  __shared__ float sm_ml[kWarps][MAX_G][2];
  __shared__ float sm_acc[kWarps][MAX_G][D];
  if (sub == 0) {
#pragma unroll
    for (int g = 0; g < MAX_G; ++g) {
      if (sl == 0) {
        sm_ml[warp][g][0] = m[g];
        sm_ml[warp][g][1] = l[g];
      }
#pragma unroll
      for (int e = 0; e < kElems; ++e) sm_acc[warp][g][sl * kElems + e] = acc[g][e];
    }
  }
  __syncwarp();
  __shared__ __align__(16) __half sm_p[kWarps][kLoPair][8][kPStride];  // read as fp16x2 words
  __shared__ int sm_tok[kWarps][kLoStages];
  extern __shared__ __align__(16) uint8_t lo_ring[];  // kWarps x kLoStages staged lo tiles
  const q_t* q_heads = q + seq * q_stride_tok + h0 * q_stride_head;
  // One pass per tier present (`two`: 2-bit pages, `four`: 4-bit ones, bits 0 where absent),
  // each merged into the warp's slot.
  uint8_t* const ring = lo_ring + warp * (four.bits == 4 ? lo_ring_bytes<D, 4>(outlier_slots)
                                                         : lo_ring_bytes<D, 2>(outlier_slots));
  if (two.bits == 2)
    lo_pass<2, q_t, D, MAX_G>(q_heads, q_stride_head, ng, bt, pages, seq_len, block_size,
                              kvh, scale_log2, inv_v_scale, two, sm_ml[warp], sm_acc[warp],
                              sm_p[warp], ring, sm_tok[warp], &sm_q[0][0]);
  if (four.bits == 4)
    lo_pass<4, q_t, D, MAX_G>(q_heads, q_stride_head, ng, bt, pages, seq_len, block_size,
                              kvh, scale_log2, inv_v_scale, four, sm_ml[warp], sm_acc[warp],
                              sm_p[warp], ring, sm_tok[warp], &sm_q[0][0]);
  __syncthreads();

  for (int i = threadIdx.x; i < ng * D; i += kThreads) {
    const int g = i / D, d = i % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, sm_ml[w][g][0]);
    float lsum = 0.f, a = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float f = exp2_diff(sm_ml[w][g][0], mx);
      lsum += sm_ml[w][g][1] * f;
      a += sm_acc[w][g][d] * f;
    }
    const int h = h0 + g;
    if (num_splits == 1) {
      const float o = lsum > 0.f ? a * v_scale / lsum : 0.f;
      const float lse2 = mx + log2f(lsum);
      store_output(out + seq * out_stride_tok + h * out_stride_head + d, o, lsum, lse2, merge_lse,
                   h * merge_lse_stride + seq);
      if (lse != nullptr && d == 0) lse[seq * num_q_heads + h] = lsum > 0.f ? lse2 : -INFINITY;
    } else {
      const int64_t row = (static_cast<int64_t>(seq) * num_q_heads + h) * num_splits + split;
      part_acc[row * D + d] = lsum > 0.f ? a / lsum : 0.f;
      if (d == 0) {
        part_ml[row * 2] = mx;
        part_ml[row * 2 + 1] = lsum;
      }
    }
  }
}

// Combine split partials: out = sum_s w_s o_s / sum_s w_s, w_s = l_s 2^(m_s - M).
template <typename q_t>
__global__ void decode_reduce_kernel(const float* __restrict__ part_acc,
                                     const float* __restrict__ part_ml, q_t* __restrict__ out,
                                     int64_t out_stride_tok, int64_t out_stride_head,
                                     int num_q_heads, int num_splits, int head_dim,
                                     float v_scale, float* __restrict__ lse,
                                     const float* __restrict__ merge_lse,
                                     int64_t merge_lse_stride) {
  const int seq = blockIdx.x, h = blockIdx.y;
  const int64_t row0 = (static_cast<int64_t>(seq) * num_q_heads + h) * num_splits;
  float mx = -INFINITY;
  for (int s = 0; s < num_splits; ++s) mx = fmaxf(mx, part_ml[(row0 + s) * 2]);
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float num = 0.f, den = 0.f;
    for (int s = 0; s < num_splits; ++s) {
      const float l = part_ml[(row0 + s) * 2 + 1];
      if (l == 0.f) continue;  // an empty split: its part_acc was never written
      const float w = l * exp2_diff(part_ml[(row0 + s) * 2], mx);
      num += w * part_acc[(row0 + s) * head_dim + d];
      den += w;
    }
    const float o = den > 0.f ? num * v_scale / den : 0.f;
    const float lse2 = mx + log2f(den);
    store_output(out + seq * out_stride_tok + h * out_stride_head + d, o, den, lse2, merge_lse,
                 h * merge_lse_stride + seq);
    if (lse != nullptr && d == 0) lse[seq * num_q_heads + h] = den > 0.f ? lse2 : -INFINITY;
  }
}

template <typename q_t, typename kv_t, int D, int MAX_G>
void launch(const DecodeArgs& a, cudaStream_t stream) {
  const int head_chunks = (a.group + MAX_G - 1) / MAX_G;
  dim3 grid(a.num_seqs, a.num_kv_heads * head_chunks, a.num_splits);
  // The kernel's passes by bits: the lo tier's, and a 4-bit middle tier's where there is one.
  const LoLayout none{nullptr, 0, 0, 0, 0, 0};
  const LoLayout& two = a.lo.bits == 2 ? a.lo : none;
  const LoLayout& four = a.lo.bits == 4 ? a.lo : a.mid;
  // Warps' rings at the 4-bit stride whenever 4-bit tiles may be staged (a 2-bit-only table
  // needs less shared memory, which can fit one more CTA per SM).
  const int ring_bytes = kWarps * (four.bits == 4 ? lo_ring_bytes<D, 4>(a.lo.outlier_slots)
                                                  : lo_ring_bytes<D, 2>(a.lo.outlier_slots));
  auto* kernel = paged_decode_kernel<q_t, kv_t, D, MAX_G>;
  // The default dynamic limit is 48 KB less the kernel's static shared memory, which D 256 or
  // 8 heads per CTA exceed with the ring: raise it once per instantiation and device (a
  // host-side call, allowed during CUDA-graph capture).
  static int allowed[64] = {};
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  TORCH_CHECK(device < 64, "mikv paged_decode: device index ", device, " >= 64");
  if (allowed[device] < ring_bytes) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        ring_bytes));
    allowed[device] = ring_bytes;
  }
  if (a.ctas_per_sm != nullptr) {
    C10_CUDA_CHECK(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(a.ctas_per_sm, kernel, kThreads, ring_bytes));
    return;
  }
  kernel<<<grid, kThreads, ring_bytes, stream>>>(
      static_cast<const q_t*>(a.q), a.q_stride_tok, a.q_stride_head,
      static_cast<const kv_t*>(a.k_cache), static_cast<const kv_t*>(a.v_cache),
      a.kv_stride_block, a.kv_stride_tok, a.kv_stride_head, a.block_table, a.bt_stride,
      a.seq_lens, static_cast<q_t*>(a.out), a.out_stride_tok, a.out_stride_head, a.part_acc,
      a.part_ml, a.num_q_heads, a.group, head_chunks, a.block_size, a.scale_log2, a.k_scale, a.v_scale,
      two, four, a.lse, a.slab_lse, a.slab_gate, a.merge_lse, a.merge_lse_stride);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (a.num_splits > 1) {
    decode_reduce_kernel<q_t><<<dim3(a.num_seqs, a.num_q_heads), D, 0, stream>>>(
        a.part_acc, a.part_ml, static_cast<q_t*>(a.out), a.out_stride_tok, a.out_stride_head,
        a.num_q_heads, a.num_splits, D, a.v_scale, a.lse, a.merge_lse, a.merge_lse_stride);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename q_t, typename kv_t, int D>
void dispatch_group(const DecodeArgs& a, cudaStream_t s) {
  if (a.group <= 1) return launch<q_t, kv_t, D, 1>(a, s);
  if (a.group <= 2) return launch<q_t, kv_t, D, 2>(a, s);
  if (a.group <= 4) return launch<q_t, kv_t, D, 4>(a, s);
  return launch<q_t, kv_t, D, 8>(a, s);  // larger groups run in chunks of 8 heads
}

template <typename q_t, typename kv_t>
void dispatch_dim(const DecodeArgs& a, cudaStream_t s) {
  switch (a.head_dim) {
    case 64: return dispatch_group<q_t, kv_t, 64>(a, s);
    case 128: return dispatch_group<q_t, kv_t, 128>(a, s);
    case 256: return dispatch_group<q_t, kv_t, 256>(a, s);
    default: TORCH_CHECK(false, "mikv paged_decode: head_dim ", a.head_dim, " not in {64, 128, 256}");
  }
}

}  // namespace detail

LoLayout make_lo_layout(const DecodeArgs& a, const torch::Tensor& key_cache,
                        int64_t pack_factor, int64_t bits, int64_t group, int64_t outlier_slots) {
  TORCH_CHECK(bits == 2 || bits == 4, "lo_bits must be 2 or 4");
  // Outlier positions t * D + c fit 16 bits.
  TORCH_CHECK(valid_outlier_slots(outlier_slots) &&
                  static_cast<int64_t>(a.block_size) * a.head_dim <= 65536,
              "outlier_slots must be a multiple of 16 in [0, ", kMaxOutlierSlots, "] (got ",
              outlier_slots, ") and block_size * head_dim <= 65536");
  TORCH_CHECK(pack_factor >= 1, "lo_pack_factor must be >= 1");
  TORCH_CHECK(group >= 8 && a.head_dim % group == 0, "lo_group must be >= 8 and divide head_dim");
  // Lo pages come in 16 x 16 tensor-core tiles (pack_factor 1: the table names hi pages only).
  TORCH_CHECK(pack_factor == 1 || (a.block_size % 16 == 0 && group % 16 == 0),
              "lo pages need block_size and lo_group to be multiples of 16");
  // Sections in the order of mikv_vllm/layout.py: K, V codes; K, V scales; K, V zeros; K
  // outliers.
  const int64_t codes = static_cast<int64_t>(a.num_kv_heads) * a.block_size * a.head_dim * bits / 8;
  LoLayout lo;
  lo.base = static_cast<const uint8_t*>(key_cache.data_ptr());
  lo.block_bytes = key_cache.stride(0) * key_cache.element_size();
  lo.pack_factor = static_cast<int>(pack_factor);
  // umulhi(code, ceil(2^32 / f)) == code / f for every code < 2^32 / f (the rounding error
  // code * (magic * f - 2^32) / 2^32 stays below 1).
  TORCH_CHECK(key_cache.size(0) * pack_factor * pack_factor < (int64_t{1} << 32),
              "lo pages: too many blocks (", key_cache.size(0), ") for pack factor ", pack_factor);
  lo.pack_magic = pack_factor == 1 ? 0u
                                   : static_cast<uint32_t>(((int64_t{1} << 32) + pack_factor - 1) /
                                                           pack_factor);
  lo.bits = static_cast<int>(bits);
  lo.group = static_cast<int>(group);
  lo.v_codes = static_cast<int>(codes);
  const int k_groups = a.num_kv_heads * a.head_dim;                                // per channel
  const int v_groups = a.num_kv_heads * a.block_size * (a.head_dim / lo.group);   // per token
  lo.k_scales = static_cast<int>(2 * codes);
  lo.v_scales = lo.k_scales + 2 * k_groups;
  lo.k_zeros = lo.v_scales + 2 * v_groups;
  lo.v_zeros = lo.k_zeros + k_groups;
  lo.k_outliers = lo.v_zeros + v_groups;
  lo.outlier_slots = static_cast<int>(outlier_slots);
  lo.page_bytes = lo.k_outliers + 4 * a.num_kv_heads * lo.outlier_slots;
  TORCH_CHECK(lo.block_bytes < (int64_t{1} << 32), "mikv paged_decode: a KV cache block of ",
              lo.block_bytes, " B (>= 4 GiB) is not supported");
  TORCH_CHECK(lo.page_bytes * pack_factor <= lo.block_bytes, "lo pages (", lo.page_bytes, " B x ",
              pack_factor, ") exceed a block (", lo.block_bytes, " B)");
  // The lo pass stages tiles with 16-byte cp.async: every section starts 16-byte aligned when
  // the cache, its blocks and the pages do (section sizes are multiples of 16 by construction).
  TORCH_CHECK(pack_factor == 1 || (reinterpret_cast<uintptr_t>(lo.base) % 16 == 0 &&
                                   lo.block_bytes % 16 == 0 && lo.page_bytes % 16 == 0),
              "lo pages must be 16-byte aligned (cache, block stride and page size)");
  return lo;
}

LoLayout make_mid_layout(const DecodeArgs& a, const torch::Tensor& key_cache,
                         int64_t lo_pack_factor, int64_t lo_bits, int64_t group,
                         int64_t mid_pack_factor, int64_t mid_bits, int64_t outlier_slots) {
  if (mid_pack_factor == 0) return LoLayout{nullptr, 0, 0, 0, 0, 0};  // bits 0: no middle tier
  TORCH_CHECK(lo_bits == 2 && mid_bits == 4 && lo_pack_factor > 1 && mid_pack_factor > 1,
              "a middle tier must be 4-bit pages in front of 2-bit ones, both packed (got ",
              mid_bits, "-bit x ", mid_pack_factor, " before ", lo_bits, "-bit x ",
              lo_pack_factor, ")");
  TORCH_CHECK(key_cache.size(0) * std::max(lo_pack_factor, mid_pack_factor) < kMidTier,
              "lo pages: too many blocks (", key_cache.size(0), ") for two tiers");
  LoLayout mid = make_lo_layout(a, key_cache, mid_pack_factor, mid_bits, group, outlier_slots);
  mid.tier_flag = kMidTier;
  return mid;
}

int64_t decode_ctas_per_sm(int64_t head_dim, int64_t group, bool fp8_kv, int64_t lo_bits,
                           int64_t outlier_slots) {
  TORCH_CHECK(group >= 1 && (lo_bits == 2 || lo_bits == 4) && valid_outlier_slots(outlier_slots),
              "decode_ctas_per_sm: group must be >= 1, lo_bits 2 or 4, outlier_slots a multiple "
              "of 16 in [0, ", kMaxOutlierSlots, "]");
  DecodeArgs a;
  a.head_dim = static_cast<int>(head_dim);
  a.group = static_cast<int>(group);
  a.lo.bits = static_cast<int>(lo_bits);
  a.lo.outlier_slots = static_cast<int>(outlier_slots);
  int ctas = 0;
  a.ctas_per_sm = &ctas;
  // The query's dtype (bf16 or fp16) does not change the kernel's resources.
  if (fp8_kv) detail::dispatch_dim<__nv_bfloat16, uint8_t>(a, nullptr);
  else detail::dispatch_dim<__nv_bfloat16, __nv_bfloat16>(a, nullptr);
  return ctas;
}

void paged_decode(torch::Tensor& out, const torch::Tensor& query, const torch::Tensor& key_cache,
                  const torch::Tensor& value_cache, const torch::Tensor& block_table,
                  const torch::Tensor& seq_lens, double scale, double k_scale, double v_scale,
                  int64_t num_splits, int64_t lo_pack_factor, int64_t lo_bits,
                  int64_t lo_group, int64_t mid_pack_factor, int64_t mid_bits,
                  int64_t outlier_slots, const std::optional<torch::Tensor>& lse,
                  const std::optional<torch::Tensor>& slab_lse,
                  const std::optional<torch::Tensor>& slab_gate,
                  const std::optional<torch::Tensor>& merge_lse, bool skip_empty) {
  // query/out [seqs, q_heads, D]; caches [blocks, block_size, kv_heads, D] (any strides but the
  // last); block_table [seqs, max_pages] int32; seq_lens [seqs] int32.
  TORCH_CHECK(query.is_cuda() && query.dim() == 3, "query must be a CUDA [seqs, heads, D] tensor");
  TORCH_CHECK(key_cache.dim() == 4 && value_cache.dim() == 4, "caches must be [blocks, block, heads, D]");
  TORCH_CHECK(key_cache.strides() == value_cache.strides() && key_cache.sizes() == value_cache.sizes(),
              "key and value caches must share shape and strides");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt,
              "block_table and seq_lens must be int32");
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1 && key_cache.stride(3) == 1 &&
                  block_table.stride(1) == 1,
              "innermost dims must be contiguous");
  TORCH_CHECK(out.sizes() == query.sizes() && out.scalar_type() == query.scalar_type(),
              "out must match query");
  TORCH_CHECK(num_splits >= 1 && num_splits <= 64, "num_splits must be in [1, 64]");
  const auto qdt = query.scalar_type();
  const auto kdt = key_cache.scalar_type();
  const bool fp8 = kdt == at::kByte || kdt == at::kFloat8_e4m3fn;
  TORCH_CHECK(qdt == at::kBFloat16 || qdt == at::kHalf, "query must be bf16 or fp16");
  TORCH_CHECK(fp8 || kdt == qdt, "cache dtype must equal the query dtype or be fp8-e4m3");

  DecodeArgs a;
  a.num_seqs = query.size(0);
  a.num_q_heads = query.size(1);
  a.head_dim = query.size(2);
  a.num_kv_heads = key_cache.size(2);
  a.block_size = key_cache.size(1);
  TORCH_CHECK(key_cache.size(3) == a.head_dim, "cache head_dim differs from the query's");
  TORCH_CHECK(a.num_q_heads % a.num_kv_heads == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(block_table.size(0) >= a.num_seqs && seq_lens.size(0) >= a.num_seqs,
              "block_table/seq_lens have fewer rows than query");
  a.group = a.num_q_heads / a.num_kv_heads;
  TORCH_CHECK(a.head_dim >= 64 && a.block_size % (kSlabElems / a.head_dim) == 0,
              "block_size ", a.block_size, " must be a multiple of ",
              kSlabElems / std::max<int>(a.head_dim, 1),
              " (a warp's row slab must stay inside one page)");
  if (a.num_seqs == 0) return;
  a.num_splits = static_cast<int>(num_splits);
  a.q = query.data_ptr();
  a.out = out.data_ptr();
  a.k_cache = key_cache.data_ptr();
  a.v_cache = value_cache.data_ptr();
  a.block_table = block_table.data_ptr<int32_t>();
  a.seq_lens = seq_lens.data_ptr<int32_t>();
  a.q_stride_tok = query.stride(0);
  a.q_stride_head = query.stride(1);
  a.out_stride_tok = out.stride(0);
  a.out_stride_head = out.stride(1);
  a.kv_stride_block = key_cache.stride(0);
  a.kv_stride_tok = key_cache.stride(1);
  a.kv_stride_head = key_cache.stride(2);
  a.bt_stride = block_table.stride(0);
  a.scale_log2 = static_cast<float>(scale * M_LOG2E);
  a.k_scale = static_cast<float>(k_scale);
  a.v_scale = static_cast<float>(v_scale);
  a.lo = make_lo_layout(a, key_cache, lo_pack_factor, lo_bits, lo_group, outlier_slots);
  a.mid = make_mid_layout(a, key_cache, lo_pack_factor, lo_bits, lo_group, mid_pack_factor,
                          mid_bits, outlier_slots);
  if (lse.has_value()) {
    TORCH_CHECK(lse->scalar_type() == at::kFloat && lse->is_contiguous() &&
                    lse->numel() >= a.num_seqs * a.num_q_heads,
                "lse must be fp32 contiguous with >= seqs * q_heads elements");
    a.lse = lse->data_ptr<float>();
  }
  if (slab_lse.has_value()) {
    const int slabs = a.block_size * a.head_dim / kSlabElems;
    TORCH_CHECK(slab_lse->is_cuda() && slab_lse->scalar_type() == at::kFloat &&
                    slab_lse->is_contiguous() &&
                    slab_lse->dim() == 3 && slab_lse->size(0) >= key_cache.size(0) &&
                    slab_lse->size(1) == slabs && slab_lse->size(2) == a.num_q_heads,
                "slab_lse must be fp32 contiguous [num_blocks, ", slabs, ", ", a.num_q_heads, "]");
    a.slab_lse = slab_lse->data_ptr<float>();
  }
  if (slab_gate.has_value()) {
    TORCH_CHECK(slab_lse.has_value() && slab_gate->is_cuda() &&
                    slab_gate->scalar_type() == at::kInt && slab_gate->numel() >= 1,
                "slab_gate must be a CUDA int32 flag, given with slab_lse");
    a.slab_gate = slab_gate->data_ptr<int32_t>();
  }

  if (merge_lse.has_value()) {
    TORCH_CHECK(merge_lse->is_cuda() && merge_lse->scalar_type() == at::kFloat &&
                    merge_lse->dim() == 2 && merge_lse->size(0) == a.num_q_heads &&
                    merge_lse->size(1) >= a.num_seqs && merge_lse->stride(1) == 1,
                "merge_lse must be fp32 [q_heads, >= seqs] with contiguous rows");
    a.merge_lse = merge_lse->data_ptr<float>();
    a.merge_lse_stride = merge_lse->stride(0);
  }
  const at::cuda::OptionalCUDAGuard guard(device_of(query));
  torch::Tensor part_acc, part_ml;
  if (a.num_splits > 1) {
    auto f = query.options().dtype(at::kFloat);
    part_acc = torch::empty({a.num_seqs, a.num_q_heads, a.num_splits, a.head_dim}, f);
    part_ml = torch::empty({a.num_seqs, a.num_q_heads, a.num_splits, 2}, f);
    a.part_acc = part_acc.data_ptr<float>();
    a.part_ml = part_ml.data_ptr<float>();
  }
  const auto run = [&](cudaStream_t stream) {
    if (qdt == at::kBFloat16) {
      if (fp8) detail::dispatch_dim<__nv_bfloat16, uint8_t>(a, stream);
      else detail::dispatch_dim<__nv_bfloat16, __nv_bfloat16>(a, stream);
    } else {
      if (fp8) detail::dispatch_dim<__half, uint8_t>(a, stream);
      else detail::dispatch_dim<__half, __half>(a, stream);
    }
  };
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // Merging into `out` with no other output, a call whose rows are all empty changes nothing:
  // a captured graph can then skip its launches (split decode's lo part while nothing is
  // demoted), where the caller says the gate costs less than they do.
  TORCH_CHECK(!skip_empty ||
                  (a.merge_lse != nullptr && a.lse == nullptr && a.slab_lse == nullptr),
              "skip_empty needs merge_lse and neither lse nor slab_lse");
  if (skip_empty) {
    launch_if_any_nonzero(a.seq_lens, a.num_seqs, stream, run);
  } else {
    run(stream);
  }
}

}  // namespace mikv
