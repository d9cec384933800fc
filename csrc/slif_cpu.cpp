// CPU implementation of the effst_native sLIF ops: checks, allocation, choice of kernel build,
// and the split of the neurons into blocks run in parallel with at::parallel_for.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include <ATen/ops/from_blob.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <ATen/Parallel.h>

#include "slif_cpu_api.h"
#include "slif_native.h"

namespace effst {
namespace {

using cpu::KernelTable;

bool cpu_has_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avx2");
#else
  return false;
#endif
}

// The kernel build to run. EFFST_NATIVE_CPU_ISA=baseline|avx2 forces one (tests run both).
const KernelTable& kernels() {
  const char* forced = std::getenv("EFFST_NATIVE_CPU_ISA");
  if (forced != nullptr && forced[0] != '\0') {
    if (std::strcmp(forced, "baseline") == 0) return *cpu::kernels_baseline();
    TORCH_CHECK(std::strcmp(forced, "avx2") == 0,
                "EFFST_NATIVE_CPU_ISA: expected 'baseline' or 'avx2' (or unset), got '", forced, "'");
    TORCH_CHECK(cpu::kernels_avx2() != nullptr,
                "EFFST_NATIVE_CPU_ISA=avx2: this build has no AVX2 kernels (they are compiled "
                "only by GCC for x86-64)");
    TORCH_CHECK(cpu_has_avx2(), "EFFST_NATIVE_CPU_ISA=avx2: this CPU does not support AVX2");
    return *cpu::kernels_avx2();
  }
  if (cpu::kernels_avx2() != nullptr && cpu_has_avx2()) return *cpu::kernels_avx2();
  return *cpu::kernels_baseline();
}

constexpr int64_t kHistoryValues = 8192;

// Neurons per work item: the backward's [T, B] membrane history and the block's rows of X,
// re-read in reverse, should stay in the core's L2 next to the rows streaming through it
// (T * B <= 8k values: 32 KiB each for float; measured best among 2k..32k for T = 4), and
// every thread should get a few blocks. EFFST_NATIVE_CPU_BLOCK=<n> overrides it (tuning).
int64_t choose_block(int64_t T, int64_t N) {
  if (const char* forced = std::getenv("EFFST_NATIVE_CPU_BLOCK")) {
    const int64_t value = std::atoll(forced);
    TORCH_CHECK(value > 0, "EFFST_NATIVE_CPU_BLOCK: expected a positive integer, got '", forced, "'");
    return value;
  }
  int64_t block = kHistoryValues / (T > 0 ? T : 1);
  block = std::max<int64_t>(64, std::min<int64_t>(4096, block)) / 64 * 64;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t per_worker = (N + 2 * threads - 1) / (2 * threads);
  const int64_t small = std::max<int64_t>(16, (per_worker + 15) / 16 * 16);
  return std::min(block, small);
}

// Blocks per parallel task: at least ~64k neuron-steps, so small calls stay on the calling
// thread instead of paying for waking (and afterwards spinning) the OpenMP team.
int64_t grain_blocks(int64_t T, int64_t block) {
  const int64_t steps_per_block = std::max<int64_t>(1, T * block);
  return std::max<int64_t>(1, (int64_t{1} << 16) / steps_per_block);
}

// Runs f(begin, end, scratch) over [0, blocks) in tasks of `grain` blocks that the threads
// claim one at a time from an atomic counter (dynamic scheduling): a thread the OS deschedules
// holds up at most one task, where a static split would leave its whole share waiting (the
// "scheduler plateau" seen on a busy 2-core machine). Each thread allocates its scratch once.
// The calling thread's scratch of at least n values, kept between calls (the kernels write
// every scratch value before reading it): a small call allocates nothing.
template <typename S>
S* thread_scratch(int64_t n) {
  thread_local std::vector<S> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) {
    buffer.resize(static_cast<size_t>(n));
  }
  return buffer.data();
}

template <typename S, typename F>
void parallel_blocks(int64_t blocks, int64_t grain, int64_t scratch, const F& f) {
  const int64_t tasks = (blocks + grain - 1) / grain;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), tasks);
  if (threads <= 1 || at::in_parallel_region()) {
    f(0, blocks, thread_scratch<S>(scratch));
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    S* buffer = thread_scratch<S>(scratch);
    for (int64_t task = next.fetch_add(1); task < tasks; task = next.fetch_add(1)) {
      const int64_t begin = task * grain;
      f(begin, std::min(blocks, begin + grain), buffer);
    }
  });
}

// Streaming stores pay off for outputs larger than the caches, which the next op then reads
// from memory anyway (here: 8 MiB and up; measured 16-25 % faster forward+backward of SLIF at
// the benchmark shapes). EFFST_NATIVE_CPU_STREAM=0|1 forces it (tests, measurements).
bool stream_outputs(const at::Tensor& output) {
  const char* forced = std::getenv("EFFST_NATIVE_CPU_STREAM");
  if (forced != nullptr && forced[0] != '\0') {
    TORCH_CHECK(std::strcmp(forced, "0") == 0 || std::strcmp(forced, "1") == 0,
                "EFFST_NATIVE_CPU_STREAM: expected '0' or '1' (or unset), got '", forced, "'");
    return forced[0] == '1';
  }
  return output.numel() * static_cast<int64_t>(output.element_size()) >= (int64_t{8} << 20);
}

// Decay sigmoid(w) per parameter entry (a plain buffer: no tensor to allocate per call).
template <typename S>
std::vector<S> decay_table(const at::Tensor& w) {
  const at::Tensor wc = w.contiguous();
  std::vector<S> k(static_cast<size_t>(wc.numel()));
  const S* src = wc.const_data_ptr<S>();
  S* dst = k.data();
  at::parallel_for(0, wc.numel(), 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) dst[i] = slif::decay_from_logit(src[i]);
  });
  return k;
}

template <typename S>
cpu::ForwardBlocksFn<S> forward_fn(const KernelTable& t, at::ScalarType dt);
template <>
cpu::ForwardBlocksFn<float> forward_fn<float>(const KernelTable& t, at::ScalarType dt) {
  return dt == at::kFloat ? t.forward_f32 : dt == at::kHalf ? t.forward_f16 : t.forward_bf16;
}
template <>
cpu::ForwardBlocksFn<double> forward_fn<double>(const KernelTable& t, at::ScalarType) {
  return t.forward_f64;
}
template <typename S>
cpu::BackwardBlocksFn<S> backward_fn(const KernelTable& t, at::ScalarType dt);
template <>
cpu::BackwardBlocksFn<float> backward_fn<float>(const KernelTable& t, at::ScalarType dt) {
  return dt == at::kFloat ? t.backward_f32 : dt == at::kHalf ? t.backward_f16 : t.backward_bf16;
}
template <>
cpu::BackwardBlocksFn<double> backward_fn<double>(const KernelTable& t, at::ScalarType) {
  return t.backward_f64;
}

template <typename S>
void run_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& theta,
                 const std::optional<at::Tensor>& v_init, int64_t w_channels, int64_t w_inner,
                 int64_t theta_channels, int64_t theta_inner, std::optional<double> v_reset,
                 bool decay_input, const at::Tensor& spikes, const at::Tensor& v_final) {
  const int64_t T = x.size(0), N = x.size(1);
  const std::vector<S> k = decay_table<S>(w);
  const at::Tensor theta_c = theta.contiguous();
  const at::Tensor v_init_c = v_init.has_value() ? v_init->contiguous() : at::Tensor();
  cpu::ForwardArgs<S> a{};
  a.T = T;
  a.N = N;
  a.block = choose_block(T, N);
  a.x = x.data_ptr();
  a.x_row_stride = x.stride(0);
  a.spikes = spikes.data_ptr();
  a.k_table = k.data();
  a.k_channels = w_channels;
  a.k_inner = w_inner;
  a.theta = theta_c.data_ptr<S>();
  a.theta_channels = theta_channels;
  a.theta_inner = theta_inner;
  a.v_init = v_init.has_value() ? v_init_c.data_ptr<S>() : nullptr;
  a.hard_reset = v_reset.has_value();
  a.v_reset = static_cast<S>(v_reset.value_or(0.0));
  a.decay_input = decay_input;
  a.v_final = v_final.data_ptr<S>();
  a.stream_outputs = stream_outputs(spikes);
  const auto fn = forward_fn<S>(kernels(), x.scalar_type());
  const bool staged = x.scalar_type() != c10::CppTypeToScalarType<S>::value;
  const int64_t scratch = cpu::forward_scratch_elems(T, a.block, staged);
  const int64_t blocks = (N + a.block - 1) / a.block;
  parallel_blocks<S>(blocks, grain_blocks(T, a.block), scratch,
                  [&](int64_t begin, int64_t end, S* buffer) { fn(a, begin, end, buffer); });
}

template <typename S>
void run_backward(const at::Tensor& grad_spikes, const std::optional<at::Tensor>& grad_v_final,
                  const at::Tensor& x, const at::Tensor& w, const at::Tensor& theta,
                  const std::optional<at::Tensor>& v_init, int64_t w_channels, int64_t w_inner,
                  int64_t theta_channels, int64_t theta_inner, std::optional<double> v_reset,
                  int64_t surrogate_id, double alpha, bool detach_reset, bool decay_input,
                  const at::Tensor& grad_x, S* grad_w, S* grad_theta, S* grad_v_init) {
  const int64_t T = x.size(0), N = x.size(1);
  const std::vector<S> k = decay_table<S>(w);
  const at::Tensor theta_c = theta.contiguous();
  const at::Tensor v_init_c = v_init.has_value() ? v_init->contiguous() : at::Tensor();
  const at::Tensor gvf_c = grad_v_final.has_value() ? grad_v_final->contiguous() : at::Tensor();
  cpu::BackwardArgs<S> a{};
  a.T = T;
  a.N = N;
  a.block = choose_block(T, N);
  a.grad_spikes = grad_spikes.data_ptr();
  a.grad_row_stride = grad_spikes.stride(0);
  a.grad_v_final = grad_v_final.has_value() ? gvf_c.data_ptr<S>() : nullptr;
  a.x = x.data_ptr();
  a.x_row_stride = x.stride(0);
  a.k_table = k.data();
  a.k_channels = w_channels;
  a.k_inner = w_inner;
  a.theta = theta_c.data_ptr<S>();
  a.theta_channels = theta_channels;
  a.theta_inner = theta_inner;
  a.v_init = v_init.has_value() ? v_init_c.data_ptr<S>() : nullptr;
  a.hard_reset = v_reset.has_value();
  a.v_reset = static_cast<S>(v_reset.value_or(0.0));
  a.alpha = static_cast<S>(alpha);
  a.surrogate_id = static_cast<int>(surrogate_id);
  a.detach_reset = detach_reset;
  a.decay_input = decay_input;
  a.grad_x = grad_x.data_ptr();
  a.grad_w = grad_w;
  a.grad_theta = grad_theta;
  a.grad_v_init = v_init.has_value() ? grad_v_init : nullptr;
  a.stream_outputs = stream_outputs(grad_x);
  const auto fn = backward_fn<S>(kernels(), x.scalar_type());
  const bool staged = x.scalar_type() != c10::CppTypeToScalarType<S>::value;
  const int64_t scratch = cpu::backward_scratch_elems(T, a.block, staged);
  const int64_t blocks = (N + a.block - 1) / a.block;
  parallel_blocks<S>(blocks, grain_blocks(T, a.block), scratch,
                  [&](int64_t begin, int64_t end, S* buffer) { fn(a, begin, end, buffer); });
}

void check_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "x: expected a CPU tensor for the CPU kernel, got ", x.device());
}

}  // namespace

std::string cpu_isa() {
  return &kernels() == cpu::kernels_avx2() ? "avx2" : "baseline";
}

ForwardResult slif_forward_cpu(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& theta,
                               const std::optional<at::Tensor>& v_init, int64_t w_channels,
                               int64_t w_inner, int64_t theta_channels, int64_t theta_inner,
                               std::optional<double> v_reset, int64_t surrogate_id, double alpha,
                               bool detach_reset, bool decay_input) {
  (void)detach_reset;  // the forward is the same with and without a detached reset
  (void)surrogate_id;  // the surrogate only shapes the backward (it is validated here anyway)
  check_cpu(x_in);
  detail::check_slif_args(x_in, w, theta, v_init, w_channels, w_inner, theta_channels, theta_inner,
                          v_reset, surrogate_id, alpha);
  const at::Tensor x = detail::unit_stride_rows(x_in);
  const int64_t T = x.size(0), N = x.size(1);
  const auto cdt = detail::compute_dtype(x);
  at::Tensor spikes = at::empty({T, N}, x.options());
  at::Tensor v_final = at::empty({N}, x.options().dtype(cdt));
  if (T == 0 || N == 0) {
    if (v_init.has_value()) {
      v_final.copy_(*v_init);
    } else {
      v_final.fill_(v_reset.value_or(0.0));
    }
    return {spikes, v_final};
  }
  if (cdt == at::kDouble) {
    run_forward<double>(x, w, theta, v_init, w_channels, w_inner, theta_channels, theta_inner,
                        v_reset, decay_input, spikes, v_final);
  } else {
    run_forward<float>(x, w, theta, v_init, w_channels, w_inner, theta_channels, theta_inner,
                       v_reset, decay_input, spikes, v_final);
  }
  return {spikes, v_final};
}

namespace {

// Below this many neurons the parameter sums run as one plain loop (a few hundred ns) instead
// of an ATen reduction (microseconds of setup); both are fixed-order, deterministic.
constexpr int64_t kLoopReductionNeurons = int64_t{1} << 16;

// Per-neuron values [N] summed to the [channels] parameter: neuron n = (outer * channels + c)
// * inner + i uses entry c (effst/ops/layout.py).
template <typename S>
at::Tensor sum_to_parameter(S* per_neuron, int64_t N, int64_t channels, int64_t inner,
                            const at::TensorOptions& options) {
  if (N >= kLoopReductionNeurons) {
    return at::from_blob(per_neuron, {N / (channels * inner), channels, inner}, options)
        .sum(at::IntArrayRef{0, 2});
  }
  at::Tensor out = at::empty({channels}, options);
  S* dst = out.mutable_data_ptr<S>();
  std::vector<double> acc(static_cast<size_t>(channels), 0.0);
  for (int64_t base = 0; base < N; base += channels * inner) {
    const S* row = per_neuron + base;
    for (int64_t c = 0; c < channels; ++c) {
      double sum = 0.0;
      for (int64_t i = 0; i < inner; ++i) sum += row[c * inner + i];
      acc[c] += sum;
    }
  }
  for (int64_t c = 0; c < channels; ++c) dst[c] = static_cast<S>(acc[c]);
  return out;
}

// One parameter's gradient output: the kernel writes per-neuron values either straight into
// the result (per-neuron parameters) or into a scratch buffer summed afterwards.
template <typename S>
struct ParameterGradient {
  at::Tensor result;                  // [N] (per neuron, or not reduced) / set by finish()
  std::unique_ptr<S[]> per_neuron;    // when summed
  int64_t channels, inner;

  ParameterGradient(int64_t N, int64_t channels_, int64_t inner_, bool reduce,
                    const at::TensorOptions& options)
      : channels(channels_), inner(inner_) {
    if (!reduce || (inner == 1 && channels == N)) {
      result = at::empty({N}, options);
    } else {
      per_neuron.reset(new S[static_cast<size_t>(N)]);
    }
  }
  S* target() { return per_neuron ? per_neuron.get() : result.mutable_data_ptr<S>(); }
  at::Tensor finish(int64_t N, const at::TensorOptions& options) {
    return per_neuron ? sum_to_parameter(per_neuron.get(), N, channels, inner, options) : result;
  }
};

template <typename S>
BackwardResult backward_cpu(const at::Tensor& grad_spikes_in,
                            const std::optional<at::Tensor>& grad_v_final, const at::Tensor& x_in,
                            const at::Tensor& w, const at::Tensor& theta,
                            const std::optional<at::Tensor>& v_init, int64_t w_channels,
                            int64_t w_inner, int64_t theta_channels, int64_t theta_inner,
                            std::optional<double> v_reset, int64_t surrogate_id, double alpha,
                            bool detach_reset, bool decay_input, bool reduce) {
  const at::Tensor x = detail::unit_stride_rows(x_in);
  const at::Tensor grad_spikes = detail::check_grad_spikes(grad_spikes_in, x);
  const int64_t T = x.size(0), N = x.size(1);
  const auto per_neuron = x.options().dtype(detail::compute_dtype(x));
  if (grad_v_final.has_value()) {
    detail::check_vector(*grad_v_final, "grad_v_final", N, per_neuron.dtype().toScalarType(), x,
                         "the gradient of v_final");
  }
  at::Tensor grad_x = at::empty({T, N}, x.options());
  ParameterGradient<S> grad_w(N, w_channels, w_inner, reduce, per_neuron);
  ParameterGradient<S> grad_theta(N, theta_channels, theta_inner, reduce, per_neuron);
  // Without v_init there is no initial state to differentiate: the op returns a [1] zero
  // placeholder (as the Triton backend and the fake kernel of effst.ops.slif do), the reduced
  // form an undefined tensor; neither writes [N] values.
  at::Tensor grad_v_init = v_init.has_value() ? at::empty({N}, per_neuron)
                           : reduce         ? at::Tensor()
                                            : at::zeros({1}, per_neuron);
  if (T == 0 || N == 0) {
    std::fill_n(grad_w.target(), N, S(0));
    std::fill_n(grad_theta.target(), N, S(0));
    if (v_init.has_value()) {
      if (grad_v_final.has_value()) {
        grad_v_init.copy_(*grad_v_final);
      } else {
        grad_v_init.zero_();
      }
    }
  } else {
    run_backward<S>(grad_spikes, grad_v_final, x, w, theta, v_init, w_channels, w_inner,
                    theta_channels, theta_inner, v_reset, surrogate_id, alpha, detach_reset,
                    decay_input, grad_x, grad_w.target(), grad_theta.target(),
                    v_init.has_value() ? grad_v_init.mutable_data_ptr<S>() : nullptr);
  }
  return {grad_x, grad_w.finish(N, per_neuron), grad_theta.finish(N, per_neuron), grad_v_init};
}

}  // namespace

BackwardResult slif_backward_cpu_impl(const at::Tensor& grad_spikes,
                                      const std::optional<at::Tensor>& grad_v_final,
                                      const at::Tensor& x, const at::Tensor& w,
                                      const at::Tensor& theta,
                                      const std::optional<at::Tensor>& v_init, int64_t w_channels,
                                      int64_t w_inner, int64_t theta_channels, int64_t theta_inner,
                                      std::optional<double> v_reset, int64_t surrogate_id,
                                      double alpha, bool detach_reset, bool decay_input,
                                      bool reduce) {
  check_cpu(x);
  detail::check_slif_args(x, w, theta, v_init, w_channels, w_inner, theta_channels, theta_inner,
                          v_reset, surrogate_id, alpha);
  const auto run = detail::compute_dtype(x) == at::kDouble ? backward_cpu<double>
                                                           : backward_cpu<float>;
  return run(grad_spikes, grad_v_final, x, w, theta, v_init, w_channels, w_inner, theta_channels,
             theta_inner, v_reset, surrogate_id, alpha, detach_reset, decay_input, reduce);
}

BackwardResult slif_backward_cpu(const at::Tensor& grad_spikes,
                                 const std::optional<at::Tensor>& grad_v_final,
                                 const at::Tensor& x, const at::Tensor& w,
                                 const at::Tensor& theta, const std::optional<at::Tensor>& v_init,
                                 int64_t w_channels, int64_t w_inner, int64_t theta_channels,
                                 int64_t theta_inner, std::optional<double> v_reset,
                                 int64_t surrogate_id, double alpha, bool detach_reset,
                                 bool decay_input) {
  return slif_backward_cpu_impl(grad_spikes, grad_v_final, x, w, theta, v_init, w_channels,
                                w_inner, theta_channels, theta_inner, v_reset, surrogate_id,
                                alpha, detach_reset, decay_input, /*reduce=*/false);
}

}  // namespace effst
