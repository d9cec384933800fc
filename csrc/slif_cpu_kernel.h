// CPU sLIF kernel over blocks of neurons, built on kernels/slif_recurrence.cuh.
//
// Included once per instruction set by csrc/slif_cpu_isa_*.cpp; everything here has internal
// linkage (anonymous namespace) so the per-ISA copies never merge at link time.
//
// Layout of the work. One thread owns a block of B consecutive neurons (B ~ 8k / T, between 64
// and 4096) for all T steps and processes it one time step (one row of B neurons) at a time: the
// inner loops run over neurons with unit stride, the configuration (reset, detach,
// decay_input, surrogate) is a template argument, so the compiler vectorises them, and every
// input row is read as one long contiguous run, which the hardware prefetchers stream well.
// The per-neuron vectors of the block (parameters, membrane, carried gradient, gradient sums)
// live in a per-thread scratch that stays in L2. The backward recomputes V_{t-1} of the block
// into a [T, B] history there rather than checkpointing V in memory: H is never stored and X
// is read once from memory (and once more from cache), the minimum traffic of docs/benchmarks.md.
// Outputs larger than the caches are written with streaming stores (no read-for-ownership).
// (Keeping the per-neuron state in SIMD registers with the time loop innermost was tried and
// measured slower on the 2-core machine: every one of the T rows becomes a separate short
// memory stream.)
#pragma once

// Standard headers come in through slif_cpu_api.h, which the AVX2 unit includes before
// switching the target: only the functions defined here are compiled for AVX2.
#include "slif_cpu_api.h"

namespace effst {
namespace cpu {
namespace {

using slif::backward_step;
using slif::forward_step;

// One block's views, all in the compute type S; rows are `*_stride` elements apart.
template <typename S>
struct BlockForward {
  int64_t T, len;
  const S* x; int64_t x_stride;
  S* spikes; int64_t spikes_stride;
  const S* k; const S* theta;  // [len] gathered parameters
  S* v;                        // [len] membrane: initial state in, final state out
  S* v_other;                  // [len] scratch: the membrane ping-pongs between v and v_other
  S v_reset;
  bool stream;                 // write the spikes with streaming stores
};

template <typename S>
struct BlockBackward {
  int64_t T, len;
  const S* x; int64_t x_stride;
  const S* grad_spikes; int64_t grad_stride;
  S* grad_x; int64_t grad_x_stride;
  const S* k; const S* theta;
  const S* v0;       // [len] initial membrane
  S* v_history;      // [T rows, history_stride apart] scratch: V_{t-1} for every step
  int64_t history_stride;
  S* carry;          // [len] in: final-state gradient; out: gradient of v_init
  S* grad_k;         // [len] out: sum over T of dL/dk
  S* grad_theta;     // [len] out: sum over T of dL/dtheta
  S v_reset, alpha;
  bool stream;       // write grad_x with streaming stores
};

// Row kernels: one time step of a block. Their pointer arguments are restrict-qualified
// parameters (which GCC honours; restrict on local pointers it largely ignores), so the loops
// vectorise without run-time alias checks.
// The row loops run in chunks of 256 bytes and prefetch the row they stream from memory 1 KiB
// ahead (x in the forward, grad_spikes in the backward): the hardware prefetcher restarts at
// every row and page boundary, and this hides those restarts (measured 3 % forward, 7 %
// backward on the 2-core machine). Prefetching past the block is harmless: it is the next
// block of the same row.
constexpr int64_t kChunkBytes = 256;
constexpr int64_t kPrefetchBytes = 1024;

template <typename S>
inline void prefetch_chunk(const S* row, int64_t i0) {
  for (int64_t j = 0; j < kChunkBytes; j += 64) {
    __builtin_prefetch(reinterpret_cast<const char*>(row + i0) + kPrefetchBytes + j, 0, 3);
  }
}

// Output chunks of large tensors are written with non-temporal (streaming) stores: they are
// not read again by this kernel, and a plain store to a line that is not in cache first reads
// it from memory (read-for-ownership), a third more traffic. A chunk is computed into an L1
// buffer and then streamed when the destination is 16-byte aligned (else copied).
template <typename S>
inline void store_chunk(S* __restrict__ dst, const S* __restrict__ src, int64_t n, bool stream) {
#if defined(__SSE2__)
  if (stream && (reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
    int64_t j = 0;
    for (; j + int64_t(16 / sizeof(S)) <= n; j += 16 / sizeof(S)) {
      if constexpr (sizeof(S) == 4) {
        _mm_stream_ps(reinterpret_cast<float*>(dst + j), _mm_loadu_ps(reinterpret_cast<const float*>(src + j)));
      } else {
        _mm_stream_pd(reinterpret_cast<double*>(dst + j), _mm_loadu_pd(reinterpret_cast<const double*>(src + j)));
      }
    }
    for (; j < n; ++j) dst[j] = src[j];
    return;
  }
#endif
  memcpy(dst, src, n * sizeof(S));
}

// A per-neuron vector of the block to its output, streamed or copied.
template <typename S>
inline void store_vector(S* dst, const S* src, int64_t len, bool stream) {
  constexpr int64_t kChunk = kChunkBytes / sizeof(S);
  for (int64_t i0 = 0; i0 < len; i0 += kChunk) store_chunk(dst + i0, src + i0, std::min(kChunk, len - i0), stream);
}

inline void finish_streaming(bool stream) {
#if defined(__SSE2__)
  if (stream) _mm_sfence();  // streaming stores are weakly ordered: publish them before returning
#endif
}

template <typename S, bool HARD, bool DECAY_INPUT, bool WRITE_SPIKES>
void forward_row(int64_t len, const S* __restrict__ x, const S* __restrict__ k,
                 const S* __restrict__ theta, S v_reset, const S* __restrict__ v_prev,
                 S* __restrict__ v_next, S* __restrict__ spikes, bool stream) {
  constexpr int64_t kChunk = kChunkBytes / sizeof(S);
  alignas(64) S out[kChunk];
  for (int64_t i0 = 0; i0 < len; i0 += kChunk) {
    prefetch_chunk(x, i0);
    const int64_t n = std::min(kChunk, len - i0);
    for (int64_t i = 0; i < n; ++i) {
      S spike;
      v_next[i0 + i] = forward_step(x[i0 + i], v_prev[i0 + i], k[i0 + i], theta[i0 + i], v_reset,
                                    HARD, DECAY_INPUT, spike);
      if (WRITE_SPIKES) out[i] = spike;
    }
    if (WRITE_SPIKES) store_chunk(spikes + i0, out, n, stream);
  }
}

template <typename S, int SURROGATE, bool HARD, bool DETACH, bool DECAY_INPUT>
void backward_row(int64_t len, const S* __restrict__ x, const S* __restrict__ k,
                  const S* __restrict__ theta, S v_reset, S alpha, const S* __restrict__ v_prev,
                  const S* __restrict__ grad_spikes, S* __restrict__ grad_x,
                  S* __restrict__ carry, S* __restrict__ grad_k, S* __restrict__ grad_theta,
                  bool stream) {
  constexpr int64_t kChunk = kChunkBytes / sizeof(S);
  alignas(64) S out[kChunk];
  for (int64_t i0 = 0; i0 < len; i0 += kChunk) {
    prefetch_chunk(grad_spikes, i0);
    const int64_t n = std::min(kChunk, len - i0);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t j = i0 + i;
      S c = carry[j], gk = grad_k[j], gth = grad_theta[j];
      out[i] = backward_step<SURROGATE>(x[j], v_prev[j], k[j], theta[j], v_reset, alpha,
                                        grad_spikes[j], HARD, DETACH, DECAY_INPUT, c, gk, gth);
      carry[j] = c;
      grad_k[j] = gk;
      grad_theta[j] = gth;
    }
    store_chunk(grad_x + i0, out, n, stream);
  }
}

template <typename S, bool HARD, bool DECAY_INPUT>
void forward_core(const BlockForward<S>& b) {
  S* v_in = b.v;
  S* v_out = b.v_other;
  for (int64_t t = 0; t < b.T; ++t) {
    forward_row<S, HARD, DECAY_INPUT, true>(b.len, b.x + t * b.x_stride, b.k, b.theta, b.v_reset,
                                            v_in, v_out, b.spikes + t * b.spikes_stride, b.stream);
    std::swap(v_in, v_out);
  }
  if (v_in != b.v) memcpy(b.v, v_in, b.len * sizeof(S));
}

template <typename S, int SURROGATE, bool HARD, bool DETACH, bool DECAY_INPUT>
void backward_core(const BlockBackward<S>& b) {
  const int64_t len = b.len, T = b.T, hs = b.history_stride;
  // Recompute V_{t-1} for t = 0..T-1 into the history (V_{T-1} itself is not needed).
  memcpy(b.v_history, b.v0, len * sizeof(S));
  for (int64_t t = 0; t + 1 < T; ++t) {
    forward_row<S, HARD, DECAY_INPUT, false>(len, b.x + t * b.x_stride, b.k, b.theta, b.v_reset,
                                             b.v_history + t * hs, b.v_history + (t + 1) * hs,
                                             nullptr, false);
  }
  for (int64_t i = 0; i < len; ++i) {
    b.grad_k[i] = S(0);
    b.grad_theta[i] = S(0);
  }
  for (int64_t t = T - 1; t >= 0; --t) {
    backward_row<S, SURROGATE, HARD, DETACH, DECAY_INPUT>(
        len, b.x + t * b.x_stride, b.k, b.theta, b.v_reset, b.alpha, b.v_history + t * hs,
        b.grad_spikes + t * b.grad_stride, b.grad_x + t * b.grad_x_stride, b.carry, b.grad_k,
        b.grad_theta, b.stream);
  }
}

template <typename S>
using ForwardCore = void (*)(const BlockForward<S>&);
template <typename S>
using BackwardCore = void (*)(const BlockBackward<S>&);

template <typename S>
ForwardCore<S> pick_forward(bool hard, bool decay_input) {
  if (hard) return decay_input ? forward_core<S, true, true> : forward_core<S, true, false>;
  return decay_input ? forward_core<S, false, true> : forward_core<S, false, false>;
}

template <typename S, int SURROGATE>
BackwardCore<S> pick_backward_flags(bool hard, bool detach, bool decay_input) {
  const int code = (hard ? 4 : 0) | (detach ? 2 : 0) | (decay_input ? 1 : 0);
  switch (code) {
    case 0: return backward_core<S, SURROGATE, false, false, false>;
    case 1: return backward_core<S, SURROGATE, false, false, true>;
    case 2: return backward_core<S, SURROGATE, false, true, false>;
    case 3: return backward_core<S, SURROGATE, false, true, true>;
    case 4: return backward_core<S, SURROGATE, true, false, false>;
    case 5: return backward_core<S, SURROGATE, true, false, true>;
    case 6: return backward_core<S, SURROGATE, true, true, false>;
    default: return backward_core<S, SURROGATE, true, true, true>;
  }
}

template <typename S>
BackwardCore<S> pick_backward(int surrogate_id, bool hard, bool detach, bool decay_input) {
  switch (surrogate_id) {
    case slif::kSigmoid: return pick_backward_flags<S, slif::kSigmoid>(hard, detach, decay_input);
    case slif::kAtan: return pick_backward_flags<S, slif::kAtan>(hard, detach, decay_input);
    case slif::kPiecewiseQuadratic:
      return pick_backward_flags<S, slif::kPiecewiseQuadratic>(hard, detach, decay_input);
    case slif::kPiecewiseExp: return pick_backward_flags<S, slif::kPiecewiseExp>(hard, detach, decay_input);
    case slif::kSoftSign: return pick_backward_flags<S, slif::kSoftSign>(hard, detach, decay_input);
    case slif::kSuperSpike: return pick_backward_flags<S, slif::kSuperSpike>(hard, detach, decay_input);
    case slif::kErf: return pick_backward_flags<S, slif::kErf>(hard, detach, decay_input);
    default: return pick_backward_flags<S, slif::kRect>(hard, detach, decay_input);
  }
}

// Copies the parameter entries used by neurons n0..n0+len-1 into out, one run at a time (a
// run is a contiguous slice of the table when inner == 1, else `inner` copies of one entry),
// so there is no division or branch per neuron.
template <typename S>
void gather_parameter(const S* __restrict__ table, int64_t channels, int64_t inner, int64_t n0,
                      int64_t len, S* __restrict__ out) {
  const int64_t q = n0 / inner;
  int64_t r = n0 - q * inner;  // position inside the current run of `inner` neurons
  int64_t c = q % channels;    // current entry
  int64_t i = 0;
  if (inner == 1) {
    while (i < len) {
      const int64_t n = std::min(len - i, channels - c);
      memcpy(out + i, table + c, n * sizeof(S));
      i += n;
      c = 0;
    }
    return;
  }
  while (i < len) {
    const int64_t n = std::min(len - i, inner - r);
    const S value = table[c];
    for (int64_t j = 0; j < n; ++j) out[i + j] = value;
    i += n;
    r = 0;
    if (++c == channels) c = 0;
  }
}

// Row-by-row conversion between 16-bit I/O and the float compute type.
template <typename From, typename To>
void convert_rows(const From* src, int64_t src_stride, To* dst, int64_t dst_stride, int64_t rows,
                  int64_t len) {
  for (int64_t t = 0; t < rows; ++t) {
    const From* __restrict__ s = src + t * src_stride;
    To* __restrict__ d = dst + t * dst_stride;
    for (int64_t i = 0; i < len; ++i) d[i] = static_cast<To>(s[i]);
  }
}

// Carves the per-thread scratch into consecutive [rows, B] pieces.
template <typename S>
struct ScratchCarver {
  S* next;
  int64_t stride;
  S* take(int64_t rows = 1) {
    S* out = next;
    next += rows * stride;
    return out;
  }
};

// IO is the element type of x/spikes/grad tensors; S the compute type (float unless IO=double).
// 16-bit inputs and outputs go through [T, B] float staging buffers; float and double ones are
// read and written in place by the row kernels.
template <typename IO, typename S>
void forward_blocks(const ForwardArgs<S>& a, int64_t block_begin, int64_t block_end, S* scratch) {
  constexpr bool kStaged = !std::is_same<IO, S>::value;
  const int64_t B = a.block;
  ScratchCarver<S> carve{scratch, B};  // forward_scratch_elems values
  S* k = carve.take();
  S* theta = carve.take();
  S* v = carve.take();
  S* v_other = carve.take();
  S* staged_x = kStaged ? carve.take(a.T) : nullptr;
  S* staged_s = kStaged ? carve.take(a.T) : nullptr;
  const int64_t staged_stride = carve.stride;
  const ForwardCore<S> core = pick_forward<S>(a.hard_reset, a.decay_input);
  const S default_v0 = a.hard_reset ? a.v_reset : S(0);
  for (int64_t blk = block_begin; blk < block_end; ++blk) {
    const int64_t n0 = blk * B;
    const int64_t len = a.N - n0 < B ? a.N - n0 : B;
    gather_parameter(a.k_table, a.k_channels, a.k_inner, n0, len, k);
    gather_parameter(a.theta, a.theta_channels, a.theta_inner, n0, len, theta);
    if (a.v_init != nullptr) {
      memcpy(v, a.v_init + n0, len * sizeof(S));
    } else {
      for (int64_t i = 0; i < len; ++i) v[i] = default_v0;
    }
    const IO* x = static_cast<const IO*>(a.x) + n0;
    IO* spikes = static_cast<IO*>(a.spikes) + n0;
    if constexpr (kStaged) {
      convert_rows(x, a.x_row_stride, staged_x, staged_stride, a.T, len);
      core(BlockForward<S>{a.T, len, staged_x, staged_stride, staged_s, staged_stride, k, theta, v,
                           v_other, a.v_reset, false});
      convert_rows(staged_s, staged_stride, spikes, a.N, a.T, len);
    } else {
      core(BlockForward<S>{a.T, len, x, a.x_row_stride, spikes, a.N, k, theta, v, v_other,
                           a.v_reset, a.stream_outputs});
    }
    store_vector(a.v_final + n0, v, len, a.stream_outputs);
  }
  finish_streaming(a.stream_outputs);
}

template <typename IO, typename S>
void backward_blocks(const BackwardArgs<S>& a, int64_t block_begin, int64_t block_end,
                     S* scratch) {
  constexpr bool kStaged = !std::is_same<IO, S>::value;
  const int64_t B = a.block;
  ScratchCarver<S> carve{scratch, B};  // backward_scratch_elems values
  S* k = carve.take();
  S* theta = carve.take();
  S* v0 = carve.take();
  S* carry = carve.take();
  S* grad_k = carve.take();
  S* grad_theta = carve.take();
  S* v_history = carve.take(a.T);
  S* staged_x = kStaged ? carve.take(a.T) : nullptr;
  S* staged_gs = kStaged ? carve.take(a.T) : nullptr;
  S* staged_gx = kStaged ? carve.take(a.T) : nullptr;
  const int64_t stride = carve.stride;
  const BackwardCore<S> core =
      pick_backward<S>(a.surrogate_id, a.hard_reset, a.detach_reset, a.decay_input);
  const S default_v0 = a.hard_reset ? a.v_reset : S(0);
  for (int64_t blk = block_begin; blk < block_end; ++blk) {
    const int64_t n0 = blk * B;
    const int64_t len = a.N - n0 < B ? a.N - n0 : B;
    gather_parameter(a.k_table, a.k_channels, a.k_inner, n0, len, k);
    gather_parameter(a.theta, a.theta_channels, a.theta_inner, n0, len, theta);
    if (a.v_init != nullptr) {
      memcpy(v0, a.v_init + n0, len * sizeof(S));
    } else {
      for (int64_t i = 0; i < len; ++i) v0[i] = default_v0;
    }
    if (a.grad_v_final != nullptr) {
      memcpy(carry, a.grad_v_final + n0, len * sizeof(S));
    } else {
      for (int64_t i = 0; i < len; ++i) carry[i] = S(0);
    }
    const IO* x = static_cast<const IO*>(a.x) + n0;
    const IO* gs = static_cast<const IO*>(a.grad_spikes) + n0;
    IO* gx = static_cast<IO*>(a.grad_x) + n0;
    if constexpr (kStaged) {
      convert_rows(x, a.x_row_stride, staged_x, stride, a.T, len);
      convert_rows(gs, a.grad_row_stride, staged_gs, stride, a.T, len);
      core(BlockBackward<S>{a.T, len, staged_x, stride, staged_gs, stride, staged_gx, stride, k,
                            theta, v0, v_history, stride, carry, grad_k, grad_theta, a.v_reset,
                            a.alpha, false});
      convert_rows(staged_gx, stride, gx, a.N, a.T, len);
    } else {
      core(BlockBackward<S>{a.T, len, x, a.x_row_stride, gs, a.grad_row_stride, gx, a.N, k, theta,
                            v0, v_history, stride, carry, grad_k, grad_theta, a.v_reset, a.alpha,
                            a.stream_outputs});
    }
    for (int64_t i = 0; i < len; ++i) {
      grad_k[i] = grad_k[i] * k[i] * (S(1) - k[i]);  // dL/dw: chain rule through k = sigmoid(w)
    }
    store_vector(a.grad_w + n0, grad_k, len, a.stream_outputs);
    store_vector(a.grad_theta + n0, grad_theta, len, a.stream_outputs);
    if (a.grad_v_init != nullptr) store_vector(a.grad_v_init + n0, carry, len, a.stream_outputs);
  }
  finish_streaming(a.stream_outputs);
}

// The table each per-ISA translation unit exports.
const KernelTable kTable = {
    forward_blocks<float, float>,          forward_blocks<double, double>,
    forward_blocks<c10::Half, float>,      forward_blocks<c10::BFloat16, float>,
    backward_blocks<float, float>,         backward_blocks<double, double>,
    backward_blocks<c10::Half, float>,     backward_blocks<c10::BFloat16, float>,
};

}  // namespace
}  // namespace cpu
}  // namespace effst
