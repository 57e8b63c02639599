// Types shared by the C interfaces of the fused kernels (adaln_modulate.h, gated_residual_adaln.h,
// qk_norm_rope.h). Plain C, so the torch binding includes it with a host compiler.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

// Storage types of the fused kernels; all math is fp32.
typedef enum { WAM_FLOAT32 = 0, WAM_FLOAT16 = 1, WAM_BFLOAT16 = 2 } wam_dtype;

// Most segments a layout may have (text | history | current frame | noisy, with room to spare).
// The segment table travels by value in the kernel arguments, so this bounds their size.
#define WAM_MAX_SEGMENTS 8

// FP8 e4m3 outputs: y_scale[row] = max(amax(|y_row|) / WAM_FP8_E4M3_MAX, WAM_FP8_MIN_SCALE) and
// y_fp8 = e4m3(clamp(y / y_scale, -448, 448)), round to nearest even (functional.quantize_rowwise).
#define WAM_FP8_E4M3_MAX 448.0f
#define WAM_FP8_MIN_SCALE 1e-12f
