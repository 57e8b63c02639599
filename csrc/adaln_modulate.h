// C interface of the adaln_modulate kernel (docs/design.md, Ops), for the torch binding.
#pragma once

#include "wam_types.h"

#ifdef __cplusplus
extern "C" {
#endif

// y = LayerNorm(x) (* weight + bias) * (1 + scale[set]) + shift[set], one token row per block.
//   x:            (B, N, D) contiguous, dtype `dtype`
//   shift, scale: (B, S, D) contiguous, the S modulation sets of each sample
//   weight, bias: (D) LayerNorm affine, or NULL for none (each may be NULL on its own)
//   y:            (B, N, D) contiguous: dtype `dtype` when y_scale is NULL, else FP8 e4m3 (1 byte)
//   y_scale:      (B * N) float32 per-token FP8 scales, or NULL for an output in `dtype`
//   segment_lens: host array of num_segments lengths summing to N (consecutive token segments)
//   mod_index:    host array, the modulation set (0 <= set < S) of each segment
// Outputs must not overlap the inputs. Any D >= 1; 16-byte loads when D and the pointers allow.
// Returns cudaErrorInvalidValue for inconsistent arguments, else the launch status.
cudaError_t wam_adaln_modulate_fwd(wam_dtype dtype, const void* x, const void* shift,
                                   const void* scale, const void* weight, const void* bias,
                                   void* y, float* y_scale, int64_t B, int64_t N, int64_t D,
                                   int64_t S, const int32_t* segment_lens,
                                   const int32_t* mod_index, int32_t num_segments, float eps,
                                   cudaStream_t stream);

#ifdef __cplusplus
}
#endif
