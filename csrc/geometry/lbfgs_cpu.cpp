// The per-iteration bookkeeping of geometry.geodesic's batched L-BFGS (_batched_lbfgs in
// latentfast/geometry/core.py) for CPU tensors: per problem, the quasi-Newton direction
// from its ring buffer of (s, y) pairs, the Armijo test of a trial step, and the update
// after the line search. Each is one call per iteration in place of the ~90 small PyTorch
// operations of its formulation in core._TorchSteps (the reference, and the path on other
// devices), whose per-operation overhead dominated solves of few pairs.
//
// Layouts (all contiguous, one floating dtype T; counters int64, flags bool): x, g, p [b, n],
// f, step, slope [b]; s_hist, y_hist [b, h, n], problem i's pair k (k = 0, 1, ...,
// count_i - 1, the newest last) at slot k % h, the last min(count_i, h) of them kept.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace latentfast {
namespace {

template <typename T>
double dot(const T* a, const T* b, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(a[i]) * static_cast<double>(b[i]);
  return s;
}

// Problems per parallel task: a task's work is about (4 h + 4) n multiply-adds.
int64_t grain(int64_t n, int64_t h) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, (4 * h + 4) * n)); }

void check_rows(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& like, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == like.scalar_type() && t.dim() == dim,
              fn, ": ", name, " must be a contiguous ", dim, "-d CPU tensor of dtype ", like.scalar_type());
}

void check_flags(const char* fn, const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t b) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == dtype && t.dim() == 1 && t.size(0) == b,
              fn, ": ", name, " must be a contiguous [", b, "] CPU tensor of dtype ", dtype);
}

void check_history(const char* fn, const at::Tensor& g, const at::Tensor& s_hist, const at::Tensor& y_hist,
                   const at::Tensor& count) {
  check_rows(fn, "g", g, g, 2);
  TORCH_CHECK(g.is_floating_point(), fn, ": g must be floating point");
  check_rows(fn, "s_hist", s_hist, g, 3);
  check_rows(fn, "y_hist", y_hist, g, 3);
  TORCH_CHECK(s_hist.sizes() == y_hist.sizes() && s_hist.size(0) == g.size(0) && s_hist.size(2) == g.size(1) &&
                  s_hist.size(1) >= 1,
              fn, ": s_hist and y_hist must be [b, h, n] with h >= 1 for g [b, n]");
  check_flags(fn, "count", count, at::kLong, g.size(0));
}

}  // namespace

// p = -H g per problem, H the L-BFGS inverse-Hessian estimate from the problem's stored
// pairs by the two-loop recursion (the same H as core._lbfgs_direction's compact form), with
// H_0 = gamma I, gamma = s.y / y.y of the newest pair (1 / ||g|| with no pair or y.y = 0);
// where that p is not a descent direction (p.g >= 0), p = -g. slope = p.g.
void lbfgs_direction_(at::Tensor& p, at::Tensor& slope, const at::Tensor& g, const at::Tensor& s_hist,
                      const at::Tensor& y_hist, const at::Tensor& count) {
  const char* fn = "lbfgs_direction_";
  check_history(fn, g, s_hist, y_hist, count);
  check_rows(fn, "p", p, g, 2);
  TORCH_CHECK(p.sizes() == g.sizes(), fn, ": p must have g's shape");
  check_flags(fn, "slope", slope, g.scalar_type(), g.size(0));
  const int64_t b = g.size(0), n = g.size(1), h = s_hist.size(1);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "lbfgs_direction_", [&] {
    using T = scalar_t;
    const T* G = g.const_data_ptr<T>();
    const T* S = s_hist.const_data_ptr<T>();
    const T* Y = y_hist.const_data_ptr<T>();
    const int64_t* C = count.const_data_ptr<int64_t>();
    T* P = p.data_ptr<T>();
    T* SL = slope.data_ptr<T>();
    at::parallel_for(0, b, grain(n, h), [&](int64_t lo, int64_t hi) {
      std::vector<double> q(n), alpha(h), rho(h);
      for (int64_t i = lo; i < hi; ++i) {
        const T* gi = G + i * n;
        const T* si = S + i * h * n;
        const T* yi = Y + i * h * n;
        const int64_t c = C[i], m = std::min(c, h);
        auto slot = [&](int64_t j) { return ((c - 1 - j) % h) * n; };  // j = 0: the newest pair
        for (int64_t k = 0; k < n; ++k) q[k] = gi[k];
        double gamma = 1.0 / std::max(std::sqrt(dot(gi, gi, n)), 1e-12);
        if (m > 0) {
          const double yy = dot(yi + slot(0), yi + slot(0), n);
          if (yy > 0) gamma = dot(si + slot(0), yi + slot(0), n) / std::max(yy, 1e-300);
        }
        for (int64_t j = 0; j < m; ++j) {  // newest to oldest
          const T* s = si + slot(j);
          const T* y = yi + slot(j);
          rho[j] = 1.0 / dot(s, y, n);
          double a = 0;
          for (int64_t k = 0; k < n; ++k) a += static_cast<double>(s[k]) * q[k];
          alpha[j] = rho[j] * a;
          for (int64_t k = 0; k < n; ++k) q[k] -= alpha[j] * static_cast<double>(y[k]);
        }
        for (int64_t k = 0; k < n; ++k) q[k] *= gamma;
        for (int64_t j = m - 1; j >= 0; --j) {  // oldest to newest
          const T* s = si + slot(j);
          const T* y = yi + slot(j);
          double bsum = 0;
          for (int64_t k = 0; k < n; ++k) bsum += static_cast<double>(y[k]) * q[k];
          const double coef = alpha[j] - rho[j] * bsum;
          for (int64_t k = 0; k < n; ++k) q[k] += coef * static_cast<double>(s[k]);
        }
        T* pi = P + i * n;
        for (int64_t k = 0; k < n; ++k) pi[k] = static_cast<T>(-q[k]);
        double pg = dot(pi, gi, n);
        if (!(pg < 0)) {  // not a descent direction (or NaN): steepest descent
          for (int64_t k = 0; k < n; ++k) pi[k] = -gi[k];
          pg = dot(pi, gi, n);
        }
        SL[i] = static_cast<T>(pg);
      }
    });
  });
}

// The Armijo test of trial points x + step p of the problems `rows` (all b when None): ft
// [r] and gt [r, n] are the objective and gradient there. A problem that passes
// (ft <= f + 1e-4 step slope) takes ft, gt into f_new, g_new and stops searching; one that
// fails halves its step. Returns how many of the b problems still search.
int64_t lbfgs_trial_(at::Tensor& f_new, at::Tensor& g_new, at::Tensor& step, at::Tensor& searching,
                     const at::Tensor& ft, const at::Tensor& gt, const at::Tensor& f, const at::Tensor& slope,
                     const std::optional<at::Tensor>& rows) {
  const char* fn = "lbfgs_trial_";
  check_rows(fn, "g_new", g_new, g_new, 2);
  TORCH_CHECK(g_new.is_floating_point(), fn, ": g_new must be floating point");
  const int64_t b = g_new.size(0), n = g_new.size(1);
  check_flags(fn, "f_new", f_new, g_new.scalar_type(), b);
  check_flags(fn, "step", step, g_new.scalar_type(), b);
  check_flags(fn, "f", f, g_new.scalar_type(), b);
  check_flags(fn, "slope", slope, g_new.scalar_type(), b);
  check_flags(fn, "searching", searching, at::kBool, b);
  const int64_t r = rows ? rows->size(0) : b;
  if (rows) check_flags(fn, "rows", *rows, at::kLong, r);
  check_flags(fn, "ft", ft, g_new.scalar_type(), r);
  check_rows(fn, "gt", gt, g_new, 2);
  TORCH_CHECK(gt.size(0) == r && gt.size(1) == n, fn, ": gt must be [", r, ", ", n, "]");
  int64_t left = 0;
  AT_DISPATCH_FLOATING_TYPES(g_new.scalar_type(), "lbfgs_trial_", [&] {
    using T = scalar_t;
    const int64_t* R = rows ? rows->const_data_ptr<int64_t>() : nullptr;
    const T* FT = ft.const_data_ptr<T>();
    const T* GT = gt.const_data_ptr<T>();
    const T* F = f.const_data_ptr<T>();
    const T* SL = slope.const_data_ptr<T>();
    T* FN = f_new.data_ptr<T>();
    T* GN = g_new.data_ptr<T>();
    T* ST = step.data_ptr<T>();
    bool* SE = searching.data_ptr<bool>();
    for (int64_t j = 0; j < r; ++j) {
      const int64_t i = R ? R[j] : j;
      TORCH_CHECK(i >= 0 && i < b, fn, ": row ", i, " out of range");
      if (FT[j] <= F[i] + static_cast<T>(1e-4) * ST[i] * SL[i]) {
        FN[i] = FT[j];
        std::copy(GT + j * n, GT + (j + 1) * n, GN + i * n);
        SE[i] = false;
      } else {
        ST[i] *= static_cast<T>(0.5);
      }
    }
    for (int64_t i = 0; i < b; ++i) left += SE[i];
  });
  return left;
}

// After the line search: each problem that moved (no longer searching) steps x by
// s = step p and, where s.y > 1e-12 |s| |y| (y = g_new - g), stores the pair (s, y) at slot
// count % h and counts it. Every problem then counts an iteration, and `small` counts its
// consecutive iterations without a relative decrease (f - f_new) / |f_new| above tol (reset
// by one that moved with such a decrease); done = small >= 2 or g_new == 0.
void lbfgs_update_(at::Tensor& x, at::Tensor& s_hist, at::Tensor& y_hist, at::Tensor& count, at::Tensor& small,
                   at::Tensor& iters, at::Tensor& done, const at::Tensor& f, const at::Tensor& g,
                   const at::Tensor& f_new, const at::Tensor& g_new, const at::Tensor& p, const at::Tensor& step,
                   const at::Tensor& searching, double tol) {
  const char* fn = "lbfgs_update_";
  check_history(fn, g, s_hist, y_hist, count);
  const int64_t b = g.size(0), n = g.size(1), h = s_hist.size(1);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&x, &g_new, &p}) {
    check_rows(fn, "x, g_new and p", *t, g, 2);
    TORCH_CHECK(t->sizes() == g.sizes(), fn, ": x, g_new and p must have g's shape");
  }
  for (const at::Tensor* t : {&f, &f_new, &step}) check_flags(fn, "f, f_new and step", *t, g.scalar_type(), b);
  check_flags(fn, "small", small, at::kLong, b);
  check_flags(fn, "iters", iters, at::kLong, b);
  check_flags(fn, "searching", searching, at::kBool, b);
  check_flags(fn, "done", done, at::kBool, b);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "lbfgs_update_", [&] {
    using T = scalar_t;
    T* X = x.data_ptr<T>();
    T* S = s_hist.data_ptr<T>();
    T* Y = y_hist.data_ptr<T>();
    int64_t* C = count.data_ptr<int64_t>();
    int64_t* SM = small.data_ptr<int64_t>();
    int64_t* IT = iters.data_ptr<int64_t>();
    bool* D = done.data_ptr<bool>();
    const T* F = f.const_data_ptr<T>();
    const T* G = g.const_data_ptr<T>();
    const T* FN = f_new.const_data_ptr<T>();
    const T* GN = g_new.const_data_ptr<T>();
    const T* P = p.const_data_ptr<T>();
    const T* ST = step.const_data_ptr<T>();
    const bool* SE = searching.const_data_ptr<bool>();
    at::parallel_for(0, b, grain(n, 1), [&](int64_t lo, int64_t hi) {
      std::vector<T> s(n), y(n);
      for (int64_t i = lo; i < hi; ++i) {
        const bool moved = !SE[i];
        if (moved) {
          const T* pi = P + i * n;
          const T* gi = G + i * n;
          const T* gni = GN + i * n;
          for (int64_t k = 0; k < n; ++k) {
            s[k] = ST[i] * pi[k];
            y[k] = gni[k] - gi[k];
          }
          const double sy = dot(s.data(), y.data(), n);
          const double norms = std::sqrt(dot(s.data(), s.data(), n)) * std::sqrt(dot(y.data(), y.data(), n));
          if (sy > 1e-12 * std::max(norms, 1e-300)) {
            const int64_t at = (C[i] % h) * n;
            std::copy(s.begin(), s.end(), S + i * h * n + at);
            std::copy(y.begin(), y.end(), Y + i * h * n + at);
            C[i] += 1;
          }
          T* xi = X + i * n;
          for (int64_t k = 0; k < n; ++k) xi[k] += s[k];
        }
        const double rel = (static_cast<double>(F[i]) - FN[i]) / std::max<double>(std::abs(static_cast<double>(FN[i])), 1e-30);
        SM[i] = (moved && rel > tol) ? 0 : SM[i] + 1;
        IT[i] += 1;
        bool zero = true;
        for (int64_t k = 0; k < n && zero; ++k) zero = GN[i * n + k] == 0;
        D[i] = SM[i] >= 2 || zero;
      }
    });
  });
}

}  // namespace latentfast

TORCH_LIBRARY_IMPL(latentfast_cpp, CPU, m) {
  m.impl("lbfgs_direction_", &latentfast::lbfgs_direction_);
  m.impl("lbfgs_trial_", &latentfast::lbfgs_trial_);
  m.impl("lbfgs_update_", &latentfast::lbfgs_update_);
}
