// Shared device helpers for the fused kernels: dtype conversion, 16-byte vectors, reductions, FP8.
// Pure CUDA (no torch headers) so CI can compile every kernel with nvcc alone. Conversions are the
// explicit intrinsics, so this also compiles under torch's -D__CUDA_NO_HALF_CONVERSIONS__ etc.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "wam_types.h"

#ifdef WAM_HOST_EMULATION
// Test-only build (tests/test_csrc.py): a host compiler runs the kernels on the CPU, one thread per
// CUDA thread. Never defined by nvcc builds.
#include "host_emulation.h"
#define WAM_LAUNCH(kernel, grid, block, stream, args) \
  ((void)(stream), ::wam_emu::launch(kernel, grid, block, args))
#define WAM_CHECK_ALIGNED(p, bytes) ::wam_emu::check_aligned(p, bytes)
#else
// A wide access needs its natural alignment on the GPU; the host emulation checks it here.
#define WAM_CHECK_ALIGNED(p, bytes) ((void)0)
// Launches `kernel` (a __global__ function or a pointer to one) and returns the launch status.
#define WAM_LAUNCH(kernel, grid, block, stream, args) \
  (kernel<<<(grid), (block), 0, (stream)>>>(args), cudaGetLastError())
#endif

namespace wam {

// Math is done in fp32 whatever the storage type.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// One 16-byte load or store: 8 bf16/fp16 or 4 fp32 elements.
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

template <typename T>
__device__ __forceinline__ Vec16<T> load16(const T* p) {
  WAM_CHECK_ALIGNED(p, 16);
  Vec16<T> out;
  *reinterpret_cast<uint4*>(&out) = __ldg(reinterpret_cast<const uint4*>(p));
  return out;
}

template <typename T>
__device__ __forceinline__ void store16(T* p, const Vec16<T>& value) {
  WAM_CHECK_ALIGNED(p, 16);
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&value);
}

__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// W consecutive elements as fp32. W == Vec16<T>::kSize is one 16-byte load (p must be 16-byte
// aligned); any other W is W scalar loads (no alignment beyond the element's).
template <int W, typename T>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[W]) {
  if constexpr (W == Vec16<T>::kSize) {
    const Vec16<T> v = load16(p);
#pragma unroll
    for (int k = 0; k < W; ++k) out[k] = to_float(v.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < W; ++k) out[k] = to_float(p[k]);
  }
}

// Stores W values rounded to T (to nearest even), with the same alignment rule as load_floats.
template <int W, typename T>
__device__ __forceinline__ void store_values(T* p, const T (&values)[W]) {
  if constexpr (W == Vec16<T>::kSize) {
    Vec16<T> v;
#pragma unroll
    for (int k = 0; k < W; ++k) v.v[k] = values[k];
    store16(p, v);
  } else {
#pragma unroll
    for (int k = 0; k < W; ++k) p[k] = values[k];
  }
}

// Two floats rounded (to nearest even) into one 32-bit word of 16-bit T, the first in the low half
// (the lower address): one cvt.rn.{bf16x2,f16x2}.f32.
__device__ __forceinline__ uint32_t pack2(float lo, float hi, __half) {
  const __half2 h = __floats2half2_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &h, sizeof(u));
  return u;
}
__device__ __forceinline__ uint32_t pack2(float lo, float hi, __nv_bfloat16) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &h, sizeof(u));
  return u;
}

template <int W, typename T>
__device__ __forceinline__ void store_floats(T* p, const float (&values)[W]) {
  if constexpr (W == Vec16<T>::kSize) {
    uint4 out;
    uint32_t* words = reinterpret_cast<uint32_t*>(&out);
    if constexpr (sizeof(T) == 2) {
#pragma unroll
      for (int k = 0; k < W / 2; ++k) words[k] = pack2(values[2 * k], values[2 * k + 1], T());
    } else {
#pragma unroll
      for (int k = 0; k < W; ++k) words[k] = __float_as_uint(values[k]);
    }
    WAM_CHECK_ALIGNED(p, 16);
    *reinterpret_cast<uint4*>(p) = out;
  } else {
#pragma unroll
    for (int k = 0; k < W; ++k) p[k] = from_float<T>(values[k]);
  }
}

// W float32 values: float4 loads when W % 4 == 0 (p must then be 16-byte aligned), else scalar.
template <int W>
__device__ __forceinline__ void load_f32(const float* p, float (&out)[W]) {
  if constexpr (W % 4 == 0) {
#pragma unroll
    for (int k = 0; k < W; k += 4) {
      WAM_CHECK_ALIGNED(p + k, 16);
      const float4 v = __ldg(reinterpret_cast<const float4*>(p + k));
      out[k] = v.x;
      out[k + 1] = v.y;
      out[k + 2] = v.z;
      out[k + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int k = 0; k < W; ++k) out[k] = __ldg(p + k);
  }
}

// max that propagates NaN (as torch's amax does); fmaxf would drop it.
__device__ __forceinline__ float max_nan(float a, float b) { return (a > b || a != a) ? a : b; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max_nan(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v = max_nan(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

// Sum over aligned groups of `lanes` lanes (a power of two <= 32) of a warp; every lane of the warp
// must call it (it shuffles over the full mask) and gets its group's total.
__device__ __forceinline__ float group_sum(float v, int lanes) {
  for (int offset = lanes >> 1; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Block-wide sum / NaN-propagating max; every thread gets the total. blockDim.x must be a multiple
// of 32 and every thread of the block must call it. `scratch` is 32 floats that no other reduction
// of the same kernel uses (so no __syncthreads is needed between consecutive reductions).
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int num_warps = blockDim.x >> 5;
  v = warp_sum(v);
  if (num_warps == 1) return v;  // uniform over the block
  const int lane = threadIdx.x & 31;
  if (lane == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  v = lane < num_warps ? scratch[lane] : 0.f;
  return warp_sum(v);
}

__device__ __forceinline__ float block_max_nan(float v, float* scratch) {
  const int num_warps = blockDim.x >> 5;
  v = warp_max_nan(v);
  if (num_warps == 1) return v;
  const int lane = threadIdx.x & 31;
  if (lane == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  v = lane < num_warps ? scratch[lane] : __int_as_float(0xff800000);  // -inf
  return warp_max_nan(v);
}

// Sums a and b over the block and gives every thread the totals. `scratch` holds 2 x 32 floats,
// with the same rules as block_sum.
__device__ __forceinline__ void block_sum2(float& a, float& b, float* scratch) {
  a = block_sum(a, scratch);
  b = block_sum(b, scratch + 32);
}

// ---- FP8 e4m3 (functional.quantize_rowwise) -----------------------------------------------------
// Per-row scale from the row's amax of |y|: max(amax / 448, 1e-12); a NaN amax gives a NaN scale.
__device__ __forceinline__ float fp8_row_scale(float amax) {
  const float s = __fdiv_rn(amax, WAM_FP8_E4M3_MAX);
  return s < WAM_FP8_MIN_SCALE ? WAM_FP8_MIN_SCALE : s;  // NaN < x is false: NaN stays
}

__device__ __forceinline__ __nv_fp8x2_storage_t fp8x2(float lo, float hi) {
  // cvt.rn.satfinite.e4m3x2.f32 on sm_89+: round to nearest even, saturate to +-448, NaN -> NaN.
  return __nv_cvt_float2_to_fp8x2(make_float2(lo, hi), __NV_SATFINITE, __NV_E4M3);
}

// Stores e4m3(values[k] / scale) for W = 1, 2, 4 or 8 consecutive bytes; p must be aligned to
// W bytes (W > 1). IEEE division (not a reciprocal multiply), as torch's x / scale.
template <int W>
__device__ __forceinline__ void store_fp8(uint8_t* p, const float (&values)[W], float scale) {
  float q[W];
#pragma unroll
  for (int k = 0; k < W; ++k) q[k] = __fdiv_rn(values[k], scale);
  WAM_CHECK_ALIGNED(p, W);
  if constexpr (W == 1) {
    *p = __nv_cvt_float_to_fp8(q[0], __NV_SATFINITE, __NV_E4M3);
  } else if constexpr (W == 2) {
    *reinterpret_cast<uint16_t*>(p) = fp8x2(q[0], q[1]);
  } else if constexpr (W == 4) {
    *reinterpret_cast<uint32_t*>(p) =
        uint32_t(fp8x2(q[0], q[1])) | (uint32_t(fp8x2(q[2], q[3])) << 16);
  } else {
    static_assert(W == 8, "store_fp8: W must be 1, 2, 4 or 8");
    uint2 packed;
    packed.x = uint32_t(fp8x2(q[0], q[1])) | (uint32_t(fp8x2(q[2], q[3])) << 16);
    packed.y = uint32_t(fp8x2(q[4], q[5])) | (uint32_t(fp8x2(q[6], q[7])) << 16);
    *reinterpret_cast<uint2*>(p) = packed;
  }
}

}  // namespace wam
