// C interface of the adaln_modulate kernel (DESIGN.md section 5), for the torch binding.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Storage types of the fused kernels; all math is fp32.
typedef enum { WAM_FLOAT32 = 0, WAM_FLOAT16 = 1, WAM_BFLOAT16 = 2 } wam_dtype;

// Most segments a layout may have (text | history | current frame | noisy, with room to spare).
#define WAM_MAX_SEGMENTS 8

// y = LayerNorm(x) (* weight + bias) * (1 + scale[set]) + shift[set], one token row per block.
//   x, y:         (B, N, D) contiguous, dtype `dtype`
//   shift, scale: (B, S, D) contiguous, the S modulation sets of each sample
//   weight, bias: (D) LayerNorm affine, or NULL for none (each may be NULL on its own)
//   segment_lens: host array of num_segments lengths summing to N (consecutive token segments)
//   mod_index:    host array, the modulation set (0 <= set < S) of each segment
// Returns cudaErrorInvalidValue for an inconsistent layout, else the launch status.
cudaError_t wam_adaln_modulate_fwd(wam_dtype dtype, const void* x, const void* shift,
                                   const void* scale, const void* weight, const void* bias,
                                   void* y, int64_t B, int64_t N, int64_t D, int64_t S,
                                   const int32_t* segment_lens, const int32_t* mod_index,
                                   int32_t num_segments, float eps, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
