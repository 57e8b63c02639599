// The row kernel shared by adaln_modulate.cu and gated_residual_adaln.cu (each instantiates its own
// variant through kResidual):
//   [kResidual] r = residual + gate[set] * x, rounded to T and written; the row is then that r
//   y = LayerNorm(row) (* weight + bias) * (1 + scale[set]) + shift[set]
//   output: y in T, or FP8 e4m3 with a per-row scale (functional.quantize_rowwise semantics)
//
// One token row per block. The row is loaded once into registers (kItems units of W elements per
// thread; W = 16 bytes of T when D % W == 0 and every pointer is 16-byte aligned, else W = 1), so
// the statistics are the exact two-pass mean / variance over the registers and the FP8 amax comes
// from the same registers: one read of every input, one write of every output. Rows too long for
// the registers (more than kMaxThreads * kMaxItems units) take a scalar kernel that re-reads the
// row (from L1/L2) in each pass.
#pragma once

#include "common.cuh"

namespace wam {

// The segment layout travels by value in the kernel arguments: no device copy, graph-capturable.
struct SegmentTable {
  int32_t num_segments;
  int32_t ends[WAM_MAX_SEGMENTS];  // exclusive end token of each segment
  int32_t sets[WAM_MAX_SEGMENTS];  // modulation set of each segment
};

// Modulation set of token n: that of the last segment starting at or before n. Unrolled over the
// fixed maximum so the table stays in the parameter bank (a dynamic index would copy it to local
// memory). Empty segments are harmless: their end equals the next one's start.
__device__ __forceinline__ int segment_set(const SegmentTable& table, int64_t n) {
  int set = table.sets[0];
#pragma unroll
  for (int s = 1; s < WAM_MAX_SEGMENTS; ++s) {
    if (s < table.num_segments && n >= table.ends[s - 1]) set = table.sets[s];
  }
  return set;
}

// Host: validates a layout and builds its table; false when inconsistent (count out of 1..8, a
// negative length, a set outside [0, S), lengths not summing to N).
inline bool make_segment_table(const int32_t* segment_lens, const int32_t* mod_index,
                               int32_t num_segments, int64_t N, int64_t S, SegmentTable* table) {
  if (num_segments < 1 || num_segments > WAM_MAX_SEGMENTS || !segment_lens || !mod_index) {
    return false;
  }
  table->num_segments = num_segments;
  int64_t end = 0;
  for (int s = 0; s < WAM_MAX_SEGMENTS; ++s) {
    table->ends[s] = 0;
    table->sets[s] = 0;
  }
  for (int s = 0; s < num_segments; ++s) {
    if (segment_lens[s] < 0 || mod_index[s] < 0 || mod_index[s] >= S) return false;
    end += segment_lens[s];
    if (end > N) return false;
    table->ends[s] = int32_t(end);
    table->sets[s] = mod_index[s];
  }
  return end == N;
}

template <typename T>
struct AdalnArgs {
  const T* residual;  // (B, N, D), kResidual only
  const T* x;         // (B, N, D)
  const T* gate;      // (B, S, D), kResidual only
  const T* shift;     // (B, S, D)
  const T* scale;     // (B, S, D)
  const T* weight;    // (D) or nullptr
  const T* bias;      // (D) or nullptr
  T* r;               // (B, N, D), kResidual only
  T* y;               // (B, N, D) in T, or nullptr when y_fp8 is set
  uint8_t* y_fp8;     // (B, N, D) e4m3, or nullptr
  float* y_scale;     // (B * N), set together with y_fp8
  int64_t N, D, S;
  float eps;
  SegmentTable table;
};

constexpr int kRowMaxThreads = 512;
constexpr int kRowMaxItems = 8;

// Resident blocks of kRowMaxThreads per SM that each register kernel is built for: the register
// budget is 64K / (512 x this) = 40 (1 item), 64 (2 or 4 items) or 128 (8 items) per thread. Stated
// explicitly because with a bare __launch_bounds__(512) ptxas picks an occupancy step of its own
// and, when the code is a couple of registers over it, spills to reach it (the values live across
// the IEEE-division slow-path call of the mean / variance / FP8 divisions). Each budget here holds
// its kernel without spilling (CI fails on any spill); only fp32 with 2 items needs 48 registers.
template <int kItems>
constexpr int row_min_blocks() {
  return kItems == 1 ? 3 : kItems <= 4 ? 2 : 1;
}

template <typename T, int W, int kItems, bool kResidual>
__global__ void __launch_bounds__(kRowMaxThreads, row_min_blocks<kItems>())
adaln_rows_kernel(const AdalnArgs<T> a) {
  __shared__ float scratch[3][32];  // one per block reduction: sum, squared deviations, amax

  const int64_t row = blockIdx.x;  // b * N + n < 2^31 (checked on the host): 32-bit division
  const int64_t b = int32_t(blockIdx.x) / int32_t(a.N);
  const int64_t n = row - b * a.N;
  const int set = segment_set(a.table, n);
  // D < 2^31 (checked on the host): offsets within a row are 32-bit; only the row / set bases are
  // 64-bit. (64-bit unit indices cost a register pair each, kept live across the whole kernel.)
  const int D = int(a.D);
  const int units = D / W;  // exact: W == 1 or D % W == 0
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int64_t row_off = row * a.D;
  const int64_t set_off = (b * a.S + set) * a.D;
  const T* x_row = a.x + row_off;
  const T* shift_row = a.shift + set_off;
  const T* scale_row = a.scale + set_off;

  // Load (and for kResidual form, round and write r); units past the row hold 0 and stay out of
  // every sum below.
  float v[kItems][W];
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int u = tid + j * nthreads;
    if (u < units) {
      const int i = u * W;
      load_floats<W>(x_row + i, v[j]);
      if constexpr (kResidual) {
        float res[W], g[W];
        T rt[W];
        load_floats<W>(a.residual + row_off + i, res);
        load_floats<W>(a.gate + set_off + i, g);
#pragma unroll
        for (int k = 0; k < W; ++k) {
          // mul then add, each rounded (no fma contraction), as torch's residual + gate * x.
          rt[k] = from_float<T>(__fadd_rn(res[k], __fmul_rn(g[k], v[j][k])));
          v[j][k] = to_float(rt[k]);  // the normalisation sees the stored (rounded) r
        }
        store_values<W>(a.r + row_off + i, rt);
      }
#pragma unroll
      for (int k = 0; k < W; ++k) sum += v[j][k];
    } else {
#pragma unroll
      for (int k = 0; k < W; ++k) v[j][k] = 0.f;
    }
  }
  const float mean = block_sum(sum, scratch[0]) / float(D);

  float sq = 0.f;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int u = tid + j * nthreads;
    if (u < units) {
#pragma unroll
      for (int k = 0; k < W; ++k) {
        const float d = v[j][k] - mean;
        sq += d * d;
      }
    }
  }
  const float var = block_sum(sq, scratch[1]) / float(D);
  const float rstd = rsqrtf(var + a.eps);

  const bool fp8 = a.y_fp8 != nullptr;  // uniform over the grid
  float amax = 0.f;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int u = tid + j * nthreads;
    if (u < units) {
      const int i = u * W;
      float sh[W], sc[W], w[W] = {}, bb[W] = {};
      load_floats<W>(shift_row + i, sh);
      load_floats<W>(scale_row + i, sc);
      if (a.weight) load_floats<W>(a.weight + i, w);
      if (a.bias) load_floats<W>(a.bias + i, bb);
#pragma unroll
      for (int k = 0; k < W; ++k) {
        float h = (v[j][k] - mean) * rstd;
        if (a.weight) h *= w[k];
        if (a.bias) h += bb[k];
        v[j][k] = h * (1.f + sc[k]) + sh[k];
        amax = max_nan(amax, fabsf(v[j][k]));
      }
      if (!fp8) store_floats<W>(a.y + row_off + i, v[j]);
    }
  }
  if (!fp8) return;  // uniform: every thread of the block leaves together

  const float y_scale = fp8_row_scale(block_max_nan(amax, scratch[2]));
  if (threadIdx.x == 0) a.y_scale[row] = y_scale;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int u = tid + j * nthreads;
    if (u < units) store_fp8<W>(a.y_fp8 + row_off + u * W, v[j], y_scale);
  }
}

// Rows longer than the register kernel takes: scalar, one pass per statistic, the row re-read from
// L1/L2 each time (r is recomputed, bit-identical, rather than read back).
template <typename T, bool kResidual>
__device__ __forceinline__ float row_value(const AdalnArgs<T>& a, int64_t row_off, int64_t set_off,
                                           int64_t i) {
  const float xv = to_float(a.x[row_off + i]);
  if constexpr (kResidual) {
    const float g = to_float(a.gate[set_off + i]);
    const float res = to_float(a.residual[row_off + i]);
    return to_float(from_float<T>(__fadd_rn(res, __fmul_rn(g, xv))));
  } else {
    return xv;
  }
}

template <typename T, bool kResidual>
__global__ void __launch_bounds__(kRowMaxThreads)
adaln_rows_loop_kernel(const AdalnArgs<T> a) {
  __shared__ float scratch[3][32];
  const int64_t row = blockIdx.x;
  const int64_t b = int32_t(blockIdx.x) / int32_t(a.N);
  const int64_t n = row - b * a.N;
  const int set = segment_set(a.table, n);
  const int64_t D = a.D;
  const int64_t row_off = row * D;
  const int64_t set_off = (b * a.S + set) * D;

  float sum = 0.f;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    const float v = row_value<T, kResidual>(a, row_off, set_off, i);
    if constexpr (kResidual) a.r[row_off + i] = from_float<T>(v);  // v is already rounded to T
    sum += v;
  }
  const float mean = block_sum(sum, scratch[0]) / float(D);
  float sq = 0.f;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    const float d = row_value<T, kResidual>(a, row_off, set_off, i) - mean;
    sq += d * d;
  }
  const float rstd = rsqrtf(block_sum(sq, scratch[1]) / float(D) + a.eps);

  const bool fp8 = a.y_fp8 != nullptr;
  float amax = 0.f;
  // Pass 3 writes y (or finds the amax); with FP8, pass 4 recomputes y and writes it.
  for (int pass = 0; pass < (fp8 ? 2 : 1); ++pass) {
    const float y_scale = pass == 1 ? fp8_row_scale(block_max_nan(amax, scratch[2])) : 1.f;
    if (pass == 1 && threadIdx.x == 0) a.y_scale[row] = y_scale;
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
      float h = (row_value<T, kResidual>(a, row_off, set_off, i) - mean) * rstd;
      if (a.weight) h *= to_float(a.weight[i]);
      if (a.bias) h += to_float(a.bias[i]);
      const float y = h * (1.f + to_float(a.scale[set_off + i])) + to_float(a.shift[set_off + i]);
      if (!fp8) {
        a.y[row_off + i] = from_float<T>(y);
      } else if (pass == 0) {
        amax = max_nan(amax, fabsf(y));
      } else {
        const float one[1] = {y};
        store_fp8<1>(a.y_fp8 + row_off + i, one, y_scale);
      }
    }
  }
}

template <typename T, int W, bool kResidual>
cudaError_t launch_rows_items(const AdalnArgs<T>& a, int64_t rows, int64_t units,
                              cudaStream_t stream) {
  // The fewest items per thread that keep the block at <= kRowMaxThreads; about one item per
  // thread for D = 3072 (384 threads in bf16, 768 units -> 384 threads x 2 in fp32).
  int items = 1;
  while (items < kRowMaxItems && units > int64_t(kRowMaxThreads) * items) items *= 2;
  const int64_t per_item = (units + items - 1) / items;
  const int threads = int((per_item + 31) / 32 * 32);
  void (*kernel)(AdalnArgs<T>) = adaln_rows_kernel<T, W, 8, kResidual>;
  if (items == 1) kernel = adaln_rows_kernel<T, W, 1, kResidual>;
  if (items == 2) kernel = adaln_rows_kernel<T, W, 2, kResidual>;
  if (items == 4) kernel = adaln_rows_kernel<T, W, 4, kResidual>;
  return WAM_LAUNCH(kernel, dim3(static_cast<unsigned>(rows)), dim3(threads), stream, a);
}

template <typename T, bool kResidual>
cudaError_t launch_rows(const AdalnArgs<T>& a, int64_t rows, cudaStream_t stream) {
  constexpr int V = Vec16<T>::kSize;
  auto ok = [](const void* p) { return p == nullptr || aligned16(p); };
  const bool vectorized = a.D % V == 0 && ok(a.residual) && ok(a.x) && ok(a.gate) && ok(a.shift) &&
                          ok(a.scale) && ok(a.weight) && ok(a.bias) && ok(a.r) && ok(a.y) &&
                          ok(a.y_fp8);
  const int64_t units = vectorized ? a.D / V : a.D;
  if (units > int64_t(kRowMaxThreads) * kRowMaxItems) {
    void (*kernel)(AdalnArgs<T>) = adaln_rows_loop_kernel<T, kResidual>;
    return WAM_LAUNCH(kernel, dim3(static_cast<unsigned>(rows)), dim3(kRowMaxThreads), stream, a);
  }
  return vectorized ? launch_rows_items<T, V, kResidual>(a, rows, units, stream)
                    : launch_rows_items<T, 1, kResidual>(a, rows, units, stream);
}

// Host: checks the sizes shared by both ops and dispatches on dtype. Pointers of `a` are still
// void-typed here (Any = const void* / void*), filled in per dtype.
struct AdalnRawArgs {
  wam_dtype dtype;
  const void *residual, *x, *gate, *shift, *scale, *weight, *bias;
  void *r, *y;
  float* y_scale;
  int64_t B, N, D, S;
  float eps;
};

template <typename T>
AdalnArgs<T> typed_args(const AdalnRawArgs& raw, const SegmentTable& table) {
  AdalnArgs<T> a;
  a.residual = static_cast<const T*>(raw.residual);
  a.x = static_cast<const T*>(raw.x);
  a.gate = static_cast<const T*>(raw.gate);
  a.shift = static_cast<const T*>(raw.shift);
  a.scale = static_cast<const T*>(raw.scale);
  a.weight = static_cast<const T*>(raw.weight);
  a.bias = static_cast<const T*>(raw.bias);
  a.r = static_cast<T*>(raw.r);
  a.y = raw.y_scale ? nullptr : static_cast<T*>(raw.y);
  a.y_fp8 = raw.y_scale ? static_cast<uint8_t*>(raw.y) : nullptr;
  a.y_scale = raw.y_scale;
  a.N = raw.N;
  a.D = raw.D;
  a.S = raw.S;
  a.eps = raw.eps;
  a.table = table;
  return a;
}

template <bool kResidual>
cudaError_t adaln_rows_fwd(const AdalnRawArgs& raw, const int32_t* segment_lens,
                           const int32_t* mod_index, int32_t num_segments, cudaStream_t stream) {
  // B * N rows is the grid's x dimension (< 2^31); D < 2^31 keeps float(D) and the thread math
  // simple (rows are at most a few thousand wide in practice).
  if (raw.B < 0 || raw.N < 0 || raw.D <= 0 || raw.S <= 0 || raw.N > 0x7fffffff ||
      raw.D > 0x7fffffff || (raw.N > 0 && raw.B > 0x7fffffff / raw.N)) {
    return cudaErrorInvalidValue;
  }
  if (!(raw.eps >= 0.f)) return cudaErrorInvalidValue;  // also refuses NaN
  SegmentTable table;
  if (!make_segment_table(segment_lens, mod_index, num_segments, raw.N, raw.S, &table)) {
    return cudaErrorInvalidValue;
  }
  const int64_t rows = raw.B * raw.N;
  if (rows == 0) return cudaSuccess;
  if (!raw.x || !raw.shift || !raw.scale || !raw.y) return cudaErrorInvalidValue;
  if (kResidual && (!raw.residual || !raw.gate || !raw.r)) return cudaErrorInvalidValue;

  switch (raw.dtype) {
    case WAM_FLOAT32:
      return launch_rows<float, kResidual>(typed_args<float>(raw, table), rows, stream);
    case WAM_FLOAT16:
      return launch_rows<__half, kResidual>(typed_args<__half>(raw, table), rows, stream);
    case WAM_BFLOAT16:
      return launch_rows<__nv_bfloat16, kResidual>(typed_args<__nv_bfloat16>(raw, table), rows,
                                                   stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace wam
