// C interface of the qk_norm_rope kernel (docs/design.md, Ops), for the torch binding.
#pragma once

#include "wam_types.h"

#ifdef __cplusplus
extern "C" {
#endif

// For q and k (one launch): affine LayerNorm over head_dim of every (b, h, n) row, then, for tokens
// rope_start <= n < rope_end, interleaved RoPE with the row (n - rope_start) of the tables:
//   out[2i]   = h[2i]   * cos[2i]   - h[2i+1] * sin[2i]
//   out[2i+1] = h[2i+1] * cos[2i+1] + h[2i]   * sin[2i+1]
//   q, k:           (B, H, N, hd) with strides (q_strides / k_strides: b, h, n, in elements) and
//                   last-dim stride 1, dtype `dtype` (e.g. views of a fused qkv projection)
//   q_weight, q_bias, k_weight, k_bias: (hd) or NULL (each may be NULL on its own)
//   cos, sin:       (rope_end - rope_start, hd) float32 contiguous (unused when the range is empty)
//   q_out, k_out:   (B, H, N, hd) contiguous, dtype `dtype`; must not overlap the inputs
//   hd even, 2 <= hd <= 256; 0 <= rope_start <= rope_end <= N.
// Returns cudaErrorInvalidValue for inconsistent arguments, else the launch status.
cudaError_t wam_qk_norm_rope_fwd(wam_dtype dtype, const void* q, const int64_t q_strides[3],
                                 const void* k, const int64_t k_strides[3], const void* q_weight,
                                 const void* q_bias, const void* k_weight, const void* k_bias,
                                 const float* cos, const float* sin, void* q_out, void* k_out,
                                 int64_t B, int64_t H, int64_t N, int64_t hd, int64_t rope_start,
                                 int64_t rope_end, float eps, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
