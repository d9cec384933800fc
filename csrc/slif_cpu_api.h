// Interface between the tensor-level CPU op (csrc/slif_cpu.cpp) and the per-instruction-set
// kernel translation units (csrc/slif_cpu_isa_*.cpp). Plain pointers and sizes only.
#pragma once

#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <type_traits>
#include <utility>
#if defined(__SSE2__)
#include <emmintrin.h>  // streaming stores (every x86-64 CPU has SSE2)
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../kernels/slif_recurrence.cuh"

namespace effst {
namespace cpu {

// S is the compute type: double for float64 I/O, float otherwise. Parameter tables and
// per-neuron outputs are in S; x/spikes/gradients of x are in the I/O type of the kernel.
template <typename S>
struct ForwardArgs {
  int64_t T, N, block;             // block: neurons per work item
  const void* x; int64_t x_row_stride;
  void* spikes;                    // [T, N] contiguous
  const S* k_table; int64_t k_channels, k_inner;  // decay sigmoid(w) per parameter entry
  const S* theta; int64_t theta_channels, theta_inner;
  const S* v_init;                 // [N] or nullptr (then v_reset, or 0 for a soft reset)
  S v_reset;                       // 0 for a soft reset
  bool hard_reset, decay_input;
  S* v_final;                      // [N]
  bool stream_outputs;             // write the outputs with streaming (non-temporal) stores
};

template <typename S>
struct BackwardArgs {
  int64_t T, N, block;
  const void* grad_spikes; int64_t grad_row_stride;  // I/O type
  const S* grad_v_final;           // [N] or nullptr
  const void* x; int64_t x_row_stride;
  const S* k_table; int64_t k_channels, k_inner;
  const S* theta; int64_t theta_channels, theta_inner;
  const S* v_init;
  S v_reset, alpha;
  int surrogate_id;
  bool hard_reset, detach_reset, decay_input;
  void* grad_x;                    // [T, N] contiguous, I/O type
  S* grad_w; S* grad_theta;        // [N] each
  S* grad_v_init;                  // [N], or nullptr when there is no v_init
  bool stream_outputs;             // write the outputs with streaming (non-temporal) stores
};

// Scratch each worker needs for a block of B neurons (values of S): the forward needs 4
// vectors of B values and the backward 6 plus a [T, B] membrane history; 16-bit I/O
// (`staged`) adds [T, B] staging buffers.
inline int64_t forward_scratch_elems(int64_t T, int64_t B, bool staged) {
  return B * (4 + (staged ? 2 * T : 0));
}
inline int64_t backward_scratch_elems(int64_t T, int64_t B, bool staged) {
  return B * (6 + T + (staged ? 3 * T : 0));
}

template <typename S>
using ForwardBlocksFn = void (*)(const ForwardArgs<S>&, int64_t block_begin, int64_t block_end,
                                 S* scratch);
template <typename S>
using BackwardBlocksFn = void (*)(const BackwardArgs<S>&, int64_t block_begin, int64_t block_end,
                                  S* scratch);

// One entry per I/O type: float32, float64, float16, bfloat16.
struct KernelTable {
  ForwardBlocksFn<float> forward_f32;
  ForwardBlocksFn<double> forward_f64;
  ForwardBlocksFn<float> forward_f16;
  ForwardBlocksFn<float> forward_bf16;
  BackwardBlocksFn<float> backward_f32;
  BackwardBlocksFn<double> backward_f64;
  BackwardBlocksFn<float> backward_f16;
  BackwardBlocksFn<float> backward_bf16;
};

// Portable build (the compiler's baseline instruction set).
const KernelTable* kernels_baseline();
// x86-64 AVX2 build, or nullptr where the compiler cannot target it.
const KernelTable* kernels_avx2();

}  // namespace cpu
}  // namespace effst
