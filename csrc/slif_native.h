// Tensor-level sLIF ops of the effst_native library: declarations and the argument checks
// shared by the CPU and CUDA implementations.
//
// The ops implement the internal kernel contract of effst/ops/slif.py on the flattened [T, N]
// view (effst/ops/layout.py): parameters are vectors of `channels` entries and neuron n uses
// entry (n / inner) % channels. Parameter gradients are returned per neuron; the caller reduces
// them to the parameter (a fixed-order sum: deterministic, no atomics). The gradient of v_init
// is [N] when v_init is given, else a [1] zero placeholder.
#pragma once

#include <cmath>
#include <optional>
#include <string>
#include <tuple>

// Light ATen headers (not ATen/ATen.h): they halve the compile time of the extension.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

namespace effst {

using ForwardResult = std::tuple<at::Tensor, at::Tensor>;                           // spikes, v_final
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;  // x, w, theta, v_init

ForwardResult slif_forward_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& theta,
                               const std::optional<at::Tensor>& v_init, int64_t w_channels,
                               int64_t w_inner, int64_t theta_channels, int64_t theta_inner,
                               std::optional<double> v_reset, int64_t surrogate_id, double alpha,
                               bool detach_reset, bool decay_input);

BackwardResult slif_backward_cpu(const at::Tensor& grad_spikes,
                                 const std::optional<at::Tensor>& grad_v_final,
                                 const at::Tensor& x, const at::Tensor& w, const at::Tensor& theta,
                                 const std::optional<at::Tensor>& v_init, int64_t w_channels,
                                 int64_t w_inner, int64_t theta_channels, int64_t theta_inner,
                                 std::optional<double> v_reset, int64_t surrogate_id, double alpha,
                                 bool detach_reset, bool decay_input);

// slif_backward_cpu, and with `reduce` the form the autograd node needs: parameter gradients
// already summed to [w_channels] / [theta_channels] (a fixed-order sum, no per-neuron tensors),
// grad_v_init undefined without v_init.
BackwardResult slif_backward_cpu_impl(const at::Tensor& grad_spikes,
                                      const std::optional<at::Tensor>& grad_v_final,
                                      const at::Tensor& x, const at::Tensor& w,
                                      const at::Tensor& theta,
                                      const std::optional<at::Tensor>& v_init, int64_t w_channels,
                                      int64_t w_inner, int64_t theta_channels, int64_t theta_inner,
                                      std::optional<double> v_reset, int64_t surrogate_id,
                                      double alpha, bool detach_reset, bool decay_input,
                                      bool reduce);

// Which CPU kernel build runs: "avx2" or "baseline" (env EFFST_NATIVE_CPU_ISA overrides).
std::string cpu_isa();

namespace detail {

inline at::ScalarType compute_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Makes the neuron dimension unit-stride (a layout change, never a value change).
inline at::Tensor unit_stride_rows(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

inline void check_vector(const at::Tensor& t, const char* name, int64_t numel,
                         at::ScalarType dtype, const at::Tensor& x, const char* what) {
  TORCH_CHECK(t.dim() == 1 && t.numel() == numel, name, ": expected a 1-D tensor of ", numel,
              " values (", what, "), got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype,
              " (the compute dtype of x, ", x.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), name, ": expected a tensor on ", x.device(), " like x, got ",
              t.device());
}

// Checks every argument of the contract; throws a c10::Error naming the argument otherwise.
inline void check_slif_args(const at::Tensor& x, const at::Tensor& w, const at::Tensor& theta,
                            const std::optional<at::Tensor>& v_init, int64_t w_channels,
                            int64_t w_inner, int64_t theta_channels, int64_t theta_inner,
                            std::optional<double> v_reset, int64_t surrogate_id, double alpha) {
  TORCH_CHECK(x.dim() == 2, "x: expected a 2-D [T, N] tensor, got shape ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "x: expected dtype float32, float64, float16 or bfloat16, got ", dt);
  const int64_t N = x.size(1);
  TORCH_CHECK(w_channels >= 1 && w_inner >= 1, "w_channels/w_inner: expected values >= 1, got ",
              w_channels, " and ", w_inner);
  TORCH_CHECK(theta_channels >= 1 && theta_inner >= 1,
              "theta_channels/theta_inner: expected values >= 1, got ", theta_channels, " and ",
              theta_inner);
  check_vector(w, "w", w_channels, compute_dtype(x), x, "w_channels decay logits");
  check_vector(theta, "theta", theta_channels, compute_dtype(x), x, "theta_channels thresholds");
  if (v_init.has_value()) {
    check_vector(*v_init, "v_init", N, compute_dtype(x), x, "one initial membrane per neuron");
  }
  TORCH_CHECK(surrogate_id >= 0 && surrogate_id < 8,
              "surrogate_id: expected an index into SURROGATE_NAMES (0..7), got ", surrogate_id);
  TORCH_CHECK(std::isfinite(alpha) && alpha > 0, "alpha: expected a finite value > 0, got ", alpha);
  TORCH_CHECK(!v_reset.has_value() || std::isfinite(*v_reset),
              "v_reset: expected a finite float or None (soft reset), got ", *v_reset);
}

inline at::Tensor check_grad_spikes(const at::Tensor& grad_spikes, const at::Tensor& x) {
  TORCH_CHECK(grad_spikes.sizes() == x.sizes(), "grad_spikes: expected shape ", x.sizes(),
              " (the shape of x), got ", grad_spikes.sizes());
  TORCH_CHECK(grad_spikes.scalar_type() == x.scalar_type(), "grad_spikes: expected dtype ",
              x.scalar_type(), " (the dtype of x), got ", grad_spikes.scalar_type());
  TORCH_CHECK(grad_spikes.device() == x.device(), "grad_spikes: expected a tensor on ", x.device(),
              ", got ", grad_spikes.device());
  return unit_stride_rows(grad_spikes);
}

}  // namespace detail
}  // namespace effst
