// Thin torch binding of the fused kernels (csrc/*.cu): the Python module wam_fast._C.
//
// Calling convention (the Python glue in wam_fast/ops/<op>.py allocates every output, takes the
// stream from torch.cuda.current_stream(x.device).cuda_stream and registers the custom ops):
//   adaln_modulate(x, shift, scale, weight, bias, segment_lens, mod_index, eps, y, y_scale, stream)
//   gated_residual_adaln(residual, x, gate, shift, scale, weight, bias, segment_lens, mod_index,
//                        eps, r, y, y_scale, stream)
//   qk_norm_rope(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin, rope_start, rope_end, eps,
//                q_out, k_out, stream)
// Each writes into its outputs, returns None, and raises RuntimeError naming what was expected and
// what came for a bad argument, or with cudaGetErrorString for a CUDA error.
//
// Only CPU-available torch headers and cuda_runtime_api.h: no c10/cuda, so CI can syntax-check this
// file against the CPU torch wheel. The device is set (and restored) with the CUDA runtime.
#include <torch/extension.h>

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "adaln_modulate.h"
#include "gated_residual_adaln.h"
#include "qk_norm_rope.h"

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

namespace {

using torch::Tensor;
using OptTensor = std::optional<Tensor>;

// ---- argument checks -----------------------------------------------------------------------
// `ref` is the tensor whose device every other one must share (x, residual or q).
void check_device(const char* op, const char* name, const Tensor& t, const char* ref_name,
                  const Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got a tensor on ", t.device());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on ", ref.device(),
              " (the device of ", ref_name, "), got ", t.device());
}

void check_dtype(const char* op, const char* name, const Tensor& t, at::ScalarType expected,
                 const char* why) {
  TORCH_CHECK(t.scalar_type() == expected, op, ": ", name, " must be ", expected, " (", why,
              "), got ", t.scalar_type());
}

void check_shape(const char* op, const char* name, const Tensor& t,
                 const std::vector<int64_t>& expected, const char* what) {
  TORCH_CHECK(t.sizes() == at::IntArrayRef(expected), op, ": ", name, " must have shape ",
              at::IntArrayRef(expected), " (", what, "), got ", t.sizes());
}

void check_contiguous(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides(),
              " for shape ", t.sizes());
}

// A tensor argument in full: device, dtype, shape, contiguity.
void check_arg(const char* op, const char* name, const Tensor& t, const char* ref_name,
               const Tensor& ref, at::ScalarType dtype, const char* dtype_why,
               const std::vector<int64_t>& shape, const char* shape_what) {
  check_device(op, name, t, ref_name, ref);
  check_dtype(op, name, t, dtype, dtype_why);
  check_shape(op, name, t, shape, shape_what);
  check_contiguous(op, name, t);
}

wam_dtype storage_dtype(const char* op, const char* name, const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return WAM_FLOAT32;
    case at::kHalf: return WAM_FLOAT16;
    case at::kBFloat16: return WAM_BFLOAT16;
    default: break;
  }
  TORCH_CHECK(false, op, ": ", name, " must be float32, float16 or bfloat16, got ",
              t.scalar_type());
  return WAM_FLOAT32;  // unreachable
}

void check_eps(const char* op, double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0, op, ": eps must be finite and >= 0, got ", eps);
}

// A segment layout as the kernels take it: int32 arrays, at most WAM_MAX_SEGMENTS entries.
struct Layout {
  std::vector<int32_t> lens, sets;
};

Layout check_layout(const char* op, const std::vector<int64_t>& segment_lens,
                    const std::vector<int64_t>& mod_index, int64_t N, int64_t S) {
  TORCH_CHECK(!segment_lens.empty() && segment_lens.size() <= WAM_MAX_SEGMENTS, op,
              ": segment_lens must have 1 to ", WAM_MAX_SEGMENTS, " entries, got ",
              segment_lens.size());
  TORCH_CHECK(mod_index.size() == segment_lens.size(), op,
              ": mod_index must have one entry per segment (", segment_lens.size(), "), got ",
              mod_index.size());
  Layout layout;
  int64_t total = 0;
  for (size_t s = 0; s < segment_lens.size(); ++s) {
    TORCH_CHECK(segment_lens[s] >= 0 && segment_lens[s] <= N, op, ": segment_lens[", s,
                "] must be in [0, N=", N, "], got ", segment_lens[s]);
    TORCH_CHECK(mod_index[s] >= 0 && mod_index[s] < S, op, ": mod_index[", s,
                "] must be a modulation set in [0, S=", S, "), got ", mod_index[s]);
    total += segment_lens[s];
    layout.lens.push_back(static_cast<int32_t>(segment_lens[s]));
    layout.sets.push_back(static_cast<int32_t>(mod_index[s]));
  }
  TORCH_CHECK(total == N, op, ": segment_lens must sum to N=", N, " (tokens of x), got ", total,
              " from ", at::IntArrayRef(segment_lens));
  return layout;
}

// The y / y_scale pair: y in x's dtype without y_scale, FP8 e4m3 (B, N, D) + float32 (B, N, 1)
// with it. Returns the y_scale pointer (nullptr without).
float* check_output_y(const char* op, const Tensor& y, const OptTensor& y_scale,
                      const char* ref_name, const Tensor& ref, int64_t B, int64_t N, int64_t D) {
  if (y_scale.has_value()) {
    check_arg(op, "y", y, ref_name, ref, at::kFloat8_e4m3fn,
              "the FP8 output, as y_scale is given", {B, N, D}, "B, N, D");
    check_arg(op, "y_scale", *y_scale, ref_name, ref, at::kFloat, "per-token FP8 scales",
              {B, N, 1}, "B, N, 1");
    return y_scale->data_ptr<float>();
  }
  check_arg(op, "y", y, ref_name, ref, ref.scalar_type(), "the dtype of x, as y_scale is None",
            {B, N, D}, "B, N, D");
  return nullptr;
}

void check_optional_vector(const char* op, const char* name, const OptTensor& t,
                           const char* ref_name, const Tensor& ref, int64_t size,
                           const char* what) {
  if (!t.has_value()) return;
  check_arg(op, name, *t, ref_name, ref, ref.scalar_type(), "the dtype of the input", {size},
            what);
}

const void* optional_ptr(const OptTensor& t) { return t.has_value() ? t->data_ptr() : nullptr; }

// ---- launching -----------------------------------------------------------------------------
// Makes `device` current for the launch (the stream belongs to it) and restores the previous one.
class DeviceScope {
 public:
  DeviceScope(const char* op, int device) : device_(device) {
    check(op, cudaGetDevice(&previous_));
    if (previous_ != device_) check(op, cudaSetDevice(device_));
  }
  ~DeviceScope() {
    if (previous_ >= 0 && previous_ != device_) cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

  static void check(const char* op, cudaError_t err) {
    TORCH_CHECK(err == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(err));
  }

 private:
  int device_;
  int previous_ = -1;
};

cudaStream_t to_stream(int64_t stream) {
  return reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(stream));
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err != cudaErrorInvalidValue, op,
              ": the kernel refused its arguments (cudaErrorInvalidValue: ",
              cudaGetErrorString(err), ")");
  DeviceScope::check(op, err);
}

// ---- the ops -------------------------------------------------------------------------------
void adaln_modulate(const Tensor& x, const Tensor& shift, const Tensor& scale,
                    const OptTensor& weight, const OptTensor& bias,
                    const std::vector<int64_t>& segment_lens, const std::vector<int64_t>& mod_index,
                    double eps, const Tensor& y, const OptTensor& y_scale, int64_t stream) {
  const char* op = "wam_fast._C.adaln_modulate";
  TORCH_CHECK(x.dim() == 3, op, ": x must be (B, N, D), got shape ", x.sizes());
  check_device(op, "x", x, "x", x);
  const wam_dtype dtype = storage_dtype(op, "x", x);
  check_contiguous(op, "x", x);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  TORCH_CHECK(D >= 1, op, ": x must have D >= 1, got shape ", x.sizes());
  TORCH_CHECK(shift.dim() == 3 && shift.size(1) >= 1, op,
              ": shift must be (B, S, D) with S >= 1, got shape ", shift.sizes());
  const int64_t S = shift.size(1);
  check_arg(op, "shift", shift, "x", x, x.scalar_type(), "the dtype of x", {B, S, D},
            "B, S, D with B, D of x");
  check_arg(op, "scale", scale, "x", x, x.scalar_type(), "the dtype of x", {B, S, D},
            "B, S, D as shift");
  check_optional_vector(op, "weight", weight, "x", x, D, "D");
  check_optional_vector(op, "bias", bias, "x", x, D, "D");
  const Layout layout = check_layout(op, segment_lens, mod_index, N, S);
  check_eps(op, eps);
  float* y_scale_ptr = check_output_y(op, y, y_scale, "x", x, B, N, D);

  DeviceScope device(op, x.get_device());
  check_launch(op, wam_adaln_modulate_fwd(
                       dtype, x.data_ptr(), shift.data_ptr(), scale.data_ptr(),
                       optional_ptr(weight), optional_ptr(bias), y.data_ptr(), y_scale_ptr, B, N,
                       D, S, layout.lens.data(), layout.sets.data(),
                       static_cast<int32_t>(layout.lens.size()), static_cast<float>(eps),
                       to_stream(stream)));
}

void gated_residual_adaln(const Tensor& residual, const Tensor& x, const Tensor& gate,
                          const Tensor& shift, const Tensor& scale, const OptTensor& weight,
                          const OptTensor& bias, const std::vector<int64_t>& segment_lens,
                          const std::vector<int64_t>& mod_index, double eps, const Tensor& r,
                          const Tensor& y, const OptTensor& y_scale, int64_t stream) {
  const char* op = "wam_fast._C.gated_residual_adaln";
  TORCH_CHECK(residual.dim() == 3, op, ": residual must be (B, N, D), got shape ",
              residual.sizes());
  check_device(op, "residual", residual, "residual", residual);
  const wam_dtype dtype = storage_dtype(op, "residual", residual);
  check_contiguous(op, "residual", residual);
  const int64_t B = residual.size(0), N = residual.size(1), D = residual.size(2);
  TORCH_CHECK(D >= 1, op, ": residual must have D >= 1, got shape ", residual.sizes());
  check_arg(op, "x", x, "residual", residual, residual.scalar_type(), "the dtype of residual",
            {B, N, D}, "the shape of residual");
  TORCH_CHECK(gate.dim() == 3 && gate.size(1) >= 1, op,
              ": gate must be (B, S, D) with S >= 1, got shape ", gate.sizes());
  const int64_t S = gate.size(1);
  check_arg(op, "gate", gate, "residual", residual, residual.scalar_type(),
            "the dtype of residual", {B, S, D}, "B, S, D with B, D of residual");
  check_arg(op, "shift", shift, "residual", residual, residual.scalar_type(),
            "the dtype of residual", {B, S, D}, "B, S, D as gate");
  check_arg(op, "scale", scale, "residual", residual, residual.scalar_type(),
            "the dtype of residual", {B, S, D}, "B, S, D as gate");
  check_optional_vector(op, "weight", weight, "residual", residual, D, "D");
  check_optional_vector(op, "bias", bias, "residual", residual, D, "D");
  const Layout layout = check_layout(op, segment_lens, mod_index, N, S);
  check_eps(op, eps);
  check_arg(op, "r", r, "residual", residual, residual.scalar_type(), "the dtype of residual",
            {B, N, D}, "the shape of residual");
  float* y_scale_ptr = check_output_y(op, y, y_scale, "residual", residual, B, N, D);

  DeviceScope device(op, residual.get_device());
  check_launch(op, wam_gated_residual_adaln_fwd(
                       dtype, residual.data_ptr(), x.data_ptr(), gate.data_ptr(),
                       shift.data_ptr(), scale.data_ptr(), optional_ptr(weight),
                       optional_ptr(bias), r.data_ptr(), y.data_ptr(), y_scale_ptr, B, N, D, S,
                       layout.lens.data(), layout.sets.data(),
                       static_cast<int32_t>(layout.lens.size()), static_cast<float>(eps),
                       to_stream(stream)));
}

void qk_norm_rope(const Tensor& q, const Tensor& k, const OptTensor& q_weight,
                  const OptTensor& q_bias, const OptTensor& k_weight, const OptTensor& k_bias,
                  const Tensor& cos, const Tensor& sin, int64_t rope_start, int64_t rope_end,
                  double eps, const Tensor& q_out, const Tensor& k_out, int64_t stream) {
  const char* op = "wam_fast._C.qk_norm_rope";
  TORCH_CHECK(q.dim() == 4, op, ": q must be (B, H, N, head_dim), got shape ", q.sizes());
  check_device(op, "q", q, "q", q);
  const wam_dtype dtype = storage_dtype(op, "q", q);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), hd = q.size(3);
  TORCH_CHECK(hd >= 2 && hd <= 256 && hd % 2 == 0, op,
              ": head_dim must be even and in [2, 256], got ", hd);
  check_device(op, "k", k, "q", q);
  check_dtype(op, "k", k, q.scalar_type(), "the dtype of q");
  check_shape(op, "k", k, {B, H, N, hd}, "the shape of q");
  TORCH_CHECK(q.stride(3) == 1, op, ": q must have last-dim stride 1, got strides ", q.strides());
  TORCH_CHECK(k.stride(3) == 1, op, ": k must have last-dim stride 1, got strides ", k.strides());
  check_optional_vector(op, "q_weight", q_weight, "q", q, hd, "head_dim");
  check_optional_vector(op, "q_bias", q_bias, "q", q, hd, "head_dim");
  check_optional_vector(op, "k_weight", k_weight, "q", q, hd, "head_dim");
  check_optional_vector(op, "k_bias", k_bias, "q", q, hd, "head_dim");
  TORCH_CHECK(0 <= rope_start && rope_start <= rope_end && rope_end <= N, op,
              ": need 0 <= rope_start <= rope_end <= N=", N, ", got rope_start=", rope_start,
              ", rope_end=", rope_end);
  check_arg(op, "cos", cos, "q", q, at::kFloat, "RoPE tables are float32",
            {rope_end - rope_start, hd}, "rope_end - rope_start, head_dim");
  check_arg(op, "sin", sin, "q", q, at::kFloat, "RoPE tables are float32",
            {rope_end - rope_start, hd}, "rope_end - rope_start, head_dim");
  check_eps(op, eps);
  check_arg(op, "q_out", q_out, "q", q, q.scalar_type(), "the dtype of q", {B, H, N, hd},
            "the shape of q");
  check_arg(op, "k_out", k_out, "q", q, q.scalar_type(), "the dtype of q", {B, H, N, hd},
            "the shape of q");

  // Strides of size-1 dimensions are never used: 0 keeps them from disabling 16-byte loads.
  int64_t q_strides[3], k_strides[3];
  for (int d = 0; d < 3; ++d) {
    q_strides[d] = q.size(d) == 1 ? 0 : q.stride(d);
    k_strides[d] = k.size(d) == 1 ? 0 : k.stride(d);
  }
  DeviceScope device(op, q.get_device());
  check_launch(op, wam_qk_norm_rope_fwd(
                       dtype, q.data_ptr(), q_strides, k.data_ptr(), k_strides,
                       optional_ptr(q_weight), optional_ptr(q_bias), optional_ptr(k_weight),
                       optional_ptr(k_bias), cos.data_ptr<float>(), sin.data_ptr<float>(),
                       q_out.data_ptr(), k_out.data_ptr(), B, H, N, hd, rope_start, rope_end,
                       static_cast<float>(eps), to_stream(stream)));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "wam_fast fused CUDA kernels (csrc/): write into Python-allocated outputs, return None";
  m.def("adaln_modulate", &adaln_modulate,
        "y = LayerNorm(x)(*weight+bias) * (1 + scale[set]) + shift[set]; FP8 y + y_scale when "
        "y_scale is given",
        py::arg("x"), py::arg("shift"), py::arg("scale"), py::arg("weight"), py::arg("bias"),
        py::arg("segment_lens"), py::arg("mod_index"), py::arg("eps"), py::arg("y"),
        py::arg("y_scale"), py::arg("stream"));
  m.def("gated_residual_adaln", &gated_residual_adaln,
        "r = residual + gate[set] * x, then adaln_modulate of r into y (FP8 with y_scale)",
        py::arg("residual"), py::arg("x"), py::arg("gate"), py::arg("shift"), py::arg("scale"),
        py::arg("weight"), py::arg("bias"), py::arg("segment_lens"), py::arg("mod_index"),
        py::arg("eps"), py::arg("r"), py::arg("y"), py::arg("y_scale"), py::arg("stream"));
  m.def("qk_norm_rope", &qk_norm_rope,
        "affine LayerNorm over head_dim of q and k, then interleaved RoPE on tokens "
        "[rope_start, rope_end)",
        py::arg("q"), py::arg("k"), py::arg("q_weight"), py::arg("q_bias"), py::arg("k_weight"),
        py::arg("k_bias"), py::arg("cos"), py::arg("sin"), py::arg("rope_start"),
        py::arg("rope_end"), py::arg("eps"), py::arg("q_out"), py::arg("k_out"),
        py::arg("stream"));
}
