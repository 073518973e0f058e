// Small row-major GEMMs straight into the BLAS that libtorch_cpu carries (sgemm_/dgemm_, MKL
// in the x86 wheels) when it exports them, and through at::mm_out / addmm_ when it does not
// (weak symbols). Used by the row-block paths of the RNN and vector-flow kernels, whose
// per-block GEMMs are small enough that the dispatcher, the tensor views and the checks of
// at::mm_out are a visible share (paired A/B on 2 cores, RNN T=100 B=64 I=32: 2-7% at H = 64).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/scratch.h"

extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace latentfast {

// LATENTFAST_ATEN_GEMM=1 (or its older name LATENTFAST_RNN_ATEN_GEMM=1) forces the at::mm_out
// fallback; read once. The tests use it to check that path in a subprocess.
inline bool aten_gemm_forced() {
  static const bool forced = [] {
    for (const char* name : {"LATENTFAST_ATEN_GEMM", "LATENTFAST_RNN_ATEN_GEMM"}) {
      const char* e = std::getenv(name);
      if (e != nullptr && e[0] == '1') return true;
    }
    return false;
  }();
  return forced;
}

// Row-major C[m, n] = op(A) op(B) + beta C, op(X) = X^T when its flag is set; A, B, C have
// row strides lda, ldb, ldc (A is [m, k] or, transposed, [k, m]; likewise B).
template <typename T>
void gemm_rm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
             int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  auto* blas = [] {
    if constexpr (std::is_same_v<T, float>) return sgemm_; else return dgemm_;
  }();
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  const bool fits = std::max({m, n, k, lda, ldb, ldc}) <= kIntMax;
  if (blas != nullptr && fits && k > 0 && !aten_gemm_forced()) {
    // column-major view: C^T [n, m] = op(B)^T [n, k] op(A)^T [k, m]
    const char tb = trans_b ? 'T' : 'N', ta = trans_a ? 'T' : 'N';
    const int in = static_cast<int>(n), im = static_cast<int>(m), ik = static_cast<int>(k);
    const int ildb = static_cast<int>(ldb), ilda = static_cast<int>(lda), ildc = static_cast<int>(ldc);
    const T one = T(1);
    blas(&tb, &ta, &in, &im, &ik, &one, b, &ildb, a, &ilda, &beta, c, &ildc);
    return;
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor tc = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  if (k == 0) {  // BLAS leaves beta C; so does this
    if (beta == T(0)) tc.zero_(); else tc.mul_(beta);
    return;
  }
  const at::Tensor ta = trans_a ? at::from_blob(const_cast<T*>(a), {k, m}, {lda, 1}, opts).t()
                                : at::from_blob(const_cast<T*>(a), {m, k}, {lda, 1}, opts);
  const at::Tensor tb = trans_b ? at::from_blob(const_cast<T*>(b), {n, k}, {ldb, 1}, opts).t()
                                : at::from_blob(const_cast<T*>(b), {k, n}, {ldb, 1}, opts);
  if (beta == T(0)) at::mm_out(tc, ta, tb); else tc.addmm_(ta, tb, beta);
}

// Row-major C[m, n] = A[m, k] op(W) + beta C, with op(W) = W^T for W stored [n, k] (w_nk) or
// W for W stored [k, n]; A has row stride lda, C row stride ldc, W is contiguous.
template <typename T>
void step_gemm(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* w, bool w_nk, T beta, T* c,
               int64_t ldc) {
  gemm_rm<T>(false, w_nk, m, n, k, a, lda, w, w_nk ? k : n, beta, c, ldc);
}

// dst [cols, rows] = src [rows, cols] transposed (both contiguous), by 32 x 32 blocks so both
// sides of the copy stay in cache.
template <typename T>
void transpose_blocked(const T* src, int64_t rows, int64_t cols, T* dst) {
  constexpr int64_t kBlock = 32;
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock)
    for (int64_t c0 = 0; c0 < cols; c0 += kBlock)
      for (int64_t r = r0; r < std::min(rows, r0 + kBlock); ++r)
        for (int64_t c = c0; c < std::min(cols, c0 + kBlock); ++c) dst[c * rows + r] = src[r * cols + c];
}

// The weight of row-major C[m, n] = A[m, k] op(W) + beta C, for a loop that applies the same W
// to many m-row blocks (the RNN forward's W_ih and W_hh, every time step). Given W stored
// [n, k] (w_nk: op(W) = W^T, nn.GRU's layout) it keeps a contiguous copy of W^T [k, n], made
// once, so each step is a plain (no-transpose) GEMM: BLAS sgemm repacks a transposed operand
// on every call. MKL on 2 cores, one thread, [32, 256] x [256, 768]: 105 -> 78 us a call;
// [32, 64] x [64, 192]: 10.7 -> 8.7 us; in the ops (paired A/B, T = 100, B = 64, I = 32) the
// forward 1.16-1.21x at H = 64 and 1.14-1.20x at H = 256. MKL's own packed-weight API
// (cblas_sgemm_pack once, cblas_sgemm_compute per step) measured no better: 1.01-1.05x at H = 64,
// 1.22x at H = 256. Given W stored [k, n] it uses W in place.
template <typename T>
class StepWeight {
 public:
  StepWeight(int64_t m, int64_t n, int64_t k, const T* w, bool w_nk) : m_(m), n_(n), k_(k), w_(w) {
    if (!w_nk) return;
    wt_.resize(n * k);
    transpose_blocked(w, n, k, wt_.data());
    w_ = wt_.data();
  }
  // C = A op(W) + beta C for an A of m rows (the m given at construction), row stride lda.
  void apply(const T* a, int64_t lda, T beta, T* c, int64_t ldc) const {
    step_gemm<T>(m_, n_, k_, a, lda, w_, false, beta, c, ldc);
  }

 private:
  int64_t m_, n_, k_;
  const T* w_;
  AlignedScratch<T> wt_;
};

}  // namespace latentfast
