// qk_norm_rope forward (docs/design.md, Ops): affine LayerNorm over head_dim on q and k, then
// interleaved RoPE on the tokens [rope_start, rope_end) only, both tensors in one launch
// (blockIdx.y: 0 = q, 1 = k).
//
// A row (b, h, n) of hd <= 256 elements is handled by a group of `lanes` lanes of a warp (a power
// of two, <= 32; hd = 64 in bf16 is 8 vectors of 16 bytes, so 8 lanes and 4 rows per warp), each
// lane holding kItems units of W elements in registers: W = 16 bytes of T when hd, every row start
// and every table are 16-byte aligned, else W = 2 (one RoPE pair, scalar loads). Statistics are the
// exact two-pass mean / variance over the registers, reduced with shuffles inside the group: one
// read of q/k, one write of the outputs, no shared memory, no __syncthreads.
#include <cstdint>

#include "common.cuh"
#include "qk_norm_rope.h"

namespace wam {
namespace {

constexpr int kThreads = 256;  // 8 warps; rows per block = kThreads / lanes

template <typename T>
struct QkArgs {
  const T* src[2];          // q, k: (B, H, N, hd) strided
  int64_t strides[2][3];    // (b, h, n) strides of q and k, in elements
  const T* weight[2];       // (hd) or nullptr
  const T* bias[2];         // (hd) or nullptr
  T* out[2];                // (B, H, N, hd) contiguous
  const float* cos;         // (rope_end - rope_start, hd)
  const float* sin;
  int64_t H, N, rows;       // rows = B * H * N
  int32_t hd, lanes;
  int64_t rope_start, rope_end;
  float eps;
};

template <typename T, int W, int kItems>
__global__ void __launch_bounds__(kThreads) qk_norm_rope_kernel(const QkArgs<T> a) {
  // q or k: uniform over the block; selecting with the constant index keeps the arguments in the
  // parameter bank.
  const int which = blockIdx.y;
  const T* src = which ? a.src[1] : a.src[0];
  const int64_t sb = which ? a.strides[1][0] : a.strides[0][0];
  const int64_t sh = which ? a.strides[1][1] : a.strides[0][1];
  const int64_t sn = which ? a.strides[1][2] : a.strides[0][2];
  const T* weight = which ? a.weight[1] : a.weight[0];
  const T* bias = which ? a.bias[1] : a.bias[0];
  T* out = which ? a.out[1] : a.out[0];

  const int lanes = a.lanes;
  const int lane = threadIdx.x & (lanes - 1);
  const int64_t row = int64_t(blockIdx.x) * (kThreads / lanes) + threadIdx.x / lanes;
  // Lanes past the last row still take part in the shuffles (full-warp masks), with no memory
  // access.
  const bool valid = row < a.rows;
  const int hd = a.hd;
  const int units = hd / W;

  int64_t n = 0, h = 0, b = 0;
  if (valid) {
    n = row % a.N;
    const int64_t bh = row / a.N;
    h = bh % a.H;
    b = bh / a.H;
  }
  const T* x = src + b * sb + h * sh + n * sn;

  float v[kItems][W];
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int u = lane + j * lanes;
    if (valid && u < units) {
      load_floats<W>(x + u * W, v[j]);
#pragma unroll
      for (int k = 0; k < W; ++k) sum += v[j][k];
    } else {
#pragma unroll
      for (int k = 0; k < W; ++k) v[j][k] = 0.f;
    }
  }
  const float mean = group_sum(sum, lanes) / float(hd);
  float sq = 0.f;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int u = lane + j * lanes;
    if (valid && u < units) {
#pragma unroll
      for (int k = 0; k < W; ++k) {
        const float d = v[j][k] - mean;
        sq += d * d;
      }
    }
  }
  const float rstd = rsqrtf(group_sum(sq, lanes) / float(hd) + a.eps);
  if (!valid) return;  // after the last shuffle

  const bool rope = n >= a.rope_start && n < a.rope_end;
  const float* cos_row = a.cos + (rope ? (n - a.rope_start) * hd : 0);
  const float* sin_row = a.sin + (rope ? (n - a.rope_start) * hd : 0);
  T* y = out + row * hd;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int u = lane + j * lanes;
    if (u < units) {
      const int e = u * W;
      float w[W] = {}, bb[W] = {}, o[W];
      if (weight) load_floats<W>(weight + e, w);
      if (bias) load_floats<W>(bias + e, bb);
#pragma unroll
      for (int k = 0; k < W; ++k) {
        o[k] = (v[j][k] - mean) * rstd;
        if (weight) o[k] *= w[k];
        if (bias) o[k] += bb[k];
      }
      if (rope) {
        float c[W], s[W];
        load_f32<W>(cos_row + e, c);
        load_f32<W>(sin_row + e, s);
#pragma unroll
        for (int k = 0; k < W; k += 2) {
          const float x0 = o[k], x1 = o[k + 1];
          o[k] = x0 * c[k] - x1 * s[k];
          o[k + 1] = x1 * c[k + 1] + x0 * s[k + 1];
        }
      }
      store_floats<W>(y + e, o);
    }
  }
}

template <typename T, int W>
cudaError_t launch_width(const QkArgs<T>& a, int items, cudaStream_t stream) {
  const dim3 block(kThreads);
  const int64_t rows_per_block = kThreads / a.lanes;
  const dim3 grid(static_cast<unsigned>((a.rows + rows_per_block - 1) / rows_per_block), 2);
  // Only the reachable item counts are instantiated: hd <= 256 is at most 256 / W units over 32
  // lanes.
  constexpr int kMaxItems = (256 / W + 31) / 32;
  void (*kernel)(QkArgs<T>) = qk_norm_rope_kernel<T, W, 1>;
  if constexpr (kMaxItems >= 2) {
    if (items == 2) kernel = qk_norm_rope_kernel<T, W, 2>;
  }
  if constexpr (kMaxItems >= 4) {
    if (items == 4) kernel = qk_norm_rope_kernel<T, W, 4>;
  }
  if (items > kMaxItems) return cudaErrorInvalidValue;  // unreachable for hd <= 256
  return WAM_LAUNCH(kernel, grid, block, stream, a);
}

template <typename T>
cudaError_t launch(QkArgs<T> a, bool has_rope, cudaStream_t stream) {
  constexpr int V = Vec16<T>::kSize;
  auto ok = [](const void* p) { return p == nullptr || aligned16(p); };
  bool vectorized = a.hd % V == 0 && ok(a.out[0]) && ok(a.out[1]) &&
                    (!has_rope || (ok(a.cos) && ok(a.sin)));
  for (int t = 0; t < 2; ++t) {
    vectorized = vectorized && ok(a.src[t]) && ok(a.weight[t]) && ok(a.bias[t]);
    for (int d = 0; d < 3; ++d) vectorized = vectorized && a.strides[t][d] % V == 0;
  }
  // hd <= 256: units <= 64 (vectors, fp32) or <= 128 (pairs). Lanes: the power of two covering the
  // units, at most a warp; items: the rest, rounded up to 1, 2 or 4.
  const int W = vectorized ? V : 2;
  const int units = a.hd / W;
  int lanes = 1;
  while (lanes < 32 && lanes < units) lanes *= 2;
  const int need = (units + lanes - 1) / lanes;
  const int items = need <= 1 ? 1 : need <= 2 ? 2 : 4;
  a.lanes = lanes;
  return vectorized ? launch_width<T, V>(a, items, stream) : launch_width<T, 2>(a, items, stream);
}

template <typename T>
cudaError_t run(const void* q, const int64_t q_strides[3], const void* k,
                const int64_t k_strides[3], const void* q_weight, const void* q_bias,
                const void* k_weight, const void* k_bias, const float* cos, const float* sin,
                void* q_out, void* k_out, int64_t H, int64_t N, int64_t rows, int64_t hd,
                int64_t rope_start, int64_t rope_end, float eps, cudaStream_t stream) {
  QkArgs<T> a;
  a.src[0] = static_cast<const T*>(q);
  a.src[1] = static_cast<const T*>(k);
  for (int d = 0; d < 3; ++d) {
    a.strides[0][d] = q_strides[d];
    a.strides[1][d] = k_strides[d];
  }
  a.weight[0] = static_cast<const T*>(q_weight);
  a.weight[1] = static_cast<const T*>(k_weight);
  a.bias[0] = static_cast<const T*>(q_bias);
  a.bias[1] = static_cast<const T*>(k_bias);
  a.out[0] = static_cast<T*>(q_out);
  a.out[1] = static_cast<T*>(k_out);
  a.cos = cos;
  a.sin = sin;
  a.H = H;
  a.N = N;
  a.rows = rows;
  a.hd = int32_t(hd);
  a.lanes = 1;  // set by launch
  a.rope_start = rope_start;
  a.rope_end = rope_end;
  a.eps = eps;
  return launch(a, rope_end > rope_start, stream);
}

}  // namespace
}  // namespace wam

extern "C" cudaError_t wam_qk_norm_rope_fwd(wam_dtype dtype, const void* q,
                                            const int64_t q_strides[3], const void* k,
                                            const int64_t k_strides[3], const void* q_weight,
                                            const void* q_bias, const void* k_weight,
                                            const void* k_bias, const float* cos, const float* sin,
                                            void* q_out, void* k_out, int64_t B, int64_t H,
                                            int64_t N, int64_t hd, int64_t rope_start,
                                            int64_t rope_end, float eps, cudaStream_t stream) {
  if (B < 0 || H < 0 || N < 0 || hd < 2 || hd > 256 || hd % 2 != 0) return cudaErrorInvalidValue;
  if (rope_start < 0 || rope_end < rope_start || rope_end > N) return cudaErrorInvalidValue;
  if (!(eps >= 0.f) || !q_strides || !k_strides) return cudaErrorInvalidValue;
  // The grid's x is rows / (rows per block >= kThreads / 32 = 8): at most 2^31 - 1 blocks.
  if ((H > 0 && B > INT64_MAX / H) || (B * H > 0 && N > INT64_MAX / (B * H))) {
    return cudaErrorInvalidValue;
  }
  const int64_t rows = B * H * N;
  if ((rows + 7) / 8 > 0x7fffffff) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  const bool has_rope = rope_end > rope_start;
  if (!q || !k || !q_out || !k_out || (has_rope && (!cos || !sin))) return cudaErrorInvalidValue;

  switch (dtype) {
    case WAM_FLOAT32:
      return wam::run<float>(q, q_strides, k, k_strides, q_weight, q_bias, k_weight, k_bias, cos,
                             sin, q_out, k_out, H, N, rows, hd, rope_start, rope_end, eps, stream);
    case WAM_FLOAT16:
      return wam::run<__half>(q, q_strides, k, k_strides, q_weight, q_bias, k_weight, k_bias, cos,
                              sin, q_out, k_out, H, N, rows, hd, rope_start, rope_end, eps, stream);
    case WAM_BFLOAT16:
      return wam::run<__nv_bfloat16>(q, q_strides, k, k_strides, q_weight, q_bias, k_weight,
                                     k_bias, cos, sin, q_out, k_out, H, N, rows, hd, rope_start,
                                     rope_end, eps, stream);
  }
  return cudaErrorInvalidValue;
}
