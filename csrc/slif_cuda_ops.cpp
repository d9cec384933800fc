// CUDA implementation of the effst_native sLIF ops: checks, allocation on the caching allocator,
// and the launch of the torch-free kernels of kernels/slif_cuda.cu on the current stream.
// Compiled only into builds with CUDA (EFFST_WITH_CUDA=1).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../kernels/slif_cuda.cuh"
#include "slif_native.h"

#include <ATen/ops/zeros.h>

namespace effst {
namespace {

slif_cuda::IoDtype io_dtype(at::ScalarType dt) {
  switch (dt) {
    case at::kFloat: return slif_cuda::IoDtype::kFloat32;
    case at::kDouble: return slif_cuda::IoDtype::kFloat64;
    case at::kHalf: return slif_cuda::IoDtype::kFloat16;
    case at::kBFloat16: return slif_cuda::IoDtype::kBFloat16;
    default: TORCH_CHECK(false, "x: expected dtype float32, float64, float16 or bfloat16, got ", dt);
  }
}

void check_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "x: expected a CUDA tensor for the CUDA kernel, got ", x.device());
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "effst_native: launching the CUDA ", what, " kernel failed: ",
              cudaGetErrorString(err));
}

const void* optional_ptr(const std::optional<at::Tensor>& t, at::Tensor& keep) {
  if (!t.has_value()) return nullptr;
  keep = t->contiguous();
  return keep.data_ptr();
}

ForwardResult slif_forward_cuda(const at::Tensor& x_in, const at::Tensor& w,
                                const at::Tensor& theta, const std::optional<at::Tensor>& v_init,
                                int64_t w_channels, int64_t w_inner, int64_t theta_channels,
                                int64_t theta_inner, std::optional<double> v_reset,
                                int64_t surrogate_id, double alpha, bool detach_reset,
                                bool decay_input) {
  (void)detach_reset;
  check_cuda(x_in);
  detail::check_slif_args(x_in, w, theta, v_init, w_channels, w_inner, theta_channels, theta_inner,
                          v_reset, surrogate_id, alpha);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = detail::unit_stride_rows(x_in);
  const int64_t T = x.size(0), N = x.size(1);
  const auto cdt = detail::compute_dtype(x);
  at::Tensor spikes = at::empty({T, N}, x.options());
  at::Tensor v_final = at::empty({N}, x.options().dtype(cdt));
  const at::Tensor w_c = w.contiguous(), theta_c = theta.contiguous();
  at::Tensor v_init_c;
  slif_cuda::ForwardArgs a{};
  a.T = T;
  a.N = N;
  a.io = io_dtype(x.scalar_type());
  a.x = x.data_ptr();
  a.x_row_stride = x.stride(0);
  a.spikes = spikes.data_ptr();
  a.w = w_c.data_ptr();
  a.w_channels = w_channels;
  a.w_inner = w_inner;
  a.theta = theta_c.data_ptr();
  a.theta_channels = theta_channels;
  a.theta_inner = theta_inner;
  a.v_init = optional_ptr(v_init, v_init_c);
  a.hard_reset = v_reset.has_value();
  a.v_reset = v_reset.value_or(0.0);
  a.decay_input = decay_input;
  a.v_final = v_final.data_ptr();
  check_launch(slif_cuda::slif_forward(a, c10::cuda::getCurrentCUDAStream()), "forward");
  return {spikes, v_final};
}

BackwardResult slif_backward_cuda(const at::Tensor& grad_spikes_in,
                                  const std::optional<at::Tensor>& grad_v_final,
                                  const at::Tensor& x_in, const at::Tensor& w,
                                  const at::Tensor& theta, const std::optional<at::Tensor>& v_init,
                                  int64_t w_channels, int64_t w_inner, int64_t theta_channels,
                                  int64_t theta_inner, std::optional<double> v_reset,
                                  int64_t surrogate_id, double alpha, bool detach_reset,
                                  bool decay_input) {
  check_cuda(x_in);
  detail::check_slif_args(x_in, w, theta, v_init, w_channels, w_inner, theta_channels, theta_inner,
                          v_reset, surrogate_id, alpha);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = detail::unit_stride_rows(x_in);
  const at::Tensor grad_spikes = detail::check_grad_spikes(grad_spikes_in, x);
  const int64_t T = x.size(0), N = x.size(1);
  const auto cdt = detail::compute_dtype(x);
  if (grad_v_final.has_value()) {
    detail::check_vector(*grad_v_final, "grad_v_final", N, cdt, x, "the gradient of v_final");
  }
  const auto per_neuron = x.options().dtype(cdt);
  at::Tensor grad_x = at::empty({T, N}, x.options());
  at::Tensor grad_w = at::empty({N}, per_neuron);
  at::Tensor grad_theta = at::empty({N}, per_neuron);
  // [1] zero placeholder without v_init (see slif_cpu.cpp)
  at::Tensor grad_v_init = v_init.has_value() ? at::empty({N}, per_neuron) : at::zeros({1}, per_neuron);
  const int64_t checkpoint_count = slif_cuda::backward_checkpoint_count(T, N);
  at::Tensor checkpoints = at::empty({checkpoint_count}, per_neuron);
  const at::Tensor w_c = w.contiguous(), theta_c = theta.contiguous();
  at::Tensor v_init_c, grad_v_final_c;
  slif_cuda::BackwardArgs a{};
  a.T = T;
  a.N = N;
  a.io = io_dtype(x.scalar_type());
  a.grad_spikes = grad_spikes.data_ptr();
  a.grad_row_stride = grad_spikes.stride(0);
  a.grad_v_final = optional_ptr(grad_v_final, grad_v_final_c);
  a.x = x.data_ptr();
  a.x_row_stride = x.stride(0);
  a.w = w_c.data_ptr();
  a.w_channels = w_channels;
  a.w_inner = w_inner;
  a.theta = theta_c.data_ptr();
  a.theta_channels = theta_channels;
  a.theta_inner = theta_inner;
  a.v_init = optional_ptr(v_init, v_init_c);
  a.hard_reset = v_reset.has_value();
  a.v_reset = v_reset.value_or(0.0);
  a.surrogate_id = static_cast<int>(surrogate_id);
  a.alpha = alpha;
  a.detach_reset = detach_reset;
  a.decay_input = decay_input;
  a.checkpoints = checkpoint_count > 0 ? checkpoints.data_ptr() : nullptr;
  a.grad_x = grad_x.data_ptr();
  a.grad_w = grad_w.data_ptr();
  a.grad_theta = grad_theta.data_ptr();
  a.grad_v_init = v_init.has_value() ? grad_v_init.data_ptr() : nullptr;
  check_launch(slif_cuda::slif_backward(a, c10::cuda::getCurrentCUDAStream()), "backward");
  return {grad_x, grad_w, grad_theta, grad_v_init};
}

}  // namespace
}  // namespace effst

TORCH_LIBRARY_IMPL(effst_native, CUDA, m) {
  m.impl("slif_forward", &effst::slif_forward_cuda);
  m.impl("slif_backward", &effst::slif_backward_cuda);
}
