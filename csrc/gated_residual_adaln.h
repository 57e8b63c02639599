// C interface of the gated_residual_adaln kernel (docs/design.md, Ops), for the torch binding.
#pragma once

#include "wam_types.h"

#ifdef __cplusplus
extern "C" {
#endif

// r = residual + gate[set] * x (rounded to `dtype` and written), then
// y = LayerNorm(r) (* weight + bias) * (1 + scale[set]) + shift[set] of that rounded r: one kernel,
// one read of residual and x (the row stays in registers).
//   residual, x, r: (B, N, D) contiguous, dtype `dtype`
//   gate, shift, scale: (B, S, D) contiguous
//   weight, bias, y, y_scale, segment_lens, mod_index: as in wam_adaln_modulate_fwd
// Outputs must not overlap the inputs. Returns cudaErrorInvalidValue for inconsistent arguments,
// else the launch status.
cudaError_t wam_gated_residual_adaln_fwd(wam_dtype dtype, const void* residual, const void* x,
                                         const void* gate, const void* shift, const void* scale,
                                         const void* weight, const void* bias, void* r, void* y,
                                         float* y_scale, int64_t B, int64_t N, int64_t D,
                                         int64_t S, const int32_t* segment_lens,
                                         const int32_t* mod_index, int32_t num_segments,
                                         float eps, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
