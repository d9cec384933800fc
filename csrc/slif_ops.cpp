// Registers the effst_native operator library (torch.ops.effst_native.*): schemas, CPU kernels,
// shape-only Meta kernels (for torch.compile / fake tensors). The CUDA kernels are registered
// by csrc/slif_cuda_ops.cpp when the extension is built with CUDA.
#if defined(EFFST_PYTHON_MODULE)
#include <Python.h>
#endif

#include <string>

#include <torch/library.h>

#include "../kernels/slif_recurrence.cuh"
#include "slif_native.h"

// The build passes the source hash as a bare token (-DEFFST_SOURCE_HASH=<hex>, no quoting
// through ninja/setuptools); it is turned into a string here.
#define EFFST_STRINGIFY_(x) #x
#define EFFST_STRINGIFY(x) EFFST_STRINGIFY_(x)
#ifdef EFFST_SOURCE_HASH
#define EFFST_SOURCE_HASH_STR EFFST_STRINGIFY(EFFST_SOURCE_HASH)
#else
#define EFFST_SOURCE_HASH_STR "unknown"
#endif
#ifndef EFFST_WITH_CUDA
#define EFFST_WITH_CUDA 0
#endif

namespace effst {
namespace {

ForwardResult slif_forward_meta(const at::Tensor& x, const at::Tensor& w, const at::Tensor& theta,
                                const std::optional<at::Tensor>& v_init, int64_t w_channels,
                                int64_t w_inner, int64_t theta_channels, int64_t theta_inner,
                                std::optional<double> v_reset, int64_t surrogate_id, double alpha,
                                bool, bool) {
  detail::check_slif_args(x, w, theta, v_init, w_channels, w_inner, theta_channels, theta_inner,
                          v_reset, surrogate_id, alpha);
  const auto cdt = detail::compute_dtype(x);
  return {at::empty({x.size(0), x.size(1)}, x.options()),
          at::empty({x.size(1)}, x.options().dtype(cdt))};
}

BackwardResult slif_backward_meta(const at::Tensor& grad_spikes,
                                  const std::optional<at::Tensor>&, const at::Tensor& x,
                                  const at::Tensor& w, const at::Tensor& theta,
                                  const std::optional<at::Tensor>& v_init, int64_t w_channels,
                                  int64_t w_inner, int64_t theta_channels, int64_t theta_inner,
                                  std::optional<double> v_reset, int64_t surrogate_id,
                                  double alpha, bool, bool) {
  detail::check_slif_args(x, w, theta, v_init, w_channels, w_inner, theta_channels, theta_inner,
                          v_reset, surrogate_id, alpha);
  detail::check_grad_spikes(grad_spikes, x);
  const auto per_neuron = x.options().dtype(detail::compute_dtype(x));
  return {at::empty({x.size(0), x.size(1)}, x.options()), at::empty({x.size(1)}, per_neuron),
          at::empty({x.size(1)}, per_neuron),
          at::empty({v_init.has_value() ? x.size(1) : 1}, per_neuron)};
}

// sigma'(x) of the native header, elementwise (lets tests compare it with surrogates.py).
at::Tensor surrogate_grad_cpu(const at::Tensor& x, int64_t surrogate_id, double alpha) {
  TORCH_CHECK(x.device().is_cpu(), "x: expected a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "x: expected dtype float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(surrogate_id >= 0 && surrogate_id < slif::kNumSurrogates,
              "surrogate_id: expected an index into SURROGATE_NAMES (0..7), got ", surrogate_id);
  at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  const auto apply = [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t* src = xc.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    for (int64_t i = 0; i < xc.numel(); ++i) {
      dst[i] = slif::surrogate_grad_by_id(static_cast<int>(surrogate_id), src[i],
                                          static_cast<scalar_t>(alpha));
    }
  };
  if (xc.scalar_type() == at::kDouble) {
    apply(0.0);
  } else {
    apply(0.0f);
  }
  return out;
}

std::string build_info() {
  return std::string("source_hash=") + EFFST_SOURCE_HASH_STR + ";cuda=" +
         (EFFST_WITH_CUDA ? "1" : "0") + ";cpu_isa=" + cpu_isa();
}

}  // namespace
}  // namespace effst

TORCH_LIBRARY(effst_native, m) {
  m.def(
      "slif_forward(Tensor x, Tensor w, Tensor theta, Tensor? v_init, int w_channels, "
      "int w_inner, int theta_channels, int theta_inner, float? v_reset, int surrogate_id, "
      "float alpha, bool detach_reset, bool decay_input) -> (Tensor, Tensor)");
  m.def(
      "slif_backward(Tensor grad_spikes, Tensor? grad_v_final, Tensor x, Tensor w, Tensor theta, "
      "Tensor? v_init, int w_channels, int w_inner, int theta_channels, int theta_inner, "
      "float? v_reset, int surrogate_id, float alpha, bool detach_reset, bool decay_input) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("surrogate_grad(Tensor x, int surrogate_id, float alpha) -> Tensor");
  m.def("build_info() -> str", &effst::build_info);
}

TORCH_LIBRARY_IMPL(effst_native, CPU, m) {
  m.impl("slif_forward", &effst::slif_forward_cpu);
  m.impl("slif_backward", &effst::slif_backward_cpu);
  m.impl("surrogate_grad", &effst::surrogate_grad_cpu);
}

TORCH_LIBRARY_IMPL(effst_native, Meta, m) {
  m.impl("slif_forward", &effst::slif_forward_meta);
  m.impl("slif_backward", &effst::slif_backward_meta);
}

#if defined(EFFST_PYTHON_MODULE)
// Lets the ahead-of-time build be imported as the Python module effst._native (importing it
// loads the library, whose static initialisers register the ops above).
extern "C" PyMODINIT_FUNC PyInit__native(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
#endif
