// CPU kernel of lu_weight: W = P L (U + diag(sign_s * exp(log_abs_s))) and its inverse
// W^-1 = U'^-1 L^-1 P^T by forward and back substitution (no general inverse).
// L is unit lower triangular (strict lower part of `lower`), U' upper triangular.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/isa.h"
#include "common/scratch.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace latentfast {
// The small-C kernel (flows/lu_weight_kernels.inc) per instruction set, as the Glow kernels.
// LF_LU_PARTS: partial sums per row combination, as many as the registers hold (a block of
// 32 floats is 8 SSE, 4 AVX2 or 2 AVX-512 registers per partial sum).
#define LF_LU_PARTS 1
namespace lu_base {
#include "flows/lu_weight_kernels.inc"
}  // namespace lu_base
#undef LF_LU_PARTS
#ifdef LATENTFAST_X86_CLONES
#define LF_LU_PARTS 2
LF_TARGET_AVX2
namespace lu_avx2 {
#include "flows/lu_weight_kernels.inc"
}  // namespace lu_avx2
LF_TARGET_END
#undef LF_LU_PARTS
#define LF_LU_PARTS 4
LF_TARGET_AVX512
namespace lu_avx512 {
#include "flows/lu_weight_kernels.inc"
}  // namespace lu_avx512
LF_TARGET_END
#undef LF_LU_PARTS
#endif

namespace {

// rows[i] = the column of the 1 in row i of perm when perm is a permutation matrix (every row
// one 1 and zeros, every column hit once), as the flows build it: then P M is exactly a row
// gather of M and P^T M a row scatter. Rows of single 1s that repeat a column (P singular) take
// the GEMMs: the scatter would drop rows of P^T g and leave others unwritten.
template <typename T>
bool permutation_rows(const T* perm, int64_t C, std::vector<int64_t>& rows) {
  rows.assign(C, -1);
  std::vector<char> hit(C, 0);
  for (int64_t i = 0; i < C; ++i) {
    for (int64_t j = 0; j < C; ++j) {
      const T v = perm[i * C + j];
      if (v == T(0)) continue;
      if (v != T(1) || rows[i] >= 0 || hit[j]) return false;
      rows[i] = j;
      hit[j] = 1;
    }
    if (rows[i] < 0) return false;
  }
  return true;
}

// Below kBlasFromC: the operands of lu_small (U' and -U' in rows padded to a multiple of
// kLuCols, -L, 1 / d), then one call per block of columns.
template <typename T>
void lu_weight_kernel(const T* perm, const T* lower, const T* upper, const T* sign_s,
                      const T* log_abs_s, T* w, T* w_inv, int64_t C) {
  constexpr int64_t cols = lu_base::kLuCols;
  const int64_t nblk = (C + cols - 1) / cols, ld = nblk * cols;
  AlignedScratch<T> up(C * ld), up_neg(C * ld), lower_neg(C * C), inv_d(C), lu(C * ld), z(C * ld);
  for (int64_t i = 0; i < C; ++i) {
    const T d = sign_s[i] * std::exp(log_abs_s[i]);
    inv_d.data()[i] = T(1) / d;
    up.data()[i * ld + i] = d;
    for (int64_t j = i + 1; j < C; ++j) {
      up.data()[i * ld + j] = upper[i * C + j];
      up_neg.data()[i * ld + j] = -upper[i * C + j];
    }
    for (int64_t j = 0; j < i; ++j) lower_neg.data()[i * C + j] = -lower[i * C + j];
  }
  std::vector<int64_t> rows;
  const int64_t* prow = permutation_rows(perm, C, rows) ? rows.data() : nullptr;
  const isa::Isa cpu_isa = isa::selected();
  // Threads from C = 101 on: below, the parallel region costs more than it saves (paired,
  // 2 threads: one thread 1.2x faster at C = 48 and 64, level at 96, 1.23x slower at 127).
  const int64_t grain = C * C * C < (int64_t(1) << 20) ? nblk : 1;
  at::parallel_for(0, nblk, grain, [&](int64_t b0, int64_t b1) {
    LF_ISA_SELECT(cpu_isa, lu_, lu_small<T>(perm, prow, lower, lower_neg.data(), up.data(), up_neg.data(),
                                            inv_d.data(), lu.data(), z.data(), w, w_inv, C, ld, b0, b1));
  });
}

// From this many channels lu_weight calls BLAS/LAPACK instead of its own loops.
constexpr int64_t kBlasFromC = 128;

// low = unit lower triangle of `lower`, up = strict upper part of `upper` + diag(sign_s
// e^log_abs_s), in one pass each (at::tril / at::triu plus eye and diag took 4 passes).
template <typename T>
void triangles(const T* lower, const T* upper, const T* sign_s, const T* log_abs_s, T* low, T* up,
               int64_t C) {
  for (int64_t i = 0; i < C; ++i) {
    for (int64_t j = 0; j < C; ++j) {
      low[i * C + j] = j < i ? lower[i * C + j] : T(0);
      up[i * C + j] = j > i ? upper[i * C + j] : T(0);
    }
    low[i * C + i] = T(1);
    up[i * C + i] = sign_s[i] * std::exp(log_abs_s[i]);
  }
}

void check_lu_inputs(const at::Tensor& perm, const at::Tensor& lower, const at::Tensor& upper,
                     const at::Tensor& sign_s, const at::Tensor& log_abs_s) {
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
}

// low and up of triangles() as tensors, and whether P is a permutation matrix (then rows[i] is
// the column of row i's 1: P X is X's rows gathered, P^T X its rows scattered). Inputs
// contiguous.
bool lu_factors(const at::Tensor& p, const at::Tensor& l, const at::Tensor& u, const at::Tensor& sg,
                const at::Tensor& la, at::Tensor& low, at::Tensor& up, std::vector<int64_t>& rows) {
  const int64_t C = p.size(0);
  low = at::empty({C, C}, p.options());
  up = at::empty({C, C}, p.options());
  bool is_perm = false;
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "lu_weight", [&] {
    triangles<scalar_t>(l.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(),
                        sg.const_data_ptr<scalar_t>(), la.const_data_ptr<scalar_t>(),
                        low.mutable_data_ptr<scalar_t>(), up.mutable_data_ptr<scalar_t>(), C);
    is_perm = permutation_rows<scalar_t>(p.const_data_ptr<scalar_t>(), C, rows);
  });
  return is_perm;
}

std::tuple<at::Tensor, at::Tensor> lu_weight(const at::Tensor& perm, const at::Tensor& lower,
                                             const at::Tensor& upper, const at::Tensor& sign_s,
                                             const at::Tensor& log_abs_s) {
  check_lu_inputs(perm, lower, upper, sign_s, log_abs_s);
  const int64_t C = perm.size(0);
  const at::Tensor p = perm.contiguous(), l = lower.contiguous(), u = upper.contiguous();
  const at::Tensor sg = sign_s.contiguous(), la = log_abs_s.contiguous();
  if (C >= kBlasFromC) {
    // O(C^3) work: BLAS GEMMs and LAPACK triangular solves against lu_small (AVX-512 clone,
    // paired, fp32, 2 threads): BLAS 1.56x slower at C = 64 and 1.18x at 96, level from 128
    // to 192, 1.4x faster at 256 and 1.6x at 384 (1 thread: the same picture).
    // P (L U') as a row gather when P is a permutation matrix (the GEMM otherwise).
    at::Tensor low, up;
    std::vector<int64_t> rows;
    const bool is_perm = lu_factors(p, l, u, sg, la, low, up, rows);
    const at::Tensor lu = at::mm(low, up);
    const at::Tensor w = is_perm ? lu.index_select(0, at::tensor(rows, at::kLong)) : at::mm(p, lu);
    const at::Tensor z = at::linalg_solve_triangular(low, p.t(), /*upper=*/false, /*left=*/true,
                                                     /*unitriangular=*/true);
    return {w, at::linalg_solve_triangular(up, z, /*upper=*/true)};
  }
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

// Backward of lu_weight from the gradients of W and W^-1 (either may be undefined):
//   g = grad W - W^-T grad_{W^-1} W^-T  (d(W^-1) = -W^-1 dW W^-1),  G = P^T g,
//   grad lower = tril(G U'^T, -1),  H = L^T G,  grad upper = triu(H, 1),
//   grad log_abs_s = diag(H) * d  (U' = triu(upper, 1) + diag(d), d = sign_s e^log_abs_s).
// The GEMMs are at::mm (BLAS); P^T g is a row scatter when P is a permutation matrix (the twin of
// the forward's row gather). One call
// in place of the dozen PyTorch ops of the formula (reference.flows.lu_weight_backward).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lu_weight_bwd(
    const at::Tensor& perm, const at::Tensor& lower, const at::Tensor& upper, const at::Tensor& sign_s,
    const at::Tensor& log_abs_s, const at::Tensor& w_inv, const c10::optional<at::Tensor>& grad_w,
    const c10::optional<at::Tensor>& grad_w_inv) {
  check_lu_inputs(perm, lower, upper, sign_s, log_abs_s);
  const int64_t C = perm.size(0);
  const bool has_gw = grad_w.has_value() && grad_w->defined();
  const bool has_gwi = grad_w_inv.has_value() && grad_w_inv->defined();
  for (const at::Tensor* t : {&w_inv, has_gw ? &*grad_w : &w_inv, has_gwi ? &*grad_w_inv : &w_inv})
    TORCH_CHECK(t->sizes() == perm.sizes() && t->scalar_type() == perm.scalar_type() && t->device().is_cpu(),
                "lu_weight_bwd: w_inv, grad_w and grad_w_inv must be CPU tensors [", C, ", ", C,
                "] of perm's dtype");
  at::Tensor g;
  if (has_gwi) {
    const at::Tensor t = at::mm(w_inv.t(), *grad_w_inv);
    g = has_gw ? at::addmm(*grad_w, t, w_inv.t(), /*beta=*/1, /*alpha=*/-1) : at::mm(t, w_inv.t()).neg_();
  } else {
    g = has_gw ? grad_w->contiguous() : at::zeros({C, C}, perm.options());
  }
  const at::Tensor p = perm.contiguous(), l = lower.contiguous(), u = upper.contiguous();
  const at::Tensor sg = sign_s.contiguous(), la = log_abs_s.contiguous();
  at::Tensor low, up;
  std::vector<int64_t> rows;
  // P^T g: (P^T g)[rows[i]] = g[i] for a permutation (row copies: index_copy_ measured slower
  // at C = 48), the GEMM otherwise
  at::Tensor pg;
  if (lu_factors(p, l, u, sg, la, low, up, rows)) {
    const at::Tensor gc = g.contiguous();
    pg = at::empty_like(gc);
    const int64_t row = C * gc.element_size();
    const char* src = static_cast<const char*>(gc.const_data_ptr());
    char* dst = static_cast<char*>(pg.mutable_data_ptr());
    for (int64_t i = 0; i < C; ++i) std::memcpy(dst + rows[i] * row, src + i * row, row);
  } else {
    pg = at::mm(p.t(), g);
  }
  const at::Tensor a = at::mm(pg, up.t()).contiguous(), hm = at::mm(low.t(), pg).contiguous();
  at::Tensor g_lower = at::empty({C, C}, perm.options()), g_upper = at::empty({C, C}, perm.options());
  at::Tensor g_log = at::empty({C}, perm.options());
  AT_DISPATCH_FLOATING_TYPES(perm.scalar_type(), "lu_weight_bwd", [&] {
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* hp = hm.const_data_ptr<scalar_t>();
    const scalar_t* upp = up.const_data_ptr<scalar_t>();
    scalar_t* gl = g_lower.mutable_data_ptr<scalar_t>();
    scalar_t* gu = g_upper.mutable_data_ptr<scalar_t>();
    scalar_t* gd = g_log.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < C; ++i) {
      for (int64_t j = 0; j < C; ++j) {
        gl[i * C + j] = j < i ? ap[i * C + j] : scalar_t(0);
        gu[i * C + j] = j > i ? hp[i * C + j] : scalar_t(0);
      }
      gd[i] = hp[i * C + i] * upp[i * C + i];  // up's diagonal is d
    }
  });
  return {g_lower, g_upper, g_log};
}

}  // namespace
}  // namespace latentfast

TORCH_LIBRARY_IMPL(latentfast_cpp, CPU, m) {
  m.impl("lu_weight", &latentfast::lu_weight);
  m.impl("lu_weight_bwd", &latentfast::lu_weight_bwd);
}
