// adaln_modulate forward (docs/design.md, Ops):
//   y = LayerNorm(x) (* weight + bias) * (1 + scale[set]) + shift[set]
// where `set` is the modulation set of the segment a token belongs to (text / video / actions use
// their own (shift, scale) rows of each sample). Output in the input dtype, or FP8 e4m3 with a
// per-token scale. One block per token row, the row held in registers (adaln_rows.cuh).
#include "adaln_modulate.h"
#include "adaln_rows.cuh"

extern "C" cudaError_t wam_adaln_modulate_fwd(wam_dtype dtype, const void* x, const void* shift,
                                              const void* scale, const void* weight,
                                              const void* bias, void* y, float* y_scale,
                                              int64_t B, int64_t N, int64_t D, int64_t S,
                                              const int32_t* segment_lens,
                                              const int32_t* mod_index, int32_t num_segments,
                                              float eps, cudaStream_t stream) {
  wam::AdalnRawArgs raw;
  raw.dtype = dtype;
  raw.residual = nullptr;
  raw.x = x;
  raw.gate = nullptr;
  raw.shift = shift;
  raw.scale = scale;
  raw.weight = weight;
  raw.bias = bias;
  raw.r = nullptr;
  raw.y = y;
  raw.y_scale = y_scale;
  raw.B = B;
  raw.N = N;
  raw.D = D;
  raw.S = S;
  raw.eps = eps;
  return wam::adaln_rows_fwd<false>(raw, segment_lens, mod_index, num_segments, stream);
}
