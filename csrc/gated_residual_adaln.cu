// gated_residual_adaln forward (docs/design.md, Ops):
//   r = residual + gate[set] * x                   (rounded to the storage dtype, written)
//   y = adaln_modulate(r, shift, scale, ...)       (of the rounded r, as the unfused model does)
// One block per token row: residual and x are read once, the row stays in registers for the
// statistics and the modulation (adaln_rows.cuh). y in the input dtype, or FP8 e4m3 + per-token
// scale.
#include "adaln_rows.cuh"
#include "gated_residual_adaln.h"

extern "C" cudaError_t wam_gated_residual_adaln_fwd(wam_dtype dtype, const void* residual,
                                                    const void* x, const void* gate,
                                                    const void* shift, const void* scale,
                                                    const void* weight, const void* bias, void* r,
                                                    void* y, float* y_scale, int64_t B, int64_t N,
                                                    int64_t D, int64_t S,
                                                    const int32_t* segment_lens,
                                                    const int32_t* mod_index, int32_t num_segments,
                                                    float eps, cudaStream_t stream) {
  wam::AdalnRawArgs raw;
  raw.dtype = dtype;
  raw.residual = residual;
  raw.x = x;
  raw.gate = gate;
  raw.shift = shift;
  raw.scale = scale;
  raw.weight = weight;
  raw.bias = bias;
  raw.r = r;
  raw.y = y;
  raw.y_scale = y_scale;
  raw.B = B;
  raw.N = N;
  raw.D = D;
  raw.S = S;
  raw.eps = eps;
  return wam::adaln_rows_fwd<true>(raw, segment_lens, mod_index, num_segments, stream);
}
