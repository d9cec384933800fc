// The per-neuron sLIF recurrence (docs/slif.md), written once for every native path.
//
// Torch-free and dependency-free: the CPU kernel (csrc/slif_cpu_kernel.h, compiled by the host
// compiler) and the CUDA kernels (kernels/slif_cuda.cu, compiled by nvcc) both include this
// header, so the two native paths cannot drift apart. Every function is a
// `__host__ __device__` inline template over the compute scalar S (float or double).
//
// Surrogate ids: the position of the name in SURROGATE_NAMES of effst/ops/surrogates.py.
// That tuple is the source of truth; tests/test_slif_native.py checks these formulas against
// effst.ops.surrogates.surrogate_grad numerically for every id.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define EFFST_HD __host__ __device__ __forceinline__
#define EFFST_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
// Always inlined into the vectorised CPU loops (an out-of-line call would stop vectorisation).
#define EFFST_HD inline __attribute__((always_inline))
#define EFFST_UNROLL
#else
#define EFFST_HD inline
#define EFFST_UNROLL
#endif

namespace effst {
namespace slif {

// Same order as SURROGATE_NAMES in effst/ops/surrogates.py.
enum SurrogateId : int {
  kSigmoid = 0,
  kAtan = 1,
  kPiecewiseQuadratic = 2,
  kPiecewiseExp = 3,
  kSoftSign = 4,
  kSuperSpike = 5,
  kErf = 6,
  kRect = 7,
  kNumSurrogates = 8,
};

// Math overloads by scalar type; spelled out so that host and device pick the same functions.
EFFST_HD float exp_(float x) { return expf(x); }
EFFST_HD double exp_(double x) { return exp(x); }
EFFST_HD float abs_(float x) { return fabsf(x); }
EFFST_HD double abs_(double x) { return fabs(x); }

// sigma'(x): derivative of the spike w.r.t. x = H - theta (docs/slif.md, surrogate table).
template <int SURROGATE, typename S>
EFFST_HD S surrogate_grad(S x, S alpha) {
  if constexpr (SURROGATE == kSigmoid) {
    const S s = S(1) / (S(1) + exp_(-alpha * x));
    return alpha * s * (S(1) - s);
  } else if constexpr (SURROGATE == kAtan) {
    const S u = S(1.5707963267948966) * alpha * x;
    return (alpha * S(0.5)) / (S(1) + u * u);
  } else if constexpr (SURROGATE == kPiecewiseQuadratic) {
    const S g = alpha - alpha * alpha * abs_(x);
    return g > S(0) ? g : S(0);
  } else if constexpr (SURROGATE == kPiecewiseExp) {
    return (alpha * S(0.5)) * exp_(-alpha * abs_(x));
  } else if constexpr (SURROGATE == kSoftSign) {
    const S d = S(1) / alpha + abs_(x);
    return S(1) / (S(2) * alpha * d * d);
  } else if constexpr (SURROGATE == kSuperSpike) {
    const S d = S(1) + abs_(x);
    return alpha / (d * d);
  } else if constexpr (SURROGATE == kErf) {
    const S ax = alpha * x;
    return (alpha * S(0.5641895835477563)) * exp_(-(ax * ax));  // alpha / sqrt(pi)
  } else {
    static_assert(SURROGATE == kRect, "unknown surrogate id");
    return abs_(x) < alpha * S(0.5) ? S(1) / alpha : S(0);
  }
}

// Same, with the id known only at run time (tests, the surrogate probe op).
template <typename S>
EFFST_HD S surrogate_grad_by_id(int surrogate_id, S x, S alpha) {
  switch (surrogate_id) {
    case kSigmoid: return surrogate_grad<kSigmoid>(x, alpha);
    case kAtan: return surrogate_grad<kAtan>(x, alpha);
    case kPiecewiseQuadratic: return surrogate_grad<kPiecewiseQuadratic>(x, alpha);
    case kPiecewiseExp: return surrogate_grad<kPiecewiseExp>(x, alpha);
    case kSoftSign: return surrogate_grad<kSoftSign>(x, alpha);
    case kSuperSpike: return surrogate_grad<kSuperSpike>(x, alpha);
    case kErf: return surrogate_grad<kErf>(x, alpha);
    default: return surrogate_grad<kRect>(x, alpha);
  }
}

// Decay k = 1/tau = sigmoid(w) (effst/ops/parametrization.py).
template <typename S>
EFFST_HD S decay_from_logit(S w) {
  return S(1) / (S(1) + exp_(-w));
}

// Charge: H_t from V_{t-1} and X_t. For a soft reset the caller passes v_reset = 0.
template <typename S>
EFFST_HD S charge(S v_prev, S x, S k, S v_reset, bool decay_input) {
  return decay_input ? v_prev + k * (x - (v_prev - v_reset)) : v_prev - k * (v_prev - v_reset) + x;
}

// One forward step: charge, fire (spike when H >= theta), reset. Returns V_t; writes S_t.
template <typename S>
EFFST_HD S forward_step(S x, S v_prev, S k, S theta, S v_reset, bool hard_reset, bool decay_input,
                        S& spike) {
  const S h = charge(v_prev, x, k, v_reset, decay_input);
  const bool fired = h >= theta;
  spike = fired ? S(1) : S(0);
  // Hard: (1 - S) H + S V_r; soft: H - S theta. Written as selects between values computed
  // unconditionally: exact, and a compiler that keeps FP exceptions precise (GCC's default
  // -ftrapping-math) may turn such a select into a vector blend, but not a select whose arm
  // does arithmetic (that arm would run speculatively).
  const S after_soft_reset = h - theta;
  return fired ? (hard_reset ? v_reset : after_soft_reset) : h;
}

// One backward step (reverse time), for a step whose membrane is not itself an output (g_V = 0).
// Inputs: X_t, V_{t-1}, parameters, the incoming spike gradient g_S and the carry c (gradient
// reaching V_t from step t+1, or the final-state gradient at t = T-1).
// Outputs: g_X (returned), the carry into V_{t-1} (updated in place), and the per-neuron sums
// of dL/dk and dL/dtheta (accumulated in place).
template <int SURROGATE, typename S>
EFFST_HD S backward_step(S x, S v_prev, S k, S theta, S v_reset, S alpha, S grad_spike,
                         bool hard_reset, bool detach_reset, bool decay_input, S& carry,
                         S& grad_k_sum, S& grad_theta_sum) {
  const S h = charge(v_prev, x, k, v_reset, decay_input);
  const bool fired = h >= theta;
  const S psi = surrogate_grad<SURROGATE>(h - theta, alpha);
  S dv_dh, dv_dtheta;
  if (hard_reset) {
    dv_dh = fired ? S(0) : S(1);
    dv_dtheta = S(0);
    if (!detach_reset) {
      dv_dh += (v_reset - h) * psi;
      dv_dtheta = (h - v_reset) * psi;
    }
  } else {
    dv_dh = S(1);
    dv_dtheta = fired ? S(-1) : S(0);
    if (!detach_reset) {
      dv_dh -= theta * psi;
      dv_dtheta += theta * psi;
    }
  }
  const S grad_h = grad_spike * psi + carry * dv_dh;
  grad_theta_sum += carry * dv_dtheta - grad_spike * psi;
  const S leak = v_prev - v_reset;
  grad_k_sum += grad_h * (decay_input ? x - leak : -leak);
  carry = grad_h * (S(1) - k);
  return decay_input ? grad_h * k : grad_h;
}

// ---------------------------------------------------------------------------------------------
// Whole sequence of one neuron (the CUDA kernels run these one thread per neuron; the C++
// tests run them on the host against the CPU kernel). Tensors are [T, N] with the neuron n at
// column n; rows are `row_stride` elements apart for inputs and N apart for outputs.
// IO is the element type in memory (float, double, or a 16-bit type convertible to/from S).
// ---------------------------------------------------------------------------------------------

// Chunk length of the checkpointed backward: V is kept in registers for K steps at a time.
constexpr int kBackwardChunk = 16;

template <typename S, typename IO>
EFFST_HD S load_as(const IO* p) {
  return static_cast<S>(*p);
}

template <typename S, typename IO>
EFFST_HD void store_as(IO* p, S v) {
  *p = static_cast<IO>(v);
}

template <typename IO, typename S>
EFFST_HD void forward_neuron(int64_t n, int64_t T, int64_t N, const IO* x, int64_t x_row_stride,
                             IO* spikes, S k, S theta, S v0, S v_reset, bool hard_reset,
                             bool decay_input, S* v_final) {
  S v = v0;
  for (int64_t t = 0; t < T; ++t) {
    S s;
    v = forward_step(load_as<S>(x + t * x_row_stride + n), v, k, theta, v_reset, hard_reset,
                     decay_input, s);
    store_as(spikes + t * N + n, s);
  }
  v_final[n] = v;
}

// Backward of one neuron with checkpointed recompute. Pass 1 (only when T > K) runs the forward
// and stores V at the start of every chunk after the first in `checkpoints` ([ceil(T/K)-1, N]);
// pass 2 walks the chunks in reverse, recomputes V_{t-1} and keeps X_t in registers, then runs
// the backward steps. X is read twice from memory for T > K and once for T <= K.
template <int SURROGATE, typename IO, typename S, typename GIO>
EFFST_HD void backward_neuron(int64_t n, int64_t T, int64_t N, const GIO* grad_spikes,
                              int64_t grad_row_stride, const S* grad_v_final, const IO* x,
                              int64_t x_row_stride, S k, S theta, S v0, S v_reset, S alpha,
                              bool hard_reset, bool detach_reset, bool decay_input,
                              S* checkpoints, IO* grad_x, S* grad_w_per_neuron,
                              S* grad_theta_per_neuron, S* grad_v_init) {
  constexpr int K = kBackwardChunk;
  const int64_t num_chunks = (T + K - 1) / K;
  if (num_chunks > 1) {
    S v = v0;
    for (int64_t t = 0; t < (num_chunks - 1) * K; ++t) {
      if (t > 0 && t % K == 0) checkpoints[(t / K - 1) * N + n] = v;
      S s;
      v = forward_step(load_as<S>(x + t * x_row_stride + n), v, k, theta, v_reset, hard_reset,
                       decay_input, s);
    }
    checkpoints[(num_chunks - 2) * N + n] = v;
  }
  S carry = grad_v_final != nullptr ? grad_v_final[n] : S(0);
  S grad_k = S(0), grad_theta = S(0);
  for (int64_t c = num_chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * K;
    const int64_t len = T - t0 < K ? T - t0 : K;
    S v = c == 0 ? v0 : checkpoints[(c - 1) * N + n];
    S xs[K], vs[K];
    EFFST_UNROLL
    for (int j = 0; j < K; ++j) {
      if (j < len) {
        xs[j] = load_as<S>(x + (t0 + j) * x_row_stride + n);
        vs[j] = v;
        S s;
        v = forward_step(xs[j], v, k, theta, v_reset, hard_reset, decay_input, s);
      }
    }
    EFFST_UNROLL
    for (int j = K - 1; j >= 0; --j) {
      if (j < len) {
        const S gs = load_as<S>(grad_spikes + (t0 + j) * grad_row_stride + n);
        const S gx = backward_step<SURROGATE>(xs[j], vs[j], k, theta, v_reset, alpha, gs,
                                              hard_reset, detach_reset, decay_input, carry,
                                              grad_k, grad_theta);
        store_as(grad_x + (t0 + j) * N + n, gx);
      }
    }
  }
  grad_w_per_neuron[n] = grad_k * k * (S(1) - k);  // chain rule through k = sigmoid(w)
  grad_theta_per_neuron[n] = grad_theta;
  if (grad_v_init != nullptr) grad_v_init[n] = carry;
}

// Entry of a parameter vector used by neuron n (effst/ops/layout.py: (n // inner) % channels).
EFFST_HD int64_t parameter_entry(int64_t n, int64_t channels, int64_t inner) {
  return (n / inner) % channels;
}

}  // namespace slif
}  // namespace effst
