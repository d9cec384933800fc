// effst_native::slif: forward and backward in one op whose autograd lives in C++, so a CPU user
// pays one operator call per forward and nothing in Python for the backward.
//
// Registered for the Autograd key (the torch::autograd::Function below) and for
// CompositeExplicitAutograd (no-grad / inference calls: just the forward). Both call the
// per-device kernels (slif_forward / slif_backward, CPU here, CUDA in slif_cuda_ops.cpp, Meta
// for fake tensors) through the dispatcher. Parameter gradients are summed here to the
// parameter's [channels] shape (a fixed-order sum: deterministic).
#include <optional>
#include <tuple>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "slif_native.h"

namespace effst {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

ForwardResult call_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& theta,
                           const std::optional<at::Tensor>& v_init, int64_t w_channels,
                           int64_t w_inner, int64_t theta_channels, int64_t theta_inner,
                           std::optional<double> v_reset, int64_t surrogate_id, double alpha,
                           bool detach_reset, bool decay_input) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("effst_native::slif_forward", "")
                       .typed<decltype(slif_forward_cpu)>();
  return op.call(x, w, theta, v_init, w_channels, w_inner, theta_channels, theta_inner, v_reset,
                 surrogate_id, alpha, detach_reset, decay_input);
}

BackwardResult call_backward(const at::Tensor& grad_spikes,
                             const std::optional<at::Tensor>& grad_v_final, const at::Tensor& x,
                             const at::Tensor& w, const at::Tensor& theta,
                             const std::optional<at::Tensor>& v_init, int64_t w_channels,
                             int64_t w_inner, int64_t theta_channels, int64_t theta_inner,
                             std::optional<double> v_reset, int64_t surrogate_id, double alpha,
                             bool detach_reset, bool decay_input) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("effst_native::slif_backward", "")
                       .typed<decltype(slif_backward_cpu)>();
  return op.call(grad_spikes, grad_v_final, x, w, theta, v_init, w_channels, w_inner,
                 theta_channels, theta_inner, v_reset, surrogate_id, alpha, detach_reset,
                 decay_input);
}

// Per-neuron gradient [N] summed to the [channels] parameter (neuron n uses entry
// (n / inner) % channels, effst/ops/layout.py).
at::Tensor reduce_to_parameter(const at::Tensor& per_neuron, int64_t channels, int64_t inner) {
  if (inner == 1 && channels == per_neuron.numel()) {
    return per_neuron;
  }
  return per_neuron.reshape({-1, channels, inner}).sum(at::IntArrayRef{0, 2});
}

// x [T, *] as the [T, N] view the kernels take (N = the per-step numel; [T] is one neuron).
at::Tensor as_time_by_neurons(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1 && x.size(0) >= 1, "x: expected shape [T, *] with T >= 1, got ",
              x.sizes());
  return x.dim() == 2 ? x : x.reshape({x.size(0), x.numel() / x.size(0)});
}

class SLIFNative : public torch::autograd::Function<SLIFNative> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                               const at::Tensor& theta, const std::optional<at::Tensor>& v_init,
                               int64_t w_channels, int64_t w_inner, int64_t theta_channels,
                               int64_t theta_inner, std::optional<double> v_reset,
                               int64_t surrogate_id, double alpha, bool detach_reset,
                               bool decay_input) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const at::Tensor x2d = as_time_by_neurons(x);
    std::optional<at::Tensor> v_init_flat;
    if (v_init.has_value()) {
      v_init_flat = v_init->reshape({-1});
    }
    auto [spikes, v_final] =
        call_forward(x2d, w, theta, v_init_flat, w_channels, w_inner, theta_channels, theta_inner,
                     v_reset, surrogate_id, alpha, detach_reset, decay_input);
    ctx->save_for_backward({x2d, w, theta, v_init_flat.has_value() ? *v_init_flat : at::Tensor()});
    ctx->saved_data["x_sizes"] = x.sizes();
    ctx->saved_data["v_init_sizes"] = v_init.has_value() ? v_init->sizes() : x.sizes();
    ctx->saved_data["w_channels"] = w_channels;
    ctx->saved_data["w_inner"] = w_inner;
    ctx->saved_data["theta_channels"] = theta_channels;
    ctx->saved_data["theta_inner"] = theta_inner;
    ctx->saved_data["v_reset"] = v_reset;
    ctx->saved_data["surrogate_id"] = surrogate_id;
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["detach_reset"] = detach_reset;
    ctx->saved_data["decay_input"] = decay_input;
    ctx->set_materialize_grads(false);  // an unused output needs no zero-filled gradient
    return {spikes.view(x.sizes()), v_final.view(x.sizes().slice(1))};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& w = saved[1];
    const at::Tensor& theta = saved[2];
    std::optional<at::Tensor> v_init;
    if (saved[3].defined()) {
      v_init = saved[3];
    }
    const int64_t w_channels = ctx->saved_data["w_channels"].toInt();
    const int64_t w_inner = ctx->saved_data["w_inner"].toInt();
    const int64_t theta_channels = ctx->saved_data["theta_channels"].toInt();
    const int64_t theta_inner = ctx->saved_data["theta_inner"].toInt();
    const auto& v_reset_value = ctx->saved_data["v_reset"];
    const std::optional<double> v_reset =
        v_reset_value.isNone() ? std::nullopt : std::optional<double>(v_reset_value.toDouble());
    at::Tensor grad_spikes = grads[0].defined() ? grads[0].reshape(x.sizes()) : at::zeros_like(x);
    std::optional<at::Tensor> grad_v_final;
    if (grads[1].defined()) {
      grad_v_final = grads[1].reshape({-1}).contiguous();  // e.g. the stride-0 grad of v.sum()
    }
    auto [grad_x, grad_w, grad_theta, grad_v_init] = call_backward(
        grad_spikes, grad_v_final, x, w, theta, v_init, w_channels, w_inner, theta_channels,
        theta_inner, v_reset, ctx->saved_data["surrogate_id"].toInt(),
        ctx->saved_data["alpha"].toDouble(), ctx->saved_data["detach_reset"].toBool(),
        ctx->saved_data["decay_input"].toBool());
    variable_list out(13);
    out[0] = ctx->needs_input_grad(0) ? grad_x.view(ctx->saved_data["x_sizes"].toIntVector())
                                      : at::Tensor();
    out[1] = ctx->needs_input_grad(1) ? reduce_to_parameter(grad_w, w_channels, w_inner)
                                      : at::Tensor();
    out[2] = ctx->needs_input_grad(2)
                 ? reduce_to_parameter(grad_theta, theta_channels, theta_inner)
                 : at::Tensor();
    out[3] = v_init.has_value() && ctx->needs_input_grad(3)
                 ? grad_v_init.view(ctx->saved_data["v_init_sizes"].toIntVector())
                 : at::Tensor();
    return out;
  }
};

ForwardResult slif_autograd(const at::Tensor& x, const at::Tensor& w, const at::Tensor& theta,
                            const std::optional<at::Tensor>& v_init, int64_t w_channels,
                            int64_t w_inner, int64_t theta_channels, int64_t theta_inner,
                            std::optional<double> v_reset, int64_t surrogate_id, double alpha,
                            bool detach_reset, bool decay_input) {
  auto outputs = SLIFNative::apply(x, w, theta, v_init, w_channels, w_inner, theta_channels,
                                   theta_inner, v_reset, surrogate_id, alpha, detach_reset,
                                   decay_input);
  return {outputs[0], outputs[1]};
}

// Without autograd: the forward alone, shaped like the autograd version's outputs.
ForwardResult slif_no_grad(const at::Tensor& x, const at::Tensor& w, const at::Tensor& theta,
                           const std::optional<at::Tensor>& v_init, int64_t w_channels,
                           int64_t w_inner, int64_t theta_channels, int64_t theta_inner,
                           std::optional<double> v_reset, int64_t surrogate_id, double alpha,
                           bool detach_reset, bool decay_input) {
  std::optional<at::Tensor> v_init_flat;
  if (v_init.has_value()) {
    v_init_flat = v_init->reshape({-1});
  }
  auto [spikes, v_final] =
      call_forward(as_time_by_neurons(x), w, theta, v_init_flat, w_channels, w_inner,
                   theta_channels, theta_inner, v_reset, surrogate_id, alpha, detach_reset,
                   decay_input);
  return {spikes.view(x.sizes()), v_final.view(x.sizes().slice(1))};
}

}  // namespace
}  // namespace effst

// x [T, *] (any per-step shape, N neurons), w / theta [channels] vectors, v_init N values of
// any shape; returns spikes shaped like x and the final state shaped like one step of x.
TORCH_LIBRARY_FRAGMENT(effst_native, m) {
  m.def(
      "slif(Tensor x, Tensor w, Tensor theta, Tensor? v_init, int w_channels, int w_inner, "
      "int theta_channels, int theta_inner, float? v_reset, int surrogate_id, float alpha, "
      "bool detach_reset, bool decay_input) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(effst_native, Autograd, m) {
  m.impl("slif", &effst::slif_autograd);
}

// Without autograd (inference mode, or called below the Autograd key).
TORCH_LIBRARY_IMPL(effst_native, CompositeExplicitAutograd, m) {
  m.impl("slif", &effst::slif_no_grad);
}
