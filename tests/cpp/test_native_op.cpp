// Tests of the registered torch ops effst_native::slif_forward / slif_backward (CPU kernel),
// called through the dispatcher as Python calls them:
//  * float64 against the dual-number oracle (tests/cpp/oracle.h) for all 64 configurations,
//    three parameter forms, strided input rows, both CPU kernel builds;
//  * float32 bit for bit against the host run of the per-neuron drivers the CUDA kernels use
//    (the two native paths share the recurrence header and must agree exactly), with plain
//    and with streaming stores;
//  * float16 / bfloat16 I/O against the float32 op on the same rounded values;
//  * errors name the argument; Meta kernels give the shapes.
#include <cstdlib>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "../../csrc/slif_native.h"
#include "../../kernels/slif_recurrence.cuh"
#include "oracle.h"

namespace {

using oracle::Checker;
using oracle::Config;
using oracle::with_surrogate;
using Opt = std::optional<at::Tensor>;

using ForwardSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                      const at::Tensor&, const Opt&, int64_t,
                                                      int64_t, int64_t, int64_t,
                                                      std::optional<double>, int64_t, double, bool,
                                                      bool);
using BackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const Opt&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const Opt&, int64_t, int64_t, int64_t, int64_t, std::optional<double>, int64_t, double, bool,
    bool);

c10::TypedOperatorHandle<ForwardSig> forward_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("effst_native::slif_forward", "")
      .typed<ForwardSig>();
}
c10::TypedOperatorHandle<BackwardSig> backward_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("effst_native::slif_backward", "")
      .typed<BackwardSig>();
}

// A parameter form on the per-step shape [A, C, D] (N = A*C*D), channel dim 1.
struct Form {
  const char* name;
  int64_t channels, inner;
};

struct Inputs {
  at::Tensor x, gs, w, theta, v0, gv;  // x, gs are [T, N] views with row stride > N
  Form wf, tf;
};

Inputs make_inputs(int64_t T, int64_t N, Form wf, Form tf, uint64_t seed) {
  at::manual_seed(seed);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  Inputs in;
  in.x = (at::randn({T, N + 3}, f64) * 1.5 + 0.6).narrow(1, 0, N);
  in.gs = at::randn({T, N + 5}, f64).narrow(1, 2, N);
  in.w = at::rand({wf.channels}, f64) * 3 - 1.5;
  in.theta = at::rand({tf.channels}, f64) + 0.4;
  in.v0 = at::randn({N}, f64) * 0.4;
  in.gv = at::randn({N}, f64);
  in.wf = wf;
  in.tf = tf;
  return in;
}

std::optional<double> reset_of(const Config& c) {
  return c.hard_reset ? std::optional<double>(c.v_reset) : std::nullopt;
}

void test_float64_against_oracle(Checker& check, const char* isa) {
  const int64_t A = 2, C = 3, D = 7, N = A * C * D;
  const Form forms[] = {{"layer", 1, N}, {"channel", C, D}, {"neuron", N, 1}};
  const int64_t lengths[] = {1, 5, 17};
  int index = 0;
  for (const Config& c : oracle::all_configs()) {
    for (int64_t T : lengths) {
      const Form wf = forms[index % 3], tf = forms[(index / 3) % 3];
      const bool with_v0 = index % 2 == 0, with_gv = (index / 2) % 2 == 0;
      ++index;
      const Inputs in = make_inputs(T, N, wf, tf, 1000 + index);
      const Opt v0 = with_v0 ? Opt(in.v0) : std::nullopt;
      const Opt gv = with_gv ? Opt(in.gv) : std::nullopt;
      auto [spikes, v_final] = forward_op().call(in.x, in.w, in.theta, v0, wf.channels, wf.inner,
                                                 tf.channels, tf.inner, reset_of(c), c.surrogate,
                                                 c.alpha, c.detach_reset, c.decay_input);
      auto [gx, gw, gth, gv0] = backward_op().call(
          in.gs, gv, in.x, in.w, in.theta, v0, wf.channels, wf.inner, tf.channels, tf.inner,
          reset_of(c), c.surrogate, c.alpha, c.detach_reset, c.decay_input);
      const std::string where = std::string(isa) + " " + c.str() + " T=" + std::to_string(T) +
                                " w:" + wf.name + " theta:" + tf.name;
      check.expect(spikes.is_contiguous() && spikes.sizes() == in.x.sizes() &&
                       spikes.scalar_type() == at::kDouble && gw.sizes() == at::IntArrayRef{N} &&
                       gv0.sizes() == at::IntArrayRef{with_v0 ? N : 1},
                   where + " output shapes/dtypes");
      if (!with_v0) check.expect(!gv0.any().item<bool>(), where + " grad_v_init placeholder is zero");
      const auto x_a = in.x.accessor<double, 2>(), gs_a = in.gs.accessor<double, 2>();
      const auto s_a = spikes.accessor<double, 2>(), gx_a = gx.accessor<double, 2>();
      const double* w_p = in.w.data_ptr<double>();
      const double* th_p = in.theta.data_ptr<double>();
      const double* v0_p = in.v0.data_ptr<double>();
      const double* gv_p = in.gv.data_ptr<double>();
      for (int64_t n = 0; n < N; ++n) {
        std::vector<double> xn(T), gsn(T);
        for (int64_t t = 0; t < T; ++t) {
          xn[t] = x_a[t][n];
          gsn[t] = gs_a[t][n];
        }
        const double v_start = with_v0 ? v0_p[n] : (c.hard_reset ? c.v_reset : 0.0);
        const auto want = oracle::neuron_grads(c, xn, w_p[(n / wf.inner) % wf.channels],
                                               th_p[(n / tf.inner) % tf.channels], v_start, gsn,
                                               with_gv ? gv_p[n] : 0.0);
        const std::string at_n = where + " n=" + std::to_string(n);
        for (int64_t t = 0; t < T; ++t) {
          check.expect(s_a[t][n] == want.spikes[t], at_n + " spike");
          check.close(gx_a[t][n], want.grad_x[t], 1e-10, at_n + " grad_x");
        }
        check.close(v_final.data_ptr<double>()[n], want.v_final, 1e-12, at_n + " v_final");
        check.close(gw.data_ptr<double>()[n], want.grad_w, 1e-10, at_n + " grad_w (per neuron)");
        check.close(gth.data_ptr<double>()[n], want.grad_theta, 1e-10, at_n + " grad_theta (per neuron)");
        if (with_v0) {
          check.close(gv0.data_ptr<double>()[n], want.grad_v0, 1e-10, at_n + " grad_v_init");
        }
      }
    }
  }
}

// The CPU kernel (blocks, vector loops) and the CUDA algorithm (one neuron at a time,
// checkpointed chunks) run the same float operations in the same order: results are equal.
void test_float32_matches_cuda_algorithm(Checker& check, const char* isa) {
  const int64_t N = 3001;  // several blocks, a ragged last one
  const Form wf{"channel", 7, 5}, tf{"neuron", N, 1};
  const int64_t lengths[] = {2, 33};
  int index = 0;
  for (const Config& c : oracle::all_configs()) {
    for (int64_t T : lengths) {
      ++index;
      const Inputs in64 = make_inputs(T, N, wf, tf, 5000 + index);
      const at::Tensor x = in64.x.to(at::kFloat), gs = in64.gs.to(at::kFloat).contiguous();
      const at::Tensor w = in64.w.to(at::kFloat), theta = in64.theta.to(at::kFloat);
      const at::Tensor v0 = in64.v0.to(at::kFloat), gv = in64.gv.to(at::kFloat);
      auto [spikes, v_final] = forward_op().call(x, w, theta, v0, wf.channels, wf.inner, tf.channels,
                                                 tf.inner, reset_of(c), c.surrogate, c.alpha,
                                                 c.detach_reset, c.decay_input);
      auto [gx, gw, gth, gv0] = backward_op().call(gs, gv, x, w, theta, v0, wf.channels, wf.inner,
                                                   tf.channels, tf.inner, reset_of(c), c.surrogate,
                                                   c.alpha, c.detach_reset, c.decay_input);
      const at::Tensor xc = x.contiguous();
      std::vector<float> s2(T * N), vf2(N), gx2(T * N), gw2(N), gth2(N), gv02(N);
      std::vector<float> checkpoints(std::max<int64_t>(1, (T + 15) / 16 - 1) * N);
      const float v_reset = c.hard_reset ? static_cast<float>(c.v_reset) : 0.0f;
      for (int64_t n = 0; n < N; ++n) {
        const float k = effst::slif::decay_from_logit(w.data_ptr<float>()[(n / wf.inner) % wf.channels]);
        const float th = theta.data_ptr<float>()[n];
        effst::slif::forward_neuron<float, float>(n, T, N, xc.data_ptr<float>(), N, s2.data(), k,
                                                  th, v0.data_ptr<float>()[n], v_reset,
                                                  c.hard_reset, c.decay_input, vf2.data());
        with_surrogate(c.surrogate, [&](auto surrogate) {
          effst::slif::backward_neuron<decltype(surrogate)::value, float, float, float>(
              n, T, N, gs.data_ptr<float>(), N, gv.data_ptr<float>(), xc.data_ptr<float>(), N, k,
              th, v0.data_ptr<float>()[n], v_reset, static_cast<float>(c.alpha), c.hard_reset,
              c.detach_reset, c.decay_input, checkpoints.data(), gx2.data(), gw2.data(),
              gth2.data(), gv02.data());
        });
      }
      const auto cpu = [](const std::vector<float>& v, at::IntArrayRef shape) {
        return at::from_blob(const_cast<float*>(v.data()), shape, at::kFloat);
      };
      const std::string where = std::string(isa) + " float32 " + c.str() + " T=" + std::to_string(T);
      check.expect(at::equal(spikes, cpu(s2, {T, N})), where + " spikes");
      check.expect(at::equal(v_final, cpu(vf2, {N})), where + " v_final");
      check.expect(at::equal(gx, cpu(gx2, {T, N})), where + " grad_x");
      check.expect(at::equal(gw, cpu(gw2, {N})), where + " grad_w");
      check.expect(at::equal(gth, cpu(gth2, {N})), where + " grad_theta");
      check.expect(at::equal(gv0, cpu(gv02, {N})), where + " grad_v_init");
    }
  }
}

void test_16bit_io(Checker& check) {
  const int64_t T = 6, N = 517;
  const Form wf{"channel", 11, 47}, tf{"layer", 1, N};
  for (const auto dtype : {at::kHalf, at::kBFloat16}) {
    for (const Config& c : oracle::all_configs()) {
      const Inputs in = make_inputs(T, N, wf, tf, 9000 + c.surrogate);
      const at::Tensor x16 = in.x.to(dtype), gs16 = in.gs.to(dtype);
      const at::Tensor w = in.w.to(at::kFloat), theta = in.theta.to(at::kFloat);
      const at::Tensor x32 = x16.to(at::kFloat), gs32 = gs16.to(at::kFloat);
      auto [s16, vf16] = forward_op().call(x16, w, theta, std::nullopt, wf.channels, wf.inner,
                                           tf.channels, tf.inner, reset_of(c), c.surrogate,
                                           c.alpha, c.detach_reset, c.decay_input);
      auto [s32, vf32] = forward_op().call(x32, w, theta, std::nullopt, wf.channels, wf.inner,
                                           tf.channels, tf.inner, reset_of(c), c.surrogate,
                                           c.alpha, c.detach_reset, c.decay_input);
      auto [gx16, gw16, gth16, gv16] = backward_op().call(
          gs16, std::nullopt, x16, w, theta, std::nullopt, wf.channels, wf.inner, tf.channels,
          tf.inner, reset_of(c), c.surrogate, c.alpha, c.detach_reset, c.decay_input);
      auto [gx32, gw32, gth32, gv32] = backward_op().call(
          gs32, std::nullopt, x32, w, theta, std::nullopt, wf.channels, wf.inner, tf.channels,
          tf.inner, reset_of(c), c.surrogate, c.alpha, c.detach_reset, c.decay_input);
      const std::string where = std::string(c10::toString(dtype)) + " " + c.str();
      check.expect(s16.scalar_type() == dtype && gx16.scalar_type() == dtype, where + " dtypes");
      check.expect(at::equal(s16.to(at::kFloat), s32), where + " spikes");
      check.expect(at::equal(vf16, vf32), where + " v_final (float state)");
      check.expect(at::equal(gx16, gx32.to(dtype)), where + " grad_x (rounded once)");
      check.expect(at::equal(gw16, gw32) && at::equal(gth16, gth32) && at::equal(gv16, gv32),
                   where + " per-neuron gradients");
    }
  }
}

template <typename F>
void expect_error(Checker& check, F&& f, const std::string& needle) {
  try {
    f();
    check.expect(false, "expected an error mentioning '" + needle + "'");
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    check.expect(msg.find(needle) != std::string::npos,
                 "error '" + msg + "' should mention '" + needle + "'");
  }
}

void test_errors_and_meta(Checker& check) {
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor x = at::randn({3, 10}, f64), w = at::zeros({1}, f64), th = at::ones({1}, f64);
  const auto fwd = [&](const at::Tensor& xx, const at::Tensor& ww, const at::Tensor& tt,
                       int64_t wc, int64_t surrogate, double alpha) {
    return forward_op().call(xx, ww, tt, std::nullopt, wc, 10, 1, 10, 0.0, surrogate, alpha,
                             false, true);
  };
  expect_error(check, [&] { fwd(x, w.to(at::kFloat), th, 1, 1, 2.0); }, "w: expected dtype");
  expect_error(check, [&] { fwd(x, at::zeros({2}, f64), th, 1, 1, 2.0); }, "w: expected a 1-D tensor of 1");
  expect_error(check, [&] { fwd(x.unsqueeze(0), w, th, 1, 1, 2.0); }, "x: expected a 2-D");
  expect_error(check, [&] { fwd(x.to(at::kInt), w, th, 1, 1, 2.0); }, "x: expected dtype");
  expect_error(check, [&] { fwd(x, w, th, 1, 8, 2.0); }, "surrogate_id");
  expect_error(check, [&] { fwd(x, w, th, 1, 1, -1.0); }, "alpha");
  expect_error(check, [&] { fwd(x, w, th, 0, 1, 2.0); }, "w_channels");
  expect_error(
      check,
      [&] {
        backward_op().call(at::randn({3, 9}, f64), std::nullopt, x, w, th, std::nullopt, 1, 10, 1,
                           10, 0.0, 1, 2.0, false, true);
      },
      "grad_spikes: expected shape");
  expect_error(
      check,
      [&] {
        backward_op().call(at::randn({3, 10}, f64), Opt(at::zeros({10})), x, w, th, std::nullopt, 1,
                           10, 1, 10, 0.0, 1, 2.0, false, true);
      },
      "grad_v_final: expected dtype");
  // Meta kernels: shapes and dtypes without data.
  const auto meta = at::TensorOptions().device(at::kMeta);
  auto [s, v] = forward_op().call(at::empty({4, 6}, meta.dtype(at::kHalf)), at::empty({1}, meta),
                                  at::empty({1}, meta), std::nullopt, 1, 6, 1, 6, std::nullopt, 0,
                                  4.0, false, true);
  check.expect(s.is_meta() && s.sizes() == at::IntArrayRef{4, 6} && s.scalar_type() == at::kHalf &&
                   v.sizes() == at::IntArrayRef{6} && v.scalar_type() == at::kFloat,
               "meta forward shapes");
  // Empty sequences: the state passes through unchanged.
  const at::Tensor v0 = at::randn({10}, f64);
  auto [s0, vf0] = forward_op().call(at::empty({0, 10}, f64), w, th, Opt(v0), 1, 10, 1, 10, 0.0, 1,
                                     2.0, false, true);
  check.expect(s0.numel() == 0 && at::equal(vf0, v0), "T=0 forward keeps v_init");
}

}  // namespace

int main() {
  Checker check;
  at::set_num_threads(2);
  std::printf("CPU kernel build selected by default: %s\n", effst::cpu_isa().c_str());
  std::vector<const char*> isas = {"baseline"};
  if (effst::cpu_isa() == "avx2") isas.push_back("avx2");
  for (const char* isa : isas) {
    setenv("EFFST_NATIVE_CPU_ISA", isa, 1);
    check.expect(effst::cpu_isa() == isa, std::string("EFFST_NATIVE_CPU_ISA=") + isa + " selects it");
    test_float64_against_oracle(check, isa);
    for (const char* stream : {"0", "1"}) {  // plain and streaming stores of the outputs
      setenv("EFFST_NATIVE_CPU_STREAM", stream, 1);
      test_float32_matches_cuda_algorithm(check, isa);
    }
    unsetenv("EFFST_NATIVE_CPU_STREAM");
  }
  unsetenv("EFFST_NATIVE_CPU_ISA");
  test_16bit_io(check);
  test_errors_and_meta(check);
  return check.finish("test_native_op");
}
