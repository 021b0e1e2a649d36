// Registers the kernels as torch ops (torch.ops.mikv.*); importing mikv_vllm._C loads them.
#include <torch/all.h>
#include <torch/library.h>
#include <Python.h>

#include "paged_decode.h"

TORCH_LIBRARY(mikv, m) {
  m.def(
      "paged_decode(Tensor(a!) out, Tensor query, Tensor key_cache, Tensor value_cache, "
      "Tensor block_table, Tensor seq_lens, float scale, float k_scale, float v_scale, "
      "int num_splits, int lo_pack_factor, int lo_bits, int lo_group, int mid_pack_factor, "
      "int mid_bits, int outlier_slots, Tensor(b!)? lse=None, "
      "Tensor(c!)? slab_lse=None, Tensor? slab_gate=None, Tensor? merge_lse=None, "
      "bool skip_empty=False) -> ()");
  m.def(
      "page_mass(Tensor(a!) mass, Tensor slab_lse, Tensor block_table, Tensor seq_lens, "
      "Tensor lse, int block_size, int num_kv_heads, float weight) -> ()");
  // No tensor arguments: one kernel for every dispatch key.
  m.def("decode_ctas_per_sm(int head_dim, int group, bool fp8_kv, int lo_bits, "
        "int outlier_slots) -> int",
        &mikv::decode_ctas_per_sm);
  m.def(
      "quantize_pages(Tensor(a!) key_cache, Tensor value_cache, Tensor src_entries, "
      "Tensor dst_codes, float k_scale, float v_scale, int lo_pack_factor, int lo_bits, "
      "int lo_group, int mid_pack_factor, int mid_bits, int outlier_slots) -> ()");
  m.def(
      "split_page_table(Tensor block_table, Tensor seq_lens, int block_size, "
      "Tensor(a!) hi_table, Tensor(b!) hi_lens, Tensor(c!) lo_table, Tensor(d!) lo_lens) -> ()");
}

TORCH_LIBRARY_IMPL(mikv, CUDA, m) {
  m.impl("paged_decode", &mikv::paged_decode);
  m.impl("quantize_pages", &mikv::quantize_pages);
  m.impl("page_mass", &mikv::page_mass);
  m.impl("split_page_table", &mikv::split_page_table);
}

// A Python module with no functions: importing it runs the registrations above.
static struct PyModuleDef mikv_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&mikv_module); }
