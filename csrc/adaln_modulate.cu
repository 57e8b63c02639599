// adaln_modulate forward (DESIGN.md section 5):
//   y = LayerNorm(x) (* weight + bias) * (1 + scale[set]) + shift[set]
// where `set` is the modulation set of the segment a token belongs to (text / video / actions use
// their own (shift, scale) rows of each sample). One block per token row; statistics in fp32.
#include "adaln_modulate.h"
#include "common.cuh"

namespace wam {
namespace {

// The segment layout travels by value in the kernel arguments: no device copy, graph-capturable.
struct SegmentTable {
  int32_t num_segments;
  int32_t ends[WAM_MAX_SEGMENTS];  // exclusive end token of each segment
  int32_t sets[WAM_MAX_SEGMENTS];  // modulation set of each segment
};

constexpr int kMaxThreads = 512;

template <typename T, bool kVectorized>
__global__ void __launch_bounds__(kMaxThreads)
adaln_modulate_kernel(const T* __restrict__ x, const T* __restrict__ shift,
                      const T* __restrict__ scale, const T* __restrict__ weight,
                      const T* __restrict__ bias, T* __restrict__ y, int64_t N, int64_t D,
                      int64_t S, SegmentTable table, float eps) {
  __shared__ float scratch[64];
  constexpr int V = Vec16<T>::kSize;

  const int64_t row = blockIdx.x;  // b * N + n
  const int64_t b = row / N;
  const int64_t n = row - b * N;
  // Segment of this token: the last one whose start is <= n. Unrolled over the fixed maximum so the
  // table stays in registers/constant bank (a dynamic index would copy it to local memory).
  int set = table.sets[0];
#pragma unroll
  for (int s = 1; s < WAM_MAX_SEGMENTS; ++s) {
    if (s < table.num_segments && n >= table.ends[s - 1]) set = table.sets[s];
  }
  const T* xr = x + row * D;
  const T* shift_r = shift + (b * S + set) * D;
  const T* scale_r = scale + (b * S + set) * D;
  T* yr = y + row * D;

  // With kVectorized, D % V == 0 and every pointer is 16-byte aligned, so all rows stay aligned and
  // the vector loop covers the row; otherwise the scalar loop does all of it.
  const int64_t vec_end = kVectorized ? D : 0;

  // Pass 1: sums of (x - pivot) and its square. Shifting by a value of the row avoids the
  // cancellation of E[x^2] - E[x]^2 when |mean| >> std, in one read instead of two.
  const float pivot = to_float(xr[0]);
  float s1 = 0.f, s2 = 0.f;
  for (int64_t i = int64_t(threadIdx.x) * V; i < vec_end; i += int64_t(blockDim.x) * V) {
    const Vec16<T> xv = load16(xr + i);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float d = to_float(xv.v[k]) - pivot;
      s1 += d;
      s2 += d * d;
    }
  }
  for (int64_t i = vec_end + threadIdx.x; i < D; i += blockDim.x) {
    const float d = to_float(xr[i]) - pivot;
    s1 += d;
    s2 += d * d;
  }
  block_sum2(s1, s2, scratch);
  const float mean_shifted = s1 / float(D);
  const float var = fmaxf(s2 / float(D) - mean_shifted * mean_shifted, 0.f);
  const float mean = pivot + mean_shifted;
  const float rstd = rsqrtf(var + eps);

  // Pass 2: normalise, affine, modulate; the row is re-read from L1/L2.
  for (int64_t i = int64_t(threadIdx.x) * V; i < vec_end; i += int64_t(blockDim.x) * V) {
    const Vec16<T> xv = load16(xr + i);
    const Vec16<T> shv = load16(shift_r + i);
    const Vec16<T> scv = load16(scale_r + i);
    Vec16<T> wv, bv, out;
    if (weight) wv = load16(weight + i);
    if (bias) bv = load16(bias + i);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      float h = (to_float(xv.v[k]) - mean) * rstd;
      if (weight) h *= to_float(wv.v[k]);
      if (bias) h += to_float(bv.v[k]);
      out.v[k] = from_float<T>(h * (1.f + to_float(scv.v[k])) + to_float(shv.v[k]));
    }
    store16(yr + i, out);
  }
  for (int64_t i = vec_end + threadIdx.x; i < D; i += blockDim.x) {
    float h = (to_float(xr[i]) - mean) * rstd;
    if (weight) h *= to_float(weight[i]);
    if (bias) h += to_float(bias[i]);
    yr[i] = from_float<T>(h * (1.f + to_float(scale_r[i])) + to_float(shift_r[i]));
  }
}

template <typename T>
cudaError_t launch(const void* x, const void* shift, const void* scale, const void* weight,
                   const void* bias, void* y, int64_t B, int64_t N, int64_t D, int64_t S,
                   const SegmentTable& table, float eps, cudaStream_t stream) {
  constexpr int V = Vec16<T>::kSize;
  const bool vectorized = D % V == 0 && aligned16(x) && aligned16(shift) && aligned16(scale) &&
                          aligned16(y) && (!weight || aligned16(weight)) &&
                          (!bias || aligned16(bias));
  // About one vector (or element) per thread, in whole warps; long rows loop.
  const int64_t units = vectorized ? D / V : D;
  const int threads = int(units >= kMaxThreads ? kMaxThreads : ((units + 31) / 32) * 32);
  const dim3 grid(unsigned(B * N));
  const T* xt = static_cast<const T*>(x);
  const T* sht = static_cast<const T*>(shift);
  const T* sct = static_cast<const T*>(scale);
  const T* wt = static_cast<const T*>(weight);
  const T* bt = static_cast<const T*>(bias);
  T* yt = static_cast<T*>(y);
  if (vectorized) {
    adaln_modulate_kernel<T, true><<<grid, threads, 0, stream>>>(xt, sht, sct, wt, bt, yt, N, D, S,
                                                                  table, eps);
  } else {
    adaln_modulate_kernel<T, false><<<grid, threads, 0, stream>>>(xt, sht, sct, wt, bt, yt, N, D,
                                                                   S, table, eps);
  }
  return cudaGetLastError();
}

}  // namespace
}  // namespace wam

extern "C" cudaError_t wam_adaln_modulate_fwd(wam_dtype dtype, const void* x, const void* shift,
                                              const void* scale, const void* weight,
                                              const void* bias, void* y, int64_t B, int64_t N,
                                              int64_t D, int64_t S, const int32_t* segment_lens,
                                              const int32_t* mod_index, int32_t num_segments,
                                              float eps, cudaStream_t stream) {
  if (B < 0 || N < 0 || D <= 0 || S <= 0 || B * N > 0x7fffffff || N > 0x7fffffff) {
    return cudaErrorInvalidValue;
  }
  if (num_segments < 1 || num_segments > WAM_MAX_SEGMENTS || !segment_lens || !mod_index) {
    return cudaErrorInvalidValue;
  }
  wam::SegmentTable table;
  table.num_segments = num_segments;
  int64_t end = 0;
  for (int s = 0; s < num_segments; ++s) {
    if (segment_lens[s] < 0 || mod_index[s] < 0 || mod_index[s] >= S) return cudaErrorInvalidValue;
    end += segment_lens[s];
    table.ends[s] = int32_t(end > N ? N : end);
    table.sets[s] = mod_index[s];
  }
  if (end != N) return cudaErrorInvalidValue;
  if (B * N == 0) return cudaSuccess;
  if (!x || !shift || !scale || !y) return cudaErrorInvalidValue;

  switch (dtype) {
    case WAM_FLOAT32:
      return wam::launch<float>(x, shift, scale, weight, bias, y, B, N, D, S, table, eps, stream);
    case WAM_FLOAT16:
      return wam::launch<__half>(x, shift, scale, weight, bias, y, B, N, D, S, table, eps, stream);
    case WAM_BFLOAT16:
      return wam::launch<__nv_bfloat16>(x, shift, scale, weight, bias, y, B, N, D, S, table, eps,
                                        stream);
  }
  return cudaErrorInvalidValue;
}
