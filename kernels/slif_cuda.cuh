// Host-side entry points of the CUDA sLIF kernels (kernels/slif_cuda.cu).
//
// Torch-free: plain device pointers, sizes and a stream, so the kernels can be compiled and
// tested without libtorch (tests/cpp, tests/test_native_build.py) and called from the torch op
// (csrc/slif_cuda_ops.cpp). Semantics are the internal kernel contract of effst/ops/slif.py on
// the flattened [T, N] view; the math is kernels/slif_recurrence.cuh.
#pragma once

#include <stdint.h>

#include <cuda_runtime_api.h>

namespace effst {
namespace slif_cuda {

// Element type of x, spikes, grad_spikes and grad_x. The compute type (of parameters, states
// and per-neuron gradients) is double for kFloat64 and float otherwise.
enum class IoDtype : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

struct ForwardArgs {
  int64_t T, N;
  IoDtype io;
  const void* x; int64_t x_row_stride;  // [T, N], unit stride along N
  void* spikes;                          // [T, N] contiguous
  const void* w; int64_t w_channels, w_inner;            // decay logits (compute type)
  const void* theta; int64_t theta_channels, theta_inner;  // thresholds (compute type)
  const void* v_init;                    // [N] compute type, or nullptr
  bool hard_reset; double v_reset;       // v_reset is ignored for a soft reset
  bool decay_input;
  void* v_final;                         // [N] compute type
};

struct BackwardArgs {
  int64_t T, N;
  IoDtype io;
  const void* grad_spikes; int64_t grad_row_stride;  // [T, N] I/O type, unit stride along N
  const void* grad_v_final;              // [N] compute type, or nullptr
  const void* x; int64_t x_row_stride;
  const void* w; int64_t w_channels, w_inner;
  const void* theta; int64_t theta_channels, theta_inner;
  const void* v_init;
  bool hard_reset; double v_reset;
  int surrogate_id; double alpha;
  bool detach_reset, decay_input;
  void* checkpoints;                     // backward_checkpoint_count(T, N) compute-type values
  void* grad_x;                          // [T, N] contiguous, I/O type
  void* grad_w; void* grad_theta;        // [N] compute type each
  void* grad_v_init;                     // [N] compute type, or nullptr (no v_init)
};

// Number of compute-type values the backward needs in `checkpoints` (may be 0).
int64_t backward_checkpoint_count(int64_t T, int64_t N);

// Launch on `stream`; return the launch error (cudaSuccess when fine).
cudaError_t slif_forward(const ForwardArgs& args, cudaStream_t stream);
cudaError_t slif_backward(const BackwardArgs& args, cudaStream_t stream);

}  // namespace slif_cuda
}  // namespace effst
