// Host-side view of one paged decode launch (shapes, strides, raw pointers).
#pragma once
#include <torch/all.h>
#include <cstdint>
#include <optional>

namespace mikv {

// Elements of a hi-pass slab: a warp's rows per step (1024 / head_dim) times head_dim. A slab
// lies in one page; paged_decode's slab_lse has one entry per slab (mikv_vllm/ops.SLAB_ELEMS).
constexpr int kSlabElems = 1024;

// Flag of a lo-page code (block-table entry -(1 + code)) that names a slot of the middle tier
// (4-bit pages that hi pages visit before the 2-bit tier); mikv_vllm/layout.MID_TIER.
constexpr int32_t kMidTier = 1 << 30;

// Exact key outliers per lo page and KV head: a multiple of 16 (decode adds them in k-steps of
// 16), at most 128 (decode stages a page's words with one 16-byte copy per lane; quantize picks
// them in shared memory); mikv_vllm/layout.key_outlier_slots.
constexpr int kMaxOutlierSlots = 128;
inline bool valid_outlier_slots(int64_t slots) {
  return slots >= 0 && slots % 16 == 0 && slots <= kMaxOutlierSlots;
}

// Where and how this layer's lo (2/4-bit) pages are stored; see mikv_vllm/quant.py.
struct LoLayout {
  const uint8_t* base = nullptr;  // byte 0 of block 0 of the layer's cache
  int64_t block_bytes = 0;        // bytes from one block to the next
  int pack_factor = 1;            // lo pages per block
  uint32_t pack_magic = 0;        // ceil(2^32 / pack_factor): code / pack_factor as a umulhi
  int page_bytes = 0;             // bytes of one lo page (slot stride within a block)
  int bits = 2;                   // 0: no such tier
  int32_t tier_flag = 0;          // the codes of this tier carry this flag (0 or kMidTier)
  int group = 64;                 // value channels per (scale, zero) group
  // section offsets within a lo page (mikv_vllm/layout.py): codes, fp16 scales, int8 zeros,
  // exact key outliers (one 32-bit word each: position t * D + c, fp16 correction above it)
  int v_codes = 0, k_scales = 0, v_scales = 0, k_zeros = 0, v_zeros = 0, k_outliers = 0;
  int outlier_slots = 0;          // exact keys per page and KV head (a multiple of 16; 0: none)
};

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
  LoLayout lo;
  LoLayout mid{nullptr, 0, 0, 0, 0, 0};  // the middle tier's pages (bits 0: no middle tier)
  float* lse = nullptr;     // optional [seqs, q_heads]: log2 of each head's softmax sum
  float* slab_lse = nullptr;  // optional [blocks, block / slab rows, q_heads]: the same per slab
  const int32_t* slab_gate = nullptr;  // optional device flag: write slab_lse only when nonzero
  // optional [q_heads, >= seqs] (row stride merge_lse_stride), natural log: `out` already holds
  // the attention over another part of each row's keys (split decode's hi pages, from
  // FlashAttention) with these log-sum-exps; the kernel merges its own part into it
  const float* merge_lse = nullptr;
  int64_t merge_lse_stride = 0;
  int* ctas_per_sm = nullptr;  // when set: store the kernel's occupancy there, launch nothing
};

// The lo-page layout of a layer whose keys are `key_cache` ([blocks, block, heads, D] view).
LoLayout make_lo_layout(const DecodeArgs& shape, const torch::Tensor& key_cache,
                        int64_t pack_factor, int64_t bits, int64_t group, int64_t outlier_slots);

// The middle tier's layout (bits 0 where `mid_pack_factor` is 0: none), checked against the
// lo tier's.
LoLayout make_mid_layout(const DecodeArgs& shape, const torch::Tensor& key_cache,
                         int64_t lo_pack_factor, int64_t lo_bits, int64_t group,
                         int64_t mid_pack_factor, int64_t mid_bits, int64_t outlier_slots);

// CTAs of the decode kernel for these shapes that one SM holds at once (its registers and
// shared memory decide): ops.decode_num_splits sizes the grid in whole waves of them.
// `lo_bits`: the widest lo tier a table may name (4 where a 4-bit middle tier exists);
// `outlier_slots`: the lo pages' exact keys per head (staged with each tile).
int64_t decode_ctas_per_sm(int64_t head_dim, int64_t group, bool fp8_kv, int64_t lo_bits,
                           int64_t outlier_slots);

void paged_decode(torch::Tensor& out, const torch::Tensor& query, const torch::Tensor& key_cache,
                  const torch::Tensor& value_cache, const torch::Tensor& block_table,
                  const torch::Tensor& seq_lens, double scale, double k_scale, double v_scale,
                  int64_t num_splits, int64_t lo_pack_factor, int64_t lo_bits,
                  int64_t lo_group, int64_t mid_pack_factor, int64_t mid_bits,
                  int64_t outlier_slots, const std::optional<torch::Tensor>& lse,
                  const std::optional<torch::Tensor>& slab_lse,
                  const std::optional<torch::Tensor>& slab_gate,
                  const std::optional<torch::Tensor>& merge_lse, bool skip_empty);

// Adds each hi page's attention mass of one decode step to `mass[block]`, from the slab
// log-sum-exps paged_decode left and the step's `lse` (csrc/page_mass.cu).
void page_mass(torch::Tensor& mass, const torch::Tensor& slab_lse, const torch::Tensor& block_table,
               const torch::Tensor& seq_lens, const torch::Tensor& lse, int64_t block_size,
               int64_t num_kv_heads, double weight);

// Split decode's per-step partition of each row's used pages into a hi-only and a lo-only
// table with their token counts (csrc/split_tables.cu).
void split_page_table(const torch::Tensor& block_table, const torch::Tensor& seq_lens,
                      int64_t block_size, torch::Tensor& hi_table, torch::Tensor& hi_lens,
                      torch::Tensor& lo_table, torch::Tensor& lo_lens);

// Demotes pages into lo slots in place (csrc/quantize.cu): hi pages (`src_entries` >= 0, block
// ids) or lo pages of another tier (block-table codes < 0, requantized from their codes).
void quantize_pages(const torch::Tensor& key_cache, const torch::Tensor& value_cache,
                    const torch::Tensor& src_entries, const torch::Tensor& dst_codes,
                    double k_scale, double v_scale, int64_t lo_pack_factor, int64_t lo_bits,
                    int64_t lo_group, int64_t mid_pack_factor, int64_t mid_bits,
                    int64_t outlier_slots);

}  // namespace mikv

