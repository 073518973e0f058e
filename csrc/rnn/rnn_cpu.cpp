// CPU kernels of gru_sequence and lstm_sequence (the whole sequence in one call) and of the
// Lyapunov ops rnn_lyapunov and lorenz_lyapunov (the whole Benettin run in one call).
// With >= 16 batch rows per thread each thread owns a block of rows for all T steps (rows
// are independent), so there is no fork/join per step: per step it projects its rows of x_t,
// runs one GEMM (h W_hh^T) and one fused gate loop; W_ih^T and W_hh^T are copied out
// contiguous once per call (StepWeight, common/blas_gemm.h). With fewer rows the input
// projections of all steps are one GEMM, then each step is one threaded GEMM plus one parallel
// gate loop.
// The backward through time is one GEMM and one fused loop per step; in the row-block path
// the weight, bias and input gradients are taken per chunk of steps (ChunkGrads), otherwise by
// one GEMM per weight at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include "common/blas_gemm.h"
#include "common/checks.h"
#include "common/isa.h"
#include "common/scratch.h"

#include <cmath>
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#endif
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace latentfast {
#define LF_ISA_BASELINE 1
namespace rnn_base {
#include "flows/vec_math.inc"
#include "rnn/gru_kernels.inc"
#include "rnn/lstm_kernels.inc"
#include "rnn/lyapunov_kernels.inc"
}  // namespace rnn_base
#undef LF_ISA_BASELINE

#ifdef LATENTFAST_X86_CLONES
// The lockstep gate loops (rnn/lockstep.inc) in AVX2 and AVX-512: each clone names its vector
// types and width, its intrinsics prefix and the four operations whose names differ;
// rnn/lockstep_names.inc derives the rest from the prefix.
LF_TARGET_AVX2
namespace rnn_avx2 {
using LfV = __m256;
using LfVi = __m256i;
constexpr int64_t LF_W = 8;
#define LF_PFX(op) _mm256_##op
#define LF_RCP _mm256_rcp_ps
#define LF_ROUND(v) _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define LF_CAST_IF _mm256_castsi256_ps
#define LF_SELECT_LT(a, b, x, y) _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_LT_OQ))
#include "rnn/lockstep_names.inc"
#include "flows/vec_math.inc"
#include "rnn/gru_kernels.inc"
#include "rnn/lstm_kernels.inc"
#include "rnn/lyapunov_kernels.inc"
#include "rnn/lockstep_undef.inc"
}  // namespace rnn_avx2
LF_TARGET_END

LF_TARGET_AVX512
namespace rnn_avx512 {
using LfV = __m512;
using LfVi = __m512i;
constexpr int64_t LF_W = 16;
#define LF_PFX(op) _mm512_##op
#define LF_RCP _mm512_rcp14_ps
#define LF_ROUND(v) _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define LF_CAST_IF _mm512_castsi512_ps
#define LF_SELECT_LT(a, b, x, y) _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), y, x)
#include "rnn/lockstep_names.inc"
#include "flows/vec_math.inc"
#include "rnn/gru_kernels.inc"
#include "rnn/lstm_kernels.inc"
#include "rnn/lyapunov_kernels.inc"
#include "rnn/lockstep_undef.inc"
}  // namespace rnn_avx512
LF_TARGET_END
#endif

namespace {

// The clone of the RNN kernel files an op call runs: the one isa::selected() names (the widest
// the CPU runs, or LATENTFAST_CPU_ISA; read once per op call), except that
// LATENTFAST_RNN_NO_AVX2=1 (read once per process; older switch, kept for the tests and scripts
// that use it) always takes the baseline build.
isa::Isa rnn_isa() {
  static const bool base_only = [] {
    const char* e = std::getenv("LATENTFAST_RNN_NO_AVX2");
    return e != nullptr && e[0] == '1';
  }();
  return base_only ? isa::Isa::base : isa::selected();
}

// fn(args) in the clone `lf_isa` names (a local of every op: const isa::Isa lf_isa = rnn_isa()).
#define LF_RNN_CALL(fn, ...) LF_ISA_SELECT(lf_isa, rnn_, fn(__VA_ARGS__))

void check_gru(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
               const at::Tensor& b_ih, const at::Tensor& b_hh) {
  TORCH_CHECK(x.dim() == 3 && h0.dim() == 2 && x.size(1) == h0.size(0),
              "gru_sequence: x must be [T, B, I] and h0 [B, H]");
  const int64_t H = h0.size(1);
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) == 3 * H && w_ih.size(1) == x.size(2),
              "gru_sequence: weight_ih must be [3H, I]");
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == 3 * H && w_hh.size(1) == H,
              "gru_sequence: weight_hh must be [3H, H]");
  TORCH_CHECK(b_ih.numel() == 3 * H && b_hh.numel() == 3 * H, "gru_sequence: biases must be [3H]");
  for (const auto* t : {&x, &h0, &w_ih, &w_hh, &b_ih, &b_hh}) {
    TORCH_CHECK(t->device().is_cpu(), "latentfast_cpp kernels take CPU tensors");
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "gru_sequence: all tensors must share x's dtype");
  }
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "gru_sequence: float32 or float64 only");
}

// Row `begin` of the state that step t reads: `first` ([B, H]) at t = 0, else seq[t - 1] of a
// contiguous [T, B, H] sequence (pointer arithmetic: no tensor view per step).
template <typename T>
const T* prev_rows(const at::Tensor& first, const at::Tensor& seq, int64_t t, int64_t B, int64_t H, int64_t begin) {
  return (t == 0 ? first.const_data_ptr<T>() : seq.const_data_ptr<T>() + (t - 1) * B * H) + begin * H;
}

// Rows per parallel chunk of a gate loop: about 2048 elements, so B = 64, H = 64 already
// splits across two threads.
int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 2048 / std::max<int64_t>(H, 1)); }

// W_hh^T for the per-step path's h W_hh^T, one threaded GEMM per step: with 8 or more rows
// and a few steps, a contiguous copy, since BLAS repacks a transposed operand on every call.
// Paired A/B in one process (T = 100, I = 32, 30 rounds), forward: B = 16, H = 256 GRU 1.48x,
// LSTM 1.27x; B = 8, H = 256 1.09-1.12x; B = 16, H = 64 1.07-1.09x; with fewer rows the copy
// lost (B = 4, H = 512 GRU 0.74x) or changed nothing (B = 1), so they keep the view.
at::Tensor step_weight_t(const at::Tensor& w_hh, int64_t T, int64_t B) {
  return T > 2 && B >= 8 ? w_hh.t().contiguous() : w_hh.t();
}

// Batch rows are independent through the whole recurrence, so with enough rows per thread
// each thread takes a block of rows and walks all T steps on its own (its own small GEMM per
// step, no barrier between steps). Returns the rows per block, or 0 for the per-step path
// (one threaded GEMM and one parallel gate loop per step), used when rows are too few.
int64_t rows_per_thread_block(int64_t B) {
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  const int64_t per = (B + nt - 1) / nt;
  return per >= 16 ? per : 0;
}

// The row-block backward keeps no [T, B, gates] tensor of gate gradients: each thread holds
// the gate gradients of `steps_per_chunk` steps of its rows (a small buffer that stays in
// cache) and, per chunk, takes their share of grad x and adds their share of the weight and
// bias gradients to its own accumulators (one GEMM each, k = the chunk's rows), summed over
// the threads at the end. The whole-batch form allocated 2 x [T, B, 3H] (GRU) or [T, B, 4H]
// (LSTM) of fresh memory per call and read it back for the weight GEMMs and the bias sums.
int64_t steps_per_chunk(int64_t rows, int64_t T) {
  // >= 128 rows per chunk GEMM: MKL's [G, k] x [k, H] runs at its full rate from k = 64 on
  return std::max<int64_t>(1, std::min<int64_t>(T, (128 + rows - 1) / std::max<int64_t>(rows, 1)));
}

// One thread's per-chunk gradient work, for rows [begin, begin + n) of steps
// [t_lo, t_lo + steps): dgi, dgh are [steps * n, G] (step-major; the same pointer for the
// LSTM, whose two biases share one gradient), x [T, B, I], h_prev(t) = h0 at t = 0, else
// out[t - 1]. Writes gx's rows of those steps; adds into acc_wih [G, I], acc_whh [G, H],
// acc_bih [G] and, if not null, acc_bhh [G]. xs, hs, gxs: scratch of steps * n rows.
template <typename T>
struct ChunkGrads {
  int64_t B, I, H, G, n, begin;
  const T *x, *h0, *out, *w_ih;
  T *gx, *acc_wih, *acc_whh, *acc_bih, *acc_bhh;
  AlignedScratch<T> xs, hs, gxs;

  void run(int64_t t_lo, int64_t steps, const T* dgi, const T* dgh) {
    const int64_t rows = steps * n;
    if (xs.size() < rows * I) {
      xs.resize(rows * I), gxs.resize(rows * I), hs.resize(rows * H);
    }
    for (int64_t j = 0; j < steps; ++j) {
      const int64_t t = t_lo + j;
      std::memcpy(xs.data() + j * n * I, x + (t * B + begin) * I, sizeof(T) * n * I);
      const T* hp = t == 0 ? h0 + begin * H : out + ((t - 1) * B + begin) * H;
      std::memcpy(hs.data() + j * n * H, hp, sizeof(T) * n * H);
    }
    gemm_rm<T>(false, false, rows, I, G, dgi, G, w_ih, I, T(0), gxs.data(), I);  // gx = dG_i W_ih
    for (int64_t j = 0; j < steps; ++j)
      std::memcpy(gx + ((t_lo + j) * B + begin) * I, gxs.data() + j * n * I, sizeof(T) * n * I);
    gemm_rm<T>(true, false, G, I, rows, dgi, G, xs.data(), I, T(1), acc_wih, I);      // += dG_i^T x
    gemm_rm<T>(true, false, G, H, rows, dgh, G, hs.data(), H, T(1), acc_whh, H);      // += dG_h^T h_prev
    for (int64_t r = 0; r < rows; ++r) {
      const T* a = dgi + r * G;
#pragma omp simd
      for (int64_t g = 0; g < G; ++g) acc_bih[g] += a[g];
    }
    if (acc_bhh != nullptr) {
      for (int64_t r = 0; r < rows; ++r) {
        const T* a = dgh + r * G;
#pragma omp simd
        for (int64_t g = 0; g < G; ++g) acc_bhh[g] += a[g];
      }
    }
  }
};

std::tuple<at::Tensor, at::Tensor> gru_sequence_fwd(const at::Tensor& x_in, const at::Tensor& h0_in,
                                                    const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                    const at::Tensor& b_ih, const at::Tensor& b_hh,
                                                    bool save) {
  const isa::Isa lf_isa = rnn_isa();
  check_gru(x_in, h0_in, w_ih, w_hh, b_ih, b_hh);
  const at::Tensor x = x_in.contiguous(), h0 = h0_in.contiguous();
  const int64_t T = x.size(0), B = x.size(1), H = h0.size(1);
  at::Tensor out = at::empty({T, B, H}, x.options());
  at::Tensor gates = save ? at::empty({T, B, 4 * H}, x.options()) : at::empty({0}, x.options());
  if (T == 0) return {out, gates};
  const at::Tensor w_hh_c = w_hh.contiguous(), b_hh_c = b_hh.contiguous();
  const at::Tensor w_ih_c = w_ih.contiguous(), b_ih_c = b_ih.contiguous();
  const int64_t block = rows_per_thread_block(B);
  const int64_t I = x.size(2);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gru_sequence_fwd", [&] {
    const scalar_t* bhp = b_hh_c.const_data_ptr<scalar_t>();
    if (block > 0) {
      // Row blocks: each thread also projects its own rows of x_t per step (x_t W_ih^T into a
      // small buffer that stays in cache; b_ih is added in the gate loop), instead of one
      // [T B, 3H] GEMM up front. Paired A/B on 2 cores (T=100, B=64, I=32): 1-2% faster at
      // H = 64, 6-15% at H = 256, and the [T, B, 3H] buffer is never allocated.
      const scalar_t* whp = w_hh_c.const_data_ptr<scalar_t>();
      const scalar_t* wip = w_ih_c.const_data_ptr<scalar_t>();
      const scalar_t* bip = b_ih_c.const_data_ptr<scalar_t>();
      at::parallel_for(0, B, block, [&](int64_t begin, int64_t end) {
        // worker threads do not inherit the caller's dispatch state: skip autograd here too
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        const int64_t n = end - begin;
        AlignedScratch<scalar_t> gi(n * 3 * H), gh(n * 3 * H);
        const StepWeight<scalar_t> wih_t(n, 3 * H, I, wip, true), whh_t(n, 3 * H, H, whp, true);
        for (int64_t t = 0; t < T; ++t) {
          const scalar_t* hp = prev_rows<scalar_t>(h0, out, t, B, H, begin);
          wih_t.apply(x.const_data_ptr<scalar_t>() + (t * B + begin) * I, I, scalar_t(0), gi.data(), 3 * H);
          whh_t.apply(hp, H, scalar_t(0), gh.data(), 3 * H);
          scalar_t* sp = save ? gates.mutable_data_ptr<scalar_t>() + (t * B + begin) * 4 * H : nullptr;
          LF_RNN_CALL(gru_gates_fwd_rows<scalar_t>, gi.data(), gh.data(), bhp, bip, hp,
                      out.mutable_data_ptr<scalar_t>() + (t * B + begin) * H, sp, H, 0, n);
        }
      });
      return;
    }
    // per-step path (few rows per thread): the input projections of all steps are one GEMM
    const at::Tensor gi_all = at::addmm(b_ih, x.reshape({T * B, I}), w_ih.t()).view({T, B, 3 * H});
    const at::Tensor w_hh_t = step_weight_t(w_hh, T, B);
    at::Tensor gh = at::empty({B, 3 * H}, x.options());
    for (int64_t t = 0; t < T; ++t) {
      const at::Tensor h = t == 0 ? h0 : out[t - 1];
      at::mm_out(gh, h, w_hh_t);  // b_hh is added in the gate loop (addmm would copy it first)
      const scalar_t* gi = gi_all.const_data_ptr<scalar_t>() + t * B * 3 * H;
      const scalar_t* ghp = gh.const_data_ptr<scalar_t>();
      const scalar_t* hp = h.const_data_ptr<scalar_t>();
      scalar_t* op = out.mutable_data_ptr<scalar_t>() + t * B * H;
      scalar_t* sp = save ? gates.mutable_data_ptr<scalar_t>() + t * B * 4 * H : nullptr;
      at::parallel_for(0, B, row_grain(H), [&](int64_t begin, int64_t end) {
        LF_RNN_CALL(gru_gates_fwd_rows<scalar_t>, gi, ghp, bhp, nullptr, hp, op, sp, H, begin, end);
      });
    }
  });
  return {out, gates};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_sequence_bwd(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& h0_in, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const at::Tensor& out_in, const at::Tensor& gates_in) {
  const isa::Isa lf_isa = rnn_isa();
  const at::Tensor x = x_in.contiguous(), h0 = h0_in.contiguous(), out = out_in.contiguous();
  const at::Tensor gates = gates_in.contiguous(), grad_out = grad_out_in.contiguous();
  TORCH_CHECK(x.dim() == 3 && h0.dim() == 2, "gru_sequence_bwd: x must be [T, B, I] and h0 [B, H]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "gru_sequence_bwd: float32 or float64 only");
  const int64_t T = x.size(0), B = x.size(1), H = h0.size(1), I = x.size(2), G = 3 * H;
  constexpr const char* op = "gru_sequence_bwd";
  check_arg(op, "x", x, {T, B, I}, x);
  check_arg(op, "h0", h0, {B, H}, x);
  check_arg(op, "weight_ih", w_ih, {G, I}, x);
  check_arg(op, "weight_hh", w_hh, {G, H}, x);
  check_arg(op, "out", out, {T, B, H}, x);
  check_arg(op, "grad_out", grad_out, {T, B, H}, x);
  check_arg(op, "gates", gates, {T, B, 4 * H}, x);
  at::Tensor dh = at::zeros({B, H}, x.options());
  const at::Tensor w_hh_c = w_hh.contiguous(), w_ih_c = w_ih.contiguous();
  const int64_t block = rows_per_thread_block(B);
  if (block > 0 && T > 0) {
    // Row blocks, chunked weight gradients (see ChunkGrads): per step one fused gate loop and
    // one GEMM (dh += dGH_t W_hh) for this thread's rows, per chunk of steps the GEMMs for
    // grad x, W_ih and W_hh.
    const int64_t n_blocks = (B + block - 1) / block;
    at::Tensor gx = at::empty({T, B, I}, x.options());
    at::Tensor acc_wih = at::zeros({n_blocks, G, I}, x.options()), acc_whh = at::zeros({n_blocks, G, H}, x.options());
    at::Tensor acc_b = at::zeros({n_blocks, 2, G}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gru_sequence_bwd", [&] {
      at::parallel_for(0, B, block, [&](int64_t begin, int64_t end) {
        // worker threads do not inherit the caller's dispatch state: skip autograd here too
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        const int64_t n = end - begin, id = begin / block, chunk = steps_per_chunk(n, T);
        scalar_t* dhp = dh.mutable_data_ptr<scalar_t>() + begin * H;
        const scalar_t* whp = w_hh_c.const_data_ptr<scalar_t>();
        AlignedScratch<scalar_t> dgi(chunk * n * G), dgh(chunk * n * G);
        scalar_t* accb = acc_b.mutable_data_ptr<scalar_t>() + id * 2 * G;
        ChunkGrads<scalar_t> cg{B, I, H, G, n, begin, x.const_data_ptr<scalar_t>(), h0.const_data_ptr<scalar_t>(),
                                out.const_data_ptr<scalar_t>(), w_ih_c.const_data_ptr<scalar_t>(),
                                gx.mutable_data_ptr<scalar_t>(), acc_wih.mutable_data_ptr<scalar_t>() + id * G * I,
                                acc_whh.mutable_data_ptr<scalar_t>() + id * G * H, accb, accb + G, {}, {}, {}};
        for (int64_t t_hi = T; t_hi > 0; t_hi -= chunk) {
          const int64_t t_lo = std::max<int64_t>(0, t_hi - chunk);
          for (int64_t t = t_hi - 1; t >= t_lo; --t) {
            const int64_t o = (t - t_lo) * n * G;
            LF_RNN_CALL(gru_gates_bwd_rows<scalar_t>, dhp, grad_out.const_data_ptr<scalar_t>() + (t * B + begin) * H,
                        prev_rows<scalar_t>(h0, out, t, B, H, begin),
                        gates.const_data_ptr<scalar_t>() + (t * B + begin) * 4 * H, dgi.data() + o, dgh.data() + o,
                        H, 0, n);
            step_gemm<scalar_t>(n, H, G, dgh.data() + o, G, whp, false, scalar_t(1), dhp, H);  // dh += dGH_t W_hh
          }
          cg.run(t_lo, t_hi - t_lo, dgi.data(), dgh.data());
        }
      });
    });
    return {gx, dh, acc_wih.sum(0), acc_whh.sum(0), acc_b.select(1, 0).sum(0), acc_b.select(1, 1).sum(0)};
  }
  // per-step path (few rows per thread): whole [T, B, 3H] gate gradients, then one GEMM per weight
  at::Tensor dgi = at::empty({T, B, G}, x.options());
  at::Tensor dgh = at::empty({T, B, G}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gru_sequence_bwd", [&] {
    for (int64_t t = T - 1; t >= 0; --t) {
      at::parallel_for(0, B, row_grain(H), [&](int64_t begin, int64_t end) {
        const int64_t o3 = (t * B + begin) * G;
        LF_RNN_CALL(gru_gates_bwd_rows<scalar_t>, dh.mutable_data_ptr<scalar_t>() + begin * H,
                    grad_out.const_data_ptr<scalar_t>() + (t * B + begin) * H,
                    prev_rows<scalar_t>(h0, out, t, B, H, begin),
                    gates.const_data_ptr<scalar_t>() + (t * B + begin) * 4 * H,
                    dgi.mutable_data_ptr<scalar_t>() + o3, dgh.mutable_data_ptr<scalar_t>() + o3, H, 0, end - begin);
      });
      dh.addmm_(dgh[t], w_hh);  // dh_t = (dh + grad_out_t) z + dGH_t W_hh, in place (no copy)
    }
  });
  const at::Tensor dgi2 = dgi.view({T * B, G}), dgh2 = dgh.view({T * B, G});
  at::Tensor h_prev_all = at::cat({h0.unsqueeze(0), out.narrow(0, 0, std::max<int64_t>(T - 1, 0))}, 0);
  at::Tensor gx = at::mm(dgi2, w_ih).view({T, B, I});
  at::Tensor gw_ih = at::mm(dgi2.t(), x.view({T * B, I}));
  at::Tensor gw_hh = at::mm(dgh2.t(), h_prev_all.view({T * B, H}));
  return {gx, dh, gw_ih, gw_hh, dgi2.sum(0), dgh2.sum(0)};
}

void check_lstm(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                const at::Tensor& w_hh, const at::Tensor& b_ih, const at::Tensor& b_hh) {
  TORCH_CHECK(x.dim() == 3 && h0.dim() == 2 && x.size(1) == h0.size(0) && c0.sizes() == h0.sizes(),
              "lstm_sequence: x must be [T, B, I], h0 and c0 [B, H]");
  const int64_t H = h0.size(1);
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) == 4 * H && w_ih.size(1) == x.size(2),
              "lstm_sequence: weight_ih must be [4H, I]");
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == 4 * H && w_hh.size(1) == H,
              "lstm_sequence: weight_hh must be [4H, H]");
  TORCH_CHECK(b_ih.numel() == 4 * H && b_hh.numel() == 4 * H, "lstm_sequence: biases must be [4H]");
  for (const auto* t : {&x, &h0, &c0, &w_ih, &w_hh, &b_ih, &b_hh}) {
    TORCH_CHECK(t->device().is_cpu(), "latentfast_cpp kernels take CPU tensors");
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "lstm_sequence: all tensors must share x's dtype");
  }
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "lstm_sequence: float32 or float64 only");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_sequence_fwd(
    const at::Tensor& x_in, const at::Tensor& h0_in, const at::Tensor& c0_in, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const at::Tensor& b_ih, const at::Tensor& b_hh, bool save) {
  const isa::Isa lf_isa = rnn_isa();
  check_lstm(x_in, h0_in, c0_in, w_ih, w_hh, b_ih, b_hh);
  const at::Tensor x = x_in.contiguous(), h0 = h0_in.contiguous(), c0 = c0_in.contiguous();
  const int64_t T = x.size(0), B = x.size(1), H = h0.size(1);
  at::Tensor out = at::empty({T, B, H}, x.options());
  at::Tensor cells = at::empty({T, B, H}, x.options());
  at::Tensor gates = save ? at::empty({T, B, 4 * H}, x.options()) : at::empty({0}, x.options());
  if (T == 0) return {out, cells, gates};
  const int64_t block = rows_per_thread_block(B);
  const at::Tensor bias = (b_ih + b_hh).contiguous();
  const at::Tensor w_hh_c = w_hh.contiguous(), w_ih_c = w_ih.contiguous();
  const int64_t I = x.size(2);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_sequence_fwd", [&] {
    if (block > 0) {
      // Row blocks: per step, a = x_t W_ih^T + h W_hh^T for this thread's rows in a small buffer
      // (both biases are added in the gate loop), as in gru_sequence_fwd.
      const scalar_t* whp = w_hh_c.const_data_ptr<scalar_t>();
      const scalar_t* wip = w_ih_c.const_data_ptr<scalar_t>();
      const scalar_t* biasp = bias.const_data_ptr<scalar_t>();
      at::parallel_for(0, B, block, [&](int64_t begin, int64_t end) {
        // worker threads do not inherit the caller's dispatch state: skip autograd here too
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        const int64_t n = end - begin;
        AlignedScratch<scalar_t> a(n * 4 * H);
        const StepWeight<scalar_t> wih_t(n, 4 * H, I, wip, true), whh_t(n, 4 * H, H, whp, true);
        for (int64_t t = 0; t < T; ++t) {
          const scalar_t* hp = prev_rows<scalar_t>(h0, out, t, B, H, begin);
          const scalar_t* cp = prev_rows<scalar_t>(c0, cells, t, B, H, begin);
          wih_t.apply(x.const_data_ptr<scalar_t>() + (t * B + begin) * I, I, scalar_t(0), a.data(), 4 * H);
          whh_t.apply(hp, H, scalar_t(1), a.data(), 4 * H);
          scalar_t* sp = save ? gates.mutable_data_ptr<scalar_t>() + (t * B + begin) * 4 * H : nullptr;
          LF_RNN_CALL(lstm_gates_fwd_rows<scalar_t>, a.data(), biasp, cp,
                      out.mutable_data_ptr<scalar_t>() + (t * B + begin) * H,
                      cells.mutable_data_ptr<scalar_t>() + (t * B + begin) * H, sp, H, 0, n);
        }
      });
      return;
    }
    // per-step path (few rows per thread): both biases folded into the input projections of all
    // steps (one GEMM)
    at::Tensor a_all = at::addmm(bias, x.reshape({T * B, I}), w_ih.t()).view({T, B, 4 * H});
    const at::Tensor w_hh_t = step_weight_t(w_hh, T, B);
    for (int64_t t = 0; t < T; ++t) {
      const at::Tensor h = t == 0 ? h0 : out[t - 1];
      a_all[t].addmm_(h, w_hh_t);
      const scalar_t* ap = a_all.const_data_ptr<scalar_t>() + t * B * 4 * H;
      const scalar_t* cp = prev_rows<scalar_t>(c0, cells, t, B, H, 0);
      scalar_t* op = out.mutable_data_ptr<scalar_t>() + t * B * H;
      scalar_t* cn = cells.mutable_data_ptr<scalar_t>() + t * B * H;
      scalar_t* sp = save ? gates.mutable_data_ptr<scalar_t>() + t * B * 4 * H : nullptr;
      at::parallel_for(0, B, row_grain(H), [&](int64_t begin, int64_t end) {
        LF_RNN_CALL(lstm_gates_fwd_rows<scalar_t>, ap, nullptr, cp, op, cn, sp, H, begin, end);
      });
    }
  });
  return {out, cells, gates};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_sequence_bwd(const at::Tensor& grad_out_in, const at::Tensor& grad_cells_in, const at::Tensor& x_in,
                  const at::Tensor& h0_in, const at::Tensor& c0_in, const at::Tensor& w_ih, const at::Tensor& w_hh,
                  const at::Tensor& out_in, const at::Tensor& cells_in, const at::Tensor& gates_in) {
  const isa::Isa lf_isa = rnn_isa();
  const at::Tensor x = x_in.contiguous(), h0 = h0_in.contiguous(), c0 = c0_in.contiguous();
  const at::Tensor out = out_in.contiguous(), cells = cells_in.contiguous(), gates = gates_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous(), grad_cells = grad_cells_in.contiguous();
  TORCH_CHECK(x.dim() == 3 && h0.dim() == 2, "lstm_sequence_bwd: x must be [T, B, I] and h0 [B, H]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "lstm_sequence_bwd: float32 or float64 only");
  const int64_t T = x.size(0), B = x.size(1), H = h0.size(1), I = x.size(2);
  const int64_t G = 4 * H;
  constexpr const char* op = "lstm_sequence_bwd";
  check_arg(op, "x", x, {T, B, I}, x);
  check_arg(op, "h0", h0, {B, H}, x);
  check_arg(op, "c0", c0, {B, H}, x);
  check_arg(op, "weight_ih", w_ih, {G, I}, x);
  check_arg(op, "weight_hh", w_hh, {G, H}, x);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"out", &out}, {"cells", &cells},
                                {"grad_out", &grad_out}, {"grad_cells", &grad_cells}}) {
    check_arg(op, name, *t, {T, B, H}, x);
  }
  check_arg(op, "gates", gates, {T, B, G}, x);
  at::Tensor dh = at::zeros({B, H}, x.options());
  at::Tensor dc = at::zeros({B, H}, x.options());
  at::Tensor dc_next = at::empty({B, H}, x.options());
  const at::Tensor w_hh_c = w_hh.contiguous(), w_ih_c = w_ih.contiguous();
  const int64_t block = rows_per_thread_block(B);
  // rows [begin, end) of step t: reads dc_in, writes dc_out (row-local pointers) and dA rows at da
  auto step = [&](auto* da, int64_t t, int64_t begin, int64_t end, const auto* dc_in, auto* dc_out) {
    using scalar_t = std::remove_pointer_t<decltype(da)>;
    const int64_t o1 = (t * B + begin) * H;
    LF_RNN_CALL(lstm_gates_bwd_rows<scalar_t>, dh.const_data_ptr<scalar_t>() + begin * H,
                grad_out.const_data_ptr<scalar_t>() + o1, dc_in, grad_cells.const_data_ptr<scalar_t>() + o1,
                gates.const_data_ptr<scalar_t>() + (t * B + begin) * 4 * H,
                prev_rows<scalar_t>(c0, cells, t, B, H, begin), cells.const_data_ptr<scalar_t>() + o1, da, dc_out,
                H, 0, end - begin);
  };
  if (block > 0 && T > 0) {
    // Row blocks, chunked weight gradients, as in gru_sequence_bwd (one dA for both biases).
    const int64_t n_blocks = (B + block - 1) / block;
    at::Tensor gx = at::empty({T, B, I}, x.options());
    at::Tensor acc_wih = at::zeros({n_blocks, G, I}, x.options()), acc_whh = at::zeros({n_blocks, G, H}, x.options());
    at::Tensor acc_b = at::zeros({n_blocks, G}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_sequence_bwd", [&] {
      at::parallel_for(0, B, block, [&](int64_t begin, int64_t end) {
        // worker threads do not inherit the caller's dispatch state: skip autograd here too
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        const int64_t n = end - begin, id = begin / block, chunk = steps_per_chunk(n, T);
        scalar_t* dhp = dh.mutable_data_ptr<scalar_t>() + begin * H;
        const scalar_t* whp = w_hh_c.const_data_ptr<scalar_t>();
        scalar_t* bufs[2] = {dc.mutable_data_ptr<scalar_t>() + begin * H,
                             dc_next.mutable_data_ptr<scalar_t>() + begin * H};
        AlignedScratch<scalar_t> da(chunk * n * G);
        ChunkGrads<scalar_t> cg{B, I, H, G, n, begin, x.const_data_ptr<scalar_t>(), h0.const_data_ptr<scalar_t>(),
                                out.const_data_ptr<scalar_t>(), w_ih_c.const_data_ptr<scalar_t>(),
                                gx.mutable_data_ptr<scalar_t>(), acc_wih.mutable_data_ptr<scalar_t>() + id * G * I,
                                acc_whh.mutable_data_ptr<scalar_t>() + id * G * H,
                                acc_b.mutable_data_ptr<scalar_t>() + id * G, nullptr, {}, {}, {}};
        int cur = 0;
        for (int64_t t_hi = T; t_hi > 0; t_hi -= chunk) {
          const int64_t t_lo = std::max<int64_t>(0, t_hi - chunk);
          for (int64_t t = t_hi - 1; t >= t_lo; --t) {
            scalar_t* dap = da.data() + (t - t_lo) * n * G;
            step(dap, t, begin, end, static_cast<const scalar_t*>(bufs[cur]), bufs[1 - cur]);
            cur = 1 - cur;
            step_gemm<scalar_t>(n, H, G, dap, G, whp, false, scalar_t(0), dhp, H);  // dh_t = dA_t W_hh
          }
          cg.run(t_lo, t_hi - t_lo, da.data(), da.data());
        }
        if (cur == 1) std::memcpy(bufs[0], bufs[1], sizeof(scalar_t) * n * H);  // result into dc
      });
    });
    const at::Tensor db = acc_b.sum(0);
    return {gx, dh, dc, acc_wih.sum(0), acc_whh.sum(0), db, db.clone()};
  }
  // per-step path (few rows per thread): whole [T, B, 4H] gate gradients, then one GEMM per weight
  at::Tensor da = at::empty({T, B, G}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_sequence_bwd", [&] {
    for (int64_t t = T - 1; t >= 0; --t) {
      const scalar_t* dcp = dc.const_data_ptr<scalar_t>();
      scalar_t* dnp = dc_next.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, B, row_grain(H), [&](int64_t begin, int64_t end) {
        step(da.mutable_data_ptr<scalar_t>() + (t * B + begin) * G, t, begin, end, dcp + begin * H, dnp + begin * H);
      });
      std::swap(dc, dc_next);
      at::mm_out(dh, da[t], w_hh);  // dh_t = dA_t W_hh
    }
  });
  const at::Tensor da2 = da.view({T * B, G});
  at::Tensor h_prev_all = at::cat({h0.unsqueeze(0), out.narrow(0, 0, std::max<int64_t>(T - 1, 0))}, 0);
  at::Tensor gx = at::mm(da2, w_ih).view({T, B, I});
  at::Tensor gw_ih = at::mm(da2.t(), x.view({T * B, I}));
  at::Tensor gw_hh = at::mm(da2.t(), h_prev_all.view({T * B, H}));
  at::Tensor db = da2.sum(0);
  return {gx, dh, dc, gw_ih, gw_hh, db, db.clone()};
}

void check_lyap(const char* name, const at::Tensor& s0, const at::Tensor& q0) {
  TORCH_CHECK(s0.dim() == 2 && q0.dim() == 3 && q0.size(0) == s0.size(0) && q0.size(1) == s0.size(1),
              name, ": s0 must be [B, S] and q0 [B, S, k]");
  TORCH_CHECK(q0.size(2) >= 1 && q0.size(2) <= s0.size(1), name, ": k must be in [1, S]");
  TORCH_CHECK(s0.device().is_cpu() && q0.device().is_cpu(), "latentfast_cpp kernels take CPU tensors");
  TORCH_CHECK(s0.scalar_type() == q0.scalar_type() &&
                  (s0.scalar_type() == at::kFloat || s0.scalar_type() == at::kDouble),
              name, ": float32 or float64, one dtype");
}

std::tuple<at::Tensor, at::Tensor> rnn_lyapunov(const at::Tensor& s0, const at::Tensor& q0, const at::Tensor& mat_in,
                                                const at::Tensor& bias_in, int64_t cell, int64_t n_steps,
                                                int64_t qr_every, int64_t transient, double dt) {
  const isa::Isa lf_isa = rnn_isa();
  check_lyap("rnn_lyapunov", s0, q0);
  TORCH_CHECK(mat_in.dim() == 2, "rnn_lyapunov: mat must be [G, H], got ", mat_in.sizes());
  const at::Tensor mat = mat_in.contiguous(), bias = bias_in.contiguous();
  const int64_t B = s0.size(0), S = s0.size(1), k = q0.size(2), G = mat.size(0), H = mat.size(1);
  TORCH_CHECK(cell >= 0 && cell <= 2, "rnn_lyapunov: cell must be 0 (tanh RNN), 1 (GRU) or 2 (LSTM)");
  TORCH_CHECK(G == (cell == 0 ? H : 4 * H) && S == (cell == 2 ? 2 * H : H) && bias.numel() == G,
              "rnn_lyapunov: mat [G, H], bias [G] and the state size do not fit the cell");
  TORCH_CHECK(mat.scalar_type() == s0.scalar_type() && bias.scalar_type() == s0.scalar_type() && mat.device().is_cpu(),
              "rnn_lyapunov: mat and bias must be CPU tensors of s0's dtype");
  TORCH_CHECK(n_steps >= 1 && qr_every >= 1 && transient >= 0, "rnn_lyapunov: bad step counts");
  const int64_t R = k + 1;
  at::Tensor v = at::empty({B, R, S}, s0.options());
  v.select(1, 0).copy_(s0);
  v.narrow(1, 1, k).copy_(q0.transpose(1, 2));
  at::Tensor pre = at::empty({B * R, G}, s0.options());
  at::Tensor sums = at::zeros({B, k}, s0.options());
  const at::Tensor mat_t = mat.t();
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(R * H, 1));
  AT_DISPATCH_FLOATING_TYPES(s0.scalar_type(), "rnn_lyapunov", [&] {
    scalar_t* vp = v.mutable_data_ptr<scalar_t>();
    const scalar_t* bp = bias.const_data_ptr<scalar_t>();
    auto step = [&](int64_t rows) {
      const at::Tensor vin = rows == R ? v.view({B * R, S}).narrow(1, 0, H) : v.select(1, 0).narrow(1, 0, H);
      at::Tensor p = pre.narrow(0, 0, B * rows);
      at::mm_out(p, vin, mat_t);
      const scalar_t* pp = p.const_data_ptr<scalar_t>();
      at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
        LF_RNN_CALL(rnn_tangent_rows<scalar_t>, cell, pp, bp, vp, R * S, H, rows, S, G, begin, end);
      });
    };
    auto orthonormalise = [&](scalar_t* logs) {
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b)
          LF_RNN_CALL(mgs_rows<scalar_t>, vp + b * R * S + S, k, S, logs ? logs + b * k : nullptr);
      });
    };
    for (int64_t t = 0; t < transient; ++t) step(1);
    orthonormalise(nullptr);
    scalar_t* sp = sums.mutable_data_ptr<scalar_t>();
    for (int64_t t = 0; t < n_steps; ++t) {
      step(R);
      if ((t + 1) % qr_every == 0 || t == n_steps - 1) orthonormalise(sp);
    }
  });
  return {sums.div_(static_cast<double>(n_steps) * dt), v.select(1, 0).clone()};
}

std::tuple<at::Tensor, at::Tensor> lorenz_lyapunov(const at::Tensor& x0_in, const at::Tensor& q0_in, int64_t system,
                                                   double p0, double p1, double p2, double dt, int64_t n_steps,
                                                   int64_t qr_every, int64_t transient) {
  const isa::Isa lf_isa = rnn_isa();
  check_lyap("lorenz_lyapunov", x0_in, q0_in);
  TORCH_CHECK(system == 0 || system == 1, "lorenz_lyapunov: system must be 0 (Lorenz-63) or 1 (Lorenz-96)");
  TORCH_CHECK(system == 1 || x0_in.size(1) == 3, "lorenz_lyapunov: Lorenz-63 states are [B, 3]");
  TORCH_CHECK(system == 0 || x0_in.size(1) >= 4, "lorenz_lyapunov: Lorenz-96 needs N >= 4");
  TORCH_CHECK(n_steps >= 1 && qr_every >= 1 && transient >= 0, "lorenz_lyapunov: bad step counts");
  const at::Tensor x0 = x0_in.contiguous(), q0 = q0_in.transpose(1, 2).contiguous();  // rows [B, k, N]
  const int64_t B = x0.size(0), N = x0.size(1), k = q0.size(1), R = k + 1;
  at::Tensor exps = at::zeros({B, k}, x0.options());
  at::Tensor final_state = at::empty({B, N}, x0.options());
  AT_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "lorenz_lyapunov", [&] {
    const scalar_t* xp = x0.const_data_ptr<scalar_t>();
    const scalar_t* qp = q0.const_data_ptr<scalar_t>();
    scalar_t* ep = exps.mutable_data_ptr<scalar_t>();
    scalar_t* fp = final_state.mutable_data_ptr<scalar_t>();
    const scalar_t h = static_cast<scalar_t>(dt), a = static_cast<scalar_t>(p0), b = static_cast<scalar_t>(p1),
                   c = static_cast<scalar_t>(p2);
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> v(R * N), work(3 * R * N);
      for (int64_t i = begin; i < end; ++i) {
        std::copy(xp + i * N, xp + (i + 1) * N, v.begin());
        for (int64_t t = 0; t < transient; ++t) LF_RNN_CALL(lorenz_rk4<scalar_t>, system, v.data(), work.data(), 1, N, h, a, b, c);
        std::copy(qp + i * k * N, qp + (i + 1) * k * N, v.begin() + N);
        LF_RNN_CALL(mgs_rows<scalar_t>, v.data() + N, k, N, nullptr);
        for (int64_t t = 0; t < n_steps; ++t) {
          LF_RNN_CALL(lorenz_rk4<scalar_t>, system, v.data(), work.data(), R, N, h, a, b, c);
          if ((t + 1) % qr_every == 0 || t == n_steps - 1) LF_RNN_CALL(mgs_rows<scalar_t>, v.data() + N, k, N, ep + i * k);
        }
        std::copy(v.begin(), v.begin() + N, fp + i * N);
      }
    });
  });
  return {exps.div_(static_cast<double>(n_steps) * dt), final_state};
}

}  // namespace
}  // namespace latentfast

TORCH_LIBRARY_IMPL(latentfast_cpp, CPU, m) {
  m.impl("gru_sequence_fwd", &latentfast::gru_sequence_fwd);
  m.impl("gru_sequence_bwd", &latentfast::gru_sequence_bwd);
  m.impl("lstm_sequence_fwd", &latentfast::lstm_sequence_fwd);
  m.impl("lstm_sequence_bwd", &latentfast::lstm_sequence_bwd);
  m.impl("rnn_lyapunov", &latentfast::rnn_lyapunov);
  m.impl("lorenz_lyapunov", &latentfast::lorenz_lyapunov);
}
