// CPU kernel of lu_weight: W = P L (U + diag(sign_s * exp(log_abs_s))) and its inverse
// W^-1 = U'^-1 L^-1 P^T by forward and back substitution (no general inverse).
// L is unit lower triangular (strict lower part of `lower`), U' upper triangular.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace latentfast {
namespace {

template <typename T>
void lu_weight_kernel(const T* perm, const T* lower, const T* upper, const T* sign_s,
                      const T* log_abs_s, T* w, T* w_inv, int64_t C) {
  using acc_t = at::opmath_type<T>;
  std::vector<acc_t> diag(C), lu(C * C), z(C * C);
  for (int64_t i = 0; i < C; ++i) diag[i] = acc_t(sign_s[i]) * std::exp(acc_t(log_abs_s[i]));
  auto u_at = [&](int64_t i, int64_t j) -> acc_t {
    return i == j ? diag[i] : (j > i ? acc_t(upper[i * C + j]) : acc_t(0));
  };
  // lu = L U'
  at::parallel_for(0, C, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t j = 0; j < C; ++j) {
        acc_t s = u_at(i, j);
        const int64_t kmax = i < j ? i : j;  // L[i,k] != 0 needs k < i, U'[k,j] needs k <= j
        for (int64_t k = 0; k <= kmax && k < i; ++k) s += acc_t(lower[i * C + k]) * u_at(k, j);
        lu[i * C + j] = s;
      }
    }
  });
  // W = P lu
  at::parallel_for(0, C, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      for (int64_t j = 0; j < C; ++j) {
        acc_t s = 0;
        for (int64_t k = 0; k < C; ++k) s += acc_t(perm[i * C + k]) * lu[k * C + j];
        w[i * C + j] = T(s);
      }
  });
  // Column j of Z = L^-1 P^T, then of W^-1 = U'^-1 Z; columns are independent.
  at::parallel_for(0, C, 8, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      for (int64_t i = 0; i < C; ++i) {  // L z = P^T e_j, P^T[i, j] = P[j, i]
        acc_t s = acc_t(perm[j * C + i]);
        for (int64_t k = 0; k < i; ++k) s -= acc_t(lower[i * C + k]) * z[k * C + j];
        z[i * C + j] = s;
      }
      for (int64_t i = C - 1; i >= 0; --i) {  // U' v = z
        acc_t s = z[i * C + j];
        for (int64_t k = i + 1; k < C; ++k) s -= acc_t(upper[i * C + k]) * z[k * C + j];
        z[i * C + j] = s / diag[i];  // z's column j is overwritten from the bottom up
      }
      for (int64_t i = 0; i < C; ++i) w_inv[i * C + j] = T(z[i * C + j]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> lu_weight(const at::Tensor& perm, const at::Tensor& lower,
                                             const at::Tensor& upper, const at::Tensor& sign_s,
                                             const at::Tensor& log_abs_s) {
  TORCH_CHECK(perm.dim() == 2 && perm.size(0) == perm.size(1), "lu_weight: perm must be [C, C]");
  const int64_t C = perm.size(0);
  TORCH_CHECK(lower.sizes() == perm.sizes() && upper.sizes() == perm.sizes(),
              "lu_weight: lower and upper must be [", C, ", ", C, "]");
  TORCH_CHECK(sign_s.dim() == 1 && sign_s.size(0) == C && log_abs_s.dim() == 1 &&
                  log_abs_s.size(0) == C,
              "lu_weight: sign_s and log_abs_s must be [", C, "]");
  for (const auto* t : {&lower, &upper, &sign_s, &log_abs_s})
    TORCH_CHECK(t->scalar_type() == perm.scalar_type() && t->device().is_cpu(),
                "lu_weight: all inputs must be CPU tensors of one dtype");
  const at::Tensor p = perm.contiguous(), l = lower.contiguous(), u = upper.contiguous();
  const at::Tensor sg = sign_s.contiguous(), la = log_abs_s.contiguous();
  at::Tensor w = at::empty({C, C}, perm.options());
  at::Tensor w_inv = at::empty({C, C}, perm.options());
  AT_DISPATCH_FLOATING_TYPES(perm.scalar_type(), "lu_weight", [&] {
    lu_weight_kernel<scalar_t>(p.const_data_ptr<scalar_t>(), l.const_data_ptr<scalar_t>(),
                               u.const_data_ptr<scalar_t>(), sg.const_data_ptr<scalar_t>(),
                               la.const_data_ptr<scalar_t>(), w.mutable_data_ptr<scalar_t>(),
                               w_inv.mutable_data_ptr<scalar_t>(), C);
  });
  return {w, w_inv};
}

}  // namespace
}  // namespace latentfast

TORCH_LIBRARY_IMPL(latentfast_cpp, CPU, m) { m.impl("lu_weight", &latentfast::lu_weight); }
