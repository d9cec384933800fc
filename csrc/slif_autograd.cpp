// effst_native::slif: forward and backward in one op whose autograd lives in C++, so a CPU user
// pays one operator call per forward and nothing in Python for the backward.
//
// Registered for the Autograd key and for CompositeExplicitAutograd (no-grad / inference calls:
// just the forward). The Autograd kernel records one hand-written autograd node
// (SLIFNativeBackward, the way PyTorch's generated operators do it: fields instead of a
// string-keyed saved_data map, no custom-Function wrapping of the outputs). Both call the
// per-device kernels (slif_forward / slif_backward: CPU here, CUDA in slif_cuda_ops.cpp, Meta
// for fake tensors) through the dispatcher. The op takes the parameters in any shape and
// floating dtype (numel = channels) and x [T, *]; the [T, N] view, the flattening and compute
// dtype of w / theta, and the parameter-gradient sums to the parameter's own shape happen here
// (a fixed-order sum: deterministic), so the Python caller does none of them.
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include "slif_native.h"

namespace effst {
namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// The options of one call (everything but the tensors).
struct Options {
  int64_t w_channels, w_inner, theta_channels, theta_inner;
  std::optional<double> v_reset;
  int64_t surrogate_id;
  double alpha;
  bool detach_reset, decay_input;
};

ForwardResult call_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& theta,
                           const std::optional<at::Tensor>& v_init, const Options& o) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("effst_native::slif_forward", "")
                       .typed<decltype(slif_forward_cpu)>();
  return op.call(x, w, theta, v_init, o.w_channels, o.w_inner, o.theta_channels, o.theta_inner,
                 o.v_reset, o.surrogate_id, o.alpha, o.detach_reset, o.decay_input);
}

BackwardResult call_backward(const at::Tensor& grad_spikes,
                             const std::optional<at::Tensor>& grad_v_final, const at::Tensor& x,
                             const at::Tensor& w, const at::Tensor& theta,
                             const std::optional<at::Tensor>& v_init, const Options& o) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("effst_native::slif_backward", "")
                       .typed<decltype(slif_backward_cpu)>();
  return op.call(grad_spikes, grad_v_final, x, w, theta, v_init, o.w_channels, o.w_inner,
                 o.theta_channels, o.theta_inner, o.v_reset, o.surrogate_id, o.alpha,
                 o.detach_reset, o.decay_input);
}

// Per-neuron gradient [N] summed to the [channels] parameter (neuron n uses entry
// (n / inner) % channels, effst/ops/layout.py); a fixed-order ATen sum.
at::Tensor reduce_to_parameter(const at::Tensor& per_neuron, int64_t channels, int64_t inner) {
  if (inner == 1 && channels == per_neuron.numel()) {
    return per_neuron;
  }
  return per_neuron.reshape({-1, channels, inner}).sum(at::IntArrayRef{0, 2});
}

// The backward with parameter gradients summed to [channels]: on the CPU straight from the
// kernel's per-neuron values (slif_backward_cpu_impl: no per-neuron tensors, no dispatch),
// elsewhere through the dispatcher and an ATen sum.
BackwardResult backward_reduced(const at::Tensor& grad_spikes,
                                const std::optional<at::Tensor>& grad_v_final,
                                const at::Tensor& x, const at::Tensor& w, const at::Tensor& theta,
                                const std::optional<at::Tensor>& v_init, const Options& o) {
  if (x.is_cpu()) {
    return slif_backward_cpu_impl(grad_spikes, grad_v_final, x, w, theta, v_init, o.w_channels,
                                  o.w_inner, o.theta_channels, o.theta_inner, o.v_reset,
                                  o.surrogate_id, o.alpha, o.detach_reset, o.decay_input,
                                  /*reduce=*/true);
  }
  auto [grad_x, grad_w, grad_theta, grad_v_init] =
      call_backward(grad_spikes, grad_v_final, x, w, theta, v_init, o);
  return {grad_x, reduce_to_parameter(grad_w, o.w_channels, o.w_inner),
          reduce_to_parameter(grad_theta, o.theta_channels, o.theta_inner), grad_v_init};
}

// x [T, *] as the [T, N] view the kernels take (N = the per-step numel; [T] is one neuron).
at::Tensor as_time_by_neurons(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1 && x.size(0) >= 1, "x: expected shape [T, *] with T >= 1, got ",
              x.sizes());
  return x.dim() == 2 ? x : x.reshape({x.size(0), x.numel() / x.size(0)});
}

// A parameter of any shape with `channels` values, as the [channels] vector in the compute
// dtype the kernels take (a view, or a copy only when the dtype differs).
at::Tensor as_parameter_vector(const at::Tensor& p, const char* name, int64_t channels,
                               at::ScalarType compute) {
  TORCH_CHECK(p.numel() == channels, name, ": expected ", channels, " values (", name,
              "_channels), got shape ", p.sizes());
  TORCH_CHECK(at::isFloatingType(p.scalar_type()), name,
              ": expected a floating-point tensor, got dtype ", p.scalar_type());
  at::Tensor flat = p.dim() == 1 ? p : p.reshape({channels});
  return flat.scalar_type() == compute ? flat : flat.to(compute);
}

// A parameter's gradient ([channels], compute dtype) in the parameter's shape and dtype.
at::Tensor as_input(const at::Tensor& grad, const at::Tensor& parameter) {
  at::Tensor out = grad.dim() == parameter.dim() ? grad : grad.view(parameter.sizes());
  return out.scalar_type() == parameter.scalar_type() ? out : out.to(parameter.scalar_type());
}

// The forward on the op's own argument shapes; runs below autograd.
ForwardResult forward_shaped(const at::Tensor& x, const at::Tensor& w, const at::Tensor& theta,
                             const std::optional<at::Tensor>& v_init, const Options& o) {
  const at::Tensor x2d = as_time_by_neurons(x);
  const auto compute = detail::compute_dtype(x2d);
  std::optional<at::Tensor> v_init_flat;
  if (v_init.has_value()) {
    v_init_flat = v_init->reshape({-1});
  }
  auto [spikes, v_final] =
      call_forward(x2d, as_parameter_vector(w, "w", o.w_channels, compute),
                   as_parameter_vector(theta, "theta", o.theta_channels, compute), v_init_flat, o);
  return {spikes.view(x.sizes()), v_final.view(x.sizes().slice(1))};
}

// The backward node: inputs (x, w, theta, v_init), outputs (spikes, v_final).
struct SLIFNativeBackward : public torch::autograd::Node {
  std::string name() const override { return "effst::SLIFNativeBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    x_.reset_data();
    w_.reset_data();
    theta_.reset_data();
    v_init_.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const at::Tensor x = x_.unpack();
    const at::Tensor w = w_.unpack();
    const at::Tensor theta = theta_.unpack();
    const at::Tensor x2d = as_time_by_neurons(x);
    const auto compute = detail::compute_dtype(x2d);
    const at::Tensor w_flat = as_parameter_vector(w, "w", o_.w_channels, compute);
    const at::Tensor theta_flat = as_parameter_vector(theta, "theta", o_.theta_channels, compute);
    std::optional<at::Tensor> v_init;
    if (has_v_init_) {
      v_init = v_init_.unpack().reshape({-1});
    }
    const bool need_x = task_should_compute_output(0);
    const bool need_w = task_should_compute_output(1);
    const bool need_theta = task_should_compute_output(2);
    const bool need_v_init = has_v_init_ && task_should_compute_output(3);
    variable_list out(4);
    if (!(need_x || need_w || need_theta || need_v_init)) {
      return out;
    }
    const at::Tensor grad_spikes =
        grads[0].defined() ? grads[0].reshape(x2d.sizes()) : at::zeros_like(x2d);
    std::optional<at::Tensor> grad_v_final;
    if (grads[1].defined()) {
      grad_v_final = grads[1].reshape({-1}).contiguous();  // e.g. the stride-0 grad of v.sum()
      if (grad_v_final->scalar_type() != compute) {
        grad_v_final = grad_v_final->to(compute);
      }
    }
    auto [grad_x, grad_w, grad_theta, grad_v_init] =
        backward_reduced(grad_spikes, grad_v_final, x2d, w_flat, theta_flat, v_init, o_);
    if (need_x) {
      out[0] = grad_x.view(x.sizes());
    }
    if (need_w) {
      out[1] = as_input(grad_w, w);
    }
    if (need_theta) {
      out[2] = as_input(grad_theta, theta);
    }
    if (need_v_init) {
      out[3] = grad_v_init.view(v_init_sizes_);
      if (out[3].scalar_type() != v_init_dtype_) out[3] = out[3].to(v_init_dtype_);
    }
    return out;
  }

  SavedVariable x_, w_, theta_, v_init_;
  bool has_v_init_ = false;
  std::vector<int64_t> v_init_sizes_;
  at::ScalarType v_init_dtype_ = at::kFloat;
  Options o_{};
};

ForwardResult slif_autograd(const at::Tensor& x, const at::Tensor& w, const at::Tensor& theta,
                            const std::optional<at::Tensor>& v_init, int64_t w_channels,
                            int64_t w_inner, int64_t theta_channels, int64_t theta_inner,
                            std::optional<double> v_reset, int64_t surrogate_id, double alpha,
                            bool detach_reset, bool decay_input) {
  const Options o{w_channels, w_inner, theta_channels, theta_inner, v_reset,
                  surrogate_id, alpha, detach_reset, decay_input};
  const at::Tensor no_v_init;
  const at::Tensor& v_init_or_none = v_init.has_value() ? *v_init : no_v_init;
  const bool requires_grad =
      torch::autograd::compute_requires_grad(x, w, theta, v_init_or_none);
  at::Tensor spikes, v_final;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(spikes, v_final) = forward_shaped(x, w, theta, v_init, o);
  }
  if (requires_grad) {
    auto node = c10::make_intrusive<SLIFNativeBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(x, w, theta, v_init_or_none));
    node->x_ = SavedVariable(x, false);
    node->w_ = SavedVariable(w, false);
    node->theta_ = SavedVariable(theta, false);
    if (v_init.has_value()) {
      node->has_v_init_ = true;
      node->v_init_ = SavedVariable(*v_init, false);
      node->v_init_sizes_ = v_init->sizes().vec();
      node->v_init_dtype_ = v_init->scalar_type();
    }
    node->o_ = o;
    // integer spikes (never produced here: the op returns x's dtype) would carry no gradient
    torch::autograd::set_history(spikes, node);
    torch::autograd::set_history(v_final, node);
  }
  return {spikes, v_final};
}

// Without autograd: the forward alone, shaped like the autograd version's outputs.
ForwardResult slif_no_grad(const at::Tensor& x, const at::Tensor& w, const at::Tensor& theta,
                           const std::optional<at::Tensor>& v_init, int64_t w_channels,
                           int64_t w_inner, int64_t theta_channels, int64_t theta_inner,
                           std::optional<double> v_reset, int64_t surrogate_id, double alpha,
                           bool detach_reset, bool decay_input) {
  return forward_shaped(x, w, theta, v_init,
                        Options{w_channels, w_inner, theta_channels, theta_inner, v_reset,
                                surrogate_id, alpha, detach_reset, decay_input});
}

}  // namespace
}  // namespace effst

// x [T, *] (any per-step shape, N neurons), w / theta any shape holding w_channels /
// theta_channels values of a floating dtype (the kernels run on them as [channels] vectors in
// the compute dtype; their gradients come back in their own shape and dtype), v_init N values
// of any shape in the compute dtype; returns spikes shaped like x and the final state shaped
// like one step of x.
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
