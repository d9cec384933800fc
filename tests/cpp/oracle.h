// Independent oracle for the native sLIF tests: the forward of docs/slif.md written afresh
// (it shares no code with kernels/slif_recurrence.cuh) over dual numbers. Forward-mode
// differentiation with the Heaviside's derivative defined as the surrogate sigma'(x) gives
// exactly the surrogate gradient, so a tangent computed here checks one component of the
// hand-derived reverse-mode backward of the kernels.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace oracle {

struct Dual {
  double v = 0, d = 0;
};
inline Dual operator+(Dual a, Dual b) { return {a.v + b.v, a.d + b.d}; }
inline Dual operator-(Dual a, Dual b) { return {a.v - b.v, a.d - b.d}; }
inline Dual operator*(Dual a, Dual b) { return {a.v * b.v, a.d * b.v + a.v * b.d}; }
inline Dual constant(double v) { return {v, 0}; }

constexpr double kPi = 3.14159265358979323846;

// sigma'(x) from the docs/slif.md table, spelled out independently of the header.
inline double surrogate_prime(int id, double x, double a) {
  switch (id) {
    case 0: { const double s = 1 / (1 + std::exp(-a * x)); return a * s * (1 - s); }
    case 1: return (a / 2) / (1 + std::pow(kPi / 2 * a * x, 2));
    case 2: return std::max(0.0, a - a * a * std::fabs(x));
    case 3: return (a / 2) * std::exp(-a * std::fabs(x));
    case 4: return 1 / (2 * a * std::pow(1 / a + std::fabs(x), 2));
    case 5: return a / std::pow(1 + std::fabs(x), 2);
    case 6: return a / std::sqrt(kPi) * std::exp(-(a * x) * (a * x));
    default: return std::fabs(x) < a / 2 ? 1 / a : 0;
  }
}

// A primitive of sigma' for each surrogate (the smooth "spike" SpikingJelly documents); the
// surrogate test differentiates these numerically.
inline double surrogate_primitive(int id, double x, double a) {
  switch (id) {
    case 0: return 1 / (1 + std::exp(-a * x));
    case 1: return std::atan(kPi / 2 * a * x) / kPi + 0.5;
    case 2: {
      const double edge = 1 / a;
      if (x <= -edge) return 0;
      if (x >= edge) return 1;
      return x >= 0 ? 1 - 0.5 * a * a * (edge - x) * (edge - x) : 0.5 * a * a * (x + edge) * (x + edge);
    }
    case 3: return x >= 0 ? 1 - 0.5 * std::exp(-a * x) : 0.5 * std::exp(a * x);
    case 4: return 0.5 * (a * x / (1 + std::fabs(a * x)) + 1);
    case 5: return a * x / (1 + std::fabs(x));
    case 6: return 0.5 * (1 + std::erf(a * x));
    default: return std::min(1.0, std::max(0.0, x / a + 0.5));
  }
}

struct Config {
  int surrogate = 1;
  double alpha = 2.0;
  bool hard_reset = true;
  double v_reset = 0.0;  // used only for a hard reset
  bool detach_reset = false;
  bool decay_input = true;

  std::string str() const {
    char buf[160];
    std::snprintf(buf, sizeof buf, "surrogate=%d alpha=%g %s detach=%d decay_input=%d", surrogate,
                  alpha, hard_reset ? ("hard(" + std::to_string(v_reset) + ")").c_str() : "soft",
                  detach_reset, decay_input);
    return buf;
  }
};

// One neuron over T steps. Returns the loss L = sum_t gs[t] * S_t + gv * V_T as a dual number
// (its .d is the tangent along the seeded input); fills spikes and the final membrane.
inline Dual run_neuron(const Config& c, const std::vector<Dual>& x, Dual w, Dual theta, Dual v0,
                       const std::vector<double>& gs, double gv, std::vector<double>* spikes,
                       double* v_final) {
  const Dual one = constant(1);
  const double e = std::exp(-w.v);
  const Dual k = {1 / (1 + e), w.d * e / ((1 + e) * (1 + e))};
  const Dual rest = constant(c.hard_reset ? c.v_reset : 0.0);
  Dual v = v0, loss = constant(0);
  for (size_t t = 0; t < x.size(); ++t) {
    const Dual h = c.decay_input ? v + k * (x[t] - (v - rest)) : v - k * (v - rest) + x[t];
    const Dual z = h - theta;
    const Dual s = {z.v >= 0 ? 1.0 : 0.0, surrogate_prime(c.surrogate, z.v, c.alpha) * z.d};
    const Dual s_reset = c.detach_reset ? constant(s.v) : s;
    v = c.hard_reset ? (one - s_reset) * h + s_reset * rest : h - s_reset * theta;
    loss = loss + constant(gs[t]) * s;
    if (spikes) spikes->push_back(s.v);
  }
  if (v_final) *v_final = v.v;
  return loss + constant(gv) * v;
}

// Gradients of L w.r.t. every input of one neuron, one forward-mode pass per input.
struct NeuronGrads {
  std::vector<double> spikes, grad_x;
  double v_final = 0, grad_w = 0, grad_theta = 0, grad_v0 = 0;
};

inline NeuronGrads neuron_grads(const Config& c, const std::vector<double>& x, double w,
                                double theta, double v0, const std::vector<double>& gs, double gv) {
  NeuronGrads out;
  std::vector<Dual> xd(x.size());
  for (size_t t = 0; t < x.size(); ++t) xd[t] = constant(x[t]);
  run_neuron(c, xd, constant(w), constant(theta), constant(v0), gs, gv, &out.spikes, &out.v_final);
  for (size_t t = 0; t < x.size(); ++t) {
    xd[t].d = 1;
    out.grad_x.push_back(run_neuron(c, xd, constant(w), constant(theta), constant(v0), gs, gv,
                                    nullptr, nullptr).d);
    xd[t].d = 0;
  }
  out.grad_w = run_neuron(c, xd, {w, 1}, constant(theta), constant(v0), gs, gv, nullptr, nullptr).d;
  out.grad_theta = run_neuron(c, xd, constant(w), {theta, 1}, constant(v0), gs, gv, nullptr, nullptr).d;
  out.grad_v0 = run_neuron(c, xd, constant(w), constant(theta), {v0, 1}, gs, gv, nullptr, nullptr).d;
  return out;
}

// Every surrogate x both resets x detach x decay_input (64 configurations).
inline std::vector<Config> all_configs() {
  std::vector<Config> out;
  const double alphas[8] = {4.0, 2.0, 1.0, 1.0, 2.0, 1.0, 2.0, 1.0};
  for (int s = 0; s < 8; ++s)
    for (int hard = 0; hard < 2; ++hard)
      for (int detach = 0; detach < 2; ++detach)
        for (int decay = 0; decay < 2; ++decay) {
          Config c;
          c.surrogate = s;
          c.alpha = alphas[s] * (1 + 0.1 * ((s + hard + decay) % 3));  // not only the defaults
          c.hard_reset = hard == 1;
          c.v_reset = hard == 1 && (s % 2 == 1) ? -0.3 : 0.0;
          c.detach_reset = detach == 1;
          c.decay_input = decay == 1;
          out.push_back(c);
        }
  return out;
}

// Tiny test harness: counts failures, prints the first few.
struct Checker {
  int failures = 0, checks = 0;
  void close(double got, double want, double tol, const std::string& what) {
    ++checks;
    const double scale = std::max(1.0, std::fabs(want));
    if (!(std::fabs(got - want) <= tol * scale)) {
      if (failures < 20) std::fprintf(stderr, "FAIL %s: got %.17g want %.17g\n", what.c_str(), got, want);
      ++failures;
    }
  }
  void expect(bool ok, const std::string& what) {
    ++checks;
    if (!ok) {
      if (failures < 20) std::fprintf(stderr, "FAIL %s\n", what.c_str());
      ++failures;
    }
  }
  int finish(const char* name) const {
    std::printf("%s: %d checks, %d failures\n", name, checks, failures);
    return failures == 0 ? 0 : 1;
  }
};

// Calls f with the surrogate id as a compile-time constant (the kernels template on it).
template <typename F>
void with_surrogate(int id, F&& f) {
  switch (id) {
    case 0: f(std::integral_constant<int, 0>{}); break;
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    default: f(std::integral_constant<int, 7>{}); break;
  }
}

}  // namespace oracle
