// CUDA sLIF kernels: one thread per neuron, a loop over T, the recurrence of
// kernels/slif_recurrence.cuh (shared with the CPU kernel). Torch-free.
//
// Forward: reads X once, writes spikes and the final membrane; H is never stored.
// Backward: checkpointed recompute (slif::backward_neuron): for T <= 16 the whole sequence is
// recomputed in registers from v_init (X read once); for longer sequences a forward pass first
// stores V every 16 steps in `checkpoints`, then each 16-step chunk is recomputed in registers
// and differentiated in reverse. Per-neuron parameter gradients are plain stores (the caller
// reduces them deterministically; no atomics).
#include "slif_cuda.cuh"
#include "slif_cuda_io.cuh"
#include "slif_recurrence.cuh"

namespace effst {
namespace slif_cuda {
namespace {

constexpr int kThreads = 256;

template <typename S>
__device__ __forceinline__ S parameter(const void* table, int64_t n, int64_t channels, int64_t inner) {
  return static_cast<const S*>(table)[slif::parameter_entry(n, channels, inner)];
}

template <typename IO, typename S>
__global__ void __launch_bounds__(kThreads) forward_kernel(const ForwardArgs a) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= a.N) return;
  const S k = slif::decay_from_logit(parameter<S>(a.w, n, a.w_channels, a.w_inner));
  const S theta = parameter<S>(a.theta, n, a.theta_channels, a.theta_inner);
  const S v_reset = a.hard_reset ? static_cast<S>(a.v_reset) : S(0);
  const S v0 = a.v_init != nullptr ? static_cast<const S*>(a.v_init)[n] : v_reset;
  slif::forward_neuron<IO, S>(n, a.T, a.N, static_cast<const IO*>(a.x), a.x_row_stride,
                              static_cast<IO*>(a.spikes), k, theta, v0, v_reset, a.hard_reset,
                              a.decay_input, static_cast<S*>(a.v_final));
}

template <int SURROGATE, typename IO, typename S>
__global__ void __launch_bounds__(kThreads) backward_kernel(const BackwardArgs a) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= a.N) return;
  const S k = slif::decay_from_logit(parameter<S>(a.w, n, a.w_channels, a.w_inner));
  const S theta = parameter<S>(a.theta, n, a.theta_channels, a.theta_inner);
  const S v_reset = a.hard_reset ? static_cast<S>(a.v_reset) : S(0);
  const S v0 = a.v_init != nullptr ? static_cast<const S*>(a.v_init)[n] : v_reset;
  slif::backward_neuron<SURROGATE, IO, S, IO>(
      n, a.T, a.N, static_cast<const IO*>(a.grad_spikes), a.grad_row_stride,
      static_cast<const S*>(a.grad_v_final), static_cast<const IO*>(a.x), a.x_row_stride, k,
      theta, v0, v_reset, static_cast<S>(a.alpha), a.hard_reset, a.detach_reset, a.decay_input,
      static_cast<S*>(a.checkpoints), static_cast<IO*>(a.grad_x), static_cast<S*>(a.grad_w),
      static_cast<S*>(a.grad_theta), static_cast<S*>(a.grad_v_init));
}

int64_t grid_for(int64_t N) { return (N + kThreads - 1) / kThreads; }

template <typename IO, typename S>
cudaError_t launch_forward(const ForwardArgs& a, cudaStream_t stream) {
  forward_kernel<IO, S><<<grid_for(a.N), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <int SURROGATE>
cudaError_t launch_backward_io(const BackwardArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(grid_for(a.N)));
  switch (a.io) {
    case IoDtype::kFloat32:
      backward_kernel<SURROGATE, float, float><<<grid, kThreads, 0, stream>>>(a);
      break;
    case IoDtype::kFloat64:
      backward_kernel<SURROGATE, double, double><<<grid, kThreads, 0, stream>>>(a);
      break;
    case IoDtype::kFloat16:
      backward_kernel<SURROGATE, __half, float><<<grid, kThreads, 0, stream>>>(a);
      break;
    case IoDtype::kBFloat16:
      backward_kernel<SURROGATE, __nv_bfloat16, float><<<grid, kThreads, 0, stream>>>(a);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

int64_t backward_checkpoint_count(int64_t T, int64_t N) {
  const int64_t chunks = (T + slif::kBackwardChunk - 1) / slif::kBackwardChunk;
  return chunks > 1 ? (chunks - 1) * N : 0;
}

cudaError_t slif_forward(const ForwardArgs& a, cudaStream_t stream) {
  if (a.N == 0) return cudaSuccess;
  if (grid_for(a.N) > 0x7fffffff) return cudaErrorInvalidConfiguration;
  switch (a.io) {
    case IoDtype::kFloat32: return launch_forward<float, float>(a, stream);
    case IoDtype::kFloat64: return launch_forward<double, double>(a, stream);
    case IoDtype::kFloat16: return launch_forward<__half, float>(a, stream);
    case IoDtype::kBFloat16: return launch_forward<__nv_bfloat16, float>(a, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t slif_backward(const BackwardArgs& a, cudaStream_t stream) {
  if (a.N == 0) return cudaSuccess;
  if (grid_for(a.N) > 0x7fffffff) return cudaErrorInvalidConfiguration;
  if (backward_checkpoint_count(a.T, a.N) > 0 && a.checkpoints == nullptr) return cudaErrorInvalidValue;
  switch (a.surrogate_id) {
    case slif::kSigmoid: return launch_backward_io<slif::kSigmoid>(a, stream);
    case slif::kAtan: return launch_backward_io<slif::kAtan>(a, stream);
    case slif::kPiecewiseQuadratic: return launch_backward_io<slif::kPiecewiseQuadratic>(a, stream);
    case slif::kPiecewiseExp: return launch_backward_io<slif::kPiecewiseExp>(a, stream);
    case slif::kSoftSign: return launch_backward_io<slif::kSoftSign>(a, stream);
    case slif::kSuperSpike: return launch_backward_io<slif::kSuperSpike>(a, stream);
    case slif::kErf: return launch_backward_io<slif::kErf>(a, stream);
    case slif::kRect: return launch_backward_io<slif::kRect>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace slif_cuda
}  // namespace effst
