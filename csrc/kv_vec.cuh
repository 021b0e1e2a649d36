// Device helpers shared by the kernels that read hi pages: one lane's 8 elements of a K/V row
// as one vector load, converted to fp32.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <type_traits>

namespace mikv {
namespace detail {

constexpr int kElems = 8;  // elements of one row held by one lane

// 8 cache elements as one vector load.
template <typename kv_t> struct RowVec { using type = uint4; };    // 8 x 16-bit = 16 B
template <> struct RowVec<uint8_t> { using type = uint2; };         // 8 x fp8 = 8 B

__device__ __forceinline__ float2 to_float2(__nv_bfloat162 x) { return __bfloat1622float2(x); }
__device__ __forceinline__ float2 to_float2(__half2 x) { return __half22float2(x); }

// 8 x bf16 or fp16 (the element type picks the pair type and its conversion).
template <typename kv_t>
__device__ __forceinline__ void to_float8(const uint4& r, float* f, const kv_t*) {
  using pair_t = std::conditional_t<std::is_same_v<kv_t, __half>, __half2, __nv_bfloat162>;
  const pair_t* p = reinterpret_cast<const pair_t*>(&r);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 x = to_float2(p[i]);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}
__device__ __forceinline__ void to_float8(const uint2& r, float* f, const uint8_t*) {
  const __nv_fp8x2_storage_t* p = reinterpret_cast<const __nv_fp8x2_storage_t*>(&r);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(p[i], __NV_E4M3);
    float2 x = to_float2(*reinterpret_cast<const __half2*>(&h));
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}

__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

}  // namespace detail
}  // namespace mikv
