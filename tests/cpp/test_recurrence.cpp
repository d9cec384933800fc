// Torch-free tests of kernels/slif_recurrence.cuh on the host:
//  * every surrogate against the docs/slif.md formula and against a numerical derivative of its
//    primitive;
//  * the whole-sequence drivers the CUDA kernels run (forward_neuron, checkpointed
//    backward_neuron) against the dual-number oracle, for all 64 configurations and sequence
//    lengths on both sides of the 16-step checkpoint chunk.
#include <type_traits>

#include "../../kernels/slif_recurrence.cuh"
#include "oracle.h"

namespace {

using oracle::Checker;
using oracle::Config;
using oracle::with_surrogate;

void test_surrogates(Checker& check) {
  const double alphas[] = {0.5, 1.0, 2.0, 2.5, 4.0};
  for (int id = 0; id < effst::slif::kNumSurrogates; ++id) {
    for (double a : alphas) {
      for (int i = -400; i <= 400; ++i) {
        const double x = i * 0.01 + 0.00123;  // off the kinks of the piecewise surrogates
        const std::string what = "surrogate " + std::to_string(id) + " alpha " + std::to_string(a) +
                                 " x " + std::to_string(x);
        const double got = effst::slif::surrogate_grad_by_id<double>(id, x, a);
        check.close(got, oracle::surrogate_prime(id, x, a), 1e-13, what + " (formula)");
        const double h = 1e-6;
        const double fd = (oracle::surrogate_primitive(id, x + h, a) -
                           oracle::surrogate_primitive(id, x - h, a)) / (2 * h);
        const bool near_kink = (id == 2 && std::fabs(std::fabs(x) - 1 / a) < 2 * h) ||
                               (id == 7 && std::fabs(std::fabs(x) - a / 2) < 2 * h);
        if (!near_kink) check.close(got, fd, 1e-6, what + " (derivative of the primitive)");
        const float got_f = effst::slif::surrogate_grad_by_id<float>(id, static_cast<float>(x),
                                                                     static_cast<float>(a));
        const bool near_rect_edge = id == 7 && std::fabs(std::fabs(x) - a / 2) < 1e-5;
        if (!near_rect_edge) check.close(got_f, got, 2e-6, what + " (float)");
      }
    }
  }
}

void test_sequences(Checker& check) {
  std::mt19937_64 rng(1234);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  const int64_t N = 5, row_stride = 7;  // rows wider than N: strided input rows
  const int64_t lengths[] = {1, 3, 16, 17, 40};
  for (const Config& c : oracle::all_configs()) {
    for (int64_t T : lengths) {
      std::vector<double> x(T * row_stride), gs(T * row_stride), w(N), theta(N), v0(N), gv(N);
      for (auto& v : x) v = 1.5 * normal(rng) + 0.6;
      for (auto& v : gs) v = normal(rng);
      for (int64_t n = 0; n < N; ++n) {
        w[n] = -1.5 + 3 * uniform(rng);
        theta[n] = 0.4 + uniform(rng);
        v0[n] = 0.4 * normal(rng);
        gv[n] = normal(rng);
      }
      std::vector<double> spikes(T * N), v_final(N), grad_x(T * N), grad_w(N), grad_theta(N),
          grad_v0(N);
      const int64_t chunks = (T + effst::slif::kBackwardChunk - 1) / effst::slif::kBackwardChunk;
      std::vector<double> checkpoints(std::max<int64_t>(chunks - 1, 1) * N, -1e300);
      const double v_reset = c.hard_reset ? c.v_reset : 0.0;
      for (int64_t n = 0; n < N; ++n) {
        const double k = effst::slif::decay_from_logit(w[n]);
        effst::slif::forward_neuron<double, double>(n, T, N, x.data(), row_stride, spikes.data(), k,
                                                    theta[n], v0[n], v_reset, c.hard_reset,
                                                    c.decay_input, v_final.data());
        with_surrogate(c.surrogate, [&](auto surrogate) {
          effst::slif::backward_neuron<decltype(surrogate)::value, double, double, double>(
              n, T, N, gs.data(), row_stride, gv.data(), x.data(), row_stride, k, theta[n], v0[n],
              v_reset, c.alpha, c.hard_reset, c.detach_reset, c.decay_input, checkpoints.data(),
              grad_x.data(), grad_w.data(), grad_theta.data(), grad_v0.data());
        });
      }
      for (int64_t n = 0; n < N; ++n) {
        std::vector<double> xn(T), gsn(T);
        for (int64_t t = 0; t < T; ++t) {
          xn[t] = x[t * row_stride + n];
          gsn[t] = gs[t * row_stride + n];
        }
        const auto want = oracle::neuron_grads(c, xn, w[n], theta[n], v0[n], gsn, gv[n]);
        const std::string where = c.str() + " T=" + std::to_string(T) + " n=" + std::to_string(n);
        for (int64_t t = 0; t < T; ++t) {
          check.expect(spikes[t * N + n] == want.spikes[t], where + " spike t=" + std::to_string(t));
          check.close(grad_x[t * N + n], want.grad_x[t], 1e-10, where + " grad_x t=" + std::to_string(t));
        }
        check.close(v_final[n], want.v_final, 1e-12, where + " v_final");
        check.close(grad_w[n], want.grad_w, 1e-10, where + " grad_w");
        check.close(grad_theta[n], want.grad_theta, 1e-10, where + " grad_theta");
        check.close(grad_v0[n], want.grad_v0, 1e-10, where + " grad_v0");
      }
    }
  }
}

}  // namespace

int main() {
  Checker check;
  test_surrogates(check);
  test_sequences(check);
  return check.finish("test_recurrence");
}
