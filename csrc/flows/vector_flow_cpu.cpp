// CPU kernels of the vector flow stack (K masked-MLP flow steps on [B, d] latent vectors):
// forward (optionally keeping what the backward needs), backward to x and to the per-step
// pre-activations and outputs, and the inverse by fixed-point sweeps or, for autoregressive
// steps, in dependency order (see SeqPlan). Per step: two ATen GEMMs over the whole batch
// and fused row loops for the ReLU and the gated update (the loops eager PyTorch spends most
// of its time in). The weight gradients are batched GEMMs
// over the steps, done by the caller (latentfast/ops/vector_flows.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/blas_gemm.h"
#include "common/checks.h"
#include "common/isa.h"
#include "common/scratch.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace latentfast {
// LF_VF_LANE_BYTES: the lane vectors' size in each clone, its native vector width (see
// VfLanes in vector_flow_kernels.inc).
#define LF_ISA_BASELINE 1
#define LF_VF_LANE_BYTES 16
namespace vf_base {
#include "flows/vec_math.inc"
#include "flows/vector_flow_kernels.inc"
}  // namespace vf_base
#undef LF_ISA_BASELINE
#undef LF_VF_LANE_BYTES

// The row loops are also built for AVX2+FMA and AVX-512 (see common/isa.h); Dims carries the
// clone an op call uses.
#ifdef LATENTFAST_X86_CLONES
#define LF_VF_LANE_BYTES 32
LF_TARGET_AVX2
namespace vf_avx2 {
#include "flows/vec_math.inc"
#include "flows/vector_flow_kernels.inc"
}  // namespace vf_avx2
LF_TARGET_END
#undef LF_VF_LANE_BYTES
#define LF_VF_LANE_BYTES 64
LF_TARGET_AVX512
namespace vf_avx512 {
#include "flows/vec_math.inc"
#include "flows/vector_flow_kernels.inc"
}  // namespace vf_avx512
LF_TARGET_END
#undef LF_VF_LANE_BYTES
#endif

namespace {

#define LF_VF_CALL(isa_v, fn, ...) LF_ISA_SELECT(isa_v, vf_, fn(__VA_ARGS__))

int64_t grain(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)); }

struct Dims {
  int64_t K, B, d, H, O;
  isa::Isa isa;  // the clone of the row loops this call uses
};

Dims check_stack(const at::Tensor& x, const c10::optional<at::Tensor>& ctx, const at::Tensor& w1,
                 const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& act,
                 bool additive) {
  TORCH_CHECK(x.dim() == 2 && w1.dim() == 3 && w2.dim() == 3 && b1.dim() == 2 && b2.dim() == 2 && act.dim() == 2,
              "vector_flow_stack: x [B, d], w1 [K, H, d], b1 [K, H], w2 [K, O, H], b2 [K, O], act [K, d]");
  Dims n{w1.size(0), x.size(0), x.size(1), w1.size(1), w2.size(1), isa::selected()};
  TORCH_CHECK(n.K >= 1, "vector_flow_stack: needs at least one step");
  TORCH_CHECK(w1.size(2) == n.d && b1.size(0) == n.K && b1.size(1) == n.H, "vector_flow_stack: w1/b1 shapes");
  TORCH_CHECK(n.O == (additive ? n.d : 2 * n.d) && w2.size(0) == n.K && w2.size(2) == n.H,
              "vector_flow_stack: w2 must be [K, ", additive ? n.d : 2 * n.d, ", H]");
  TORCH_CHECK(b2.size(0) == n.K && b2.size(1) == n.O && act.size(0) == n.K && act.size(1) == n.d,
              "vector_flow_stack: b2/act shapes");
  if (ctx.has_value())
    TORCH_CHECK(ctx->dim() == 3 && ctx->size(0) == n.K && ctx->size(1) == n.B && ctx->size(2) == n.H,
                "vector_flow_stack: ctx must be [K, B, H]");
  for (const auto* t : {&x, &w1, &b1, &w2, &b2, &act}) {
    TORCH_CHECK(t->device().is_cpu(), "latentfast_cpp kernels take CPU tensors");
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "vector_flow_stack: all tensors must share x's dtype");
  }
  if (ctx.has_value()) check_arg("vector_flow_stack", "ctx", *ctx, {n.K, n.B, n.H}, x);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "vector_flow_stack: float32 or float64 only");
  return n;
}

// Row tiles. Batch rows are independent through the whole stack, so each thread can take a
// tile of rows through all K steps (and, in the backward, back) with the tile's hidden layer
// and MLP output staying in its L2 cache: small BLAS GEMMs per tile and step, the ReLU and
// gate loops on cached rows, and no [B, H] buffer written to memory and read back per step.
// Used when one step's weights are small (they are re-read from cache by every tile) and the
// batch gives each thread a few tiles; otherwise the whole-batch path below runs: one
// threaded GEMM per layer and step. LATENTFAST_VF_TILE_ROWS (read per call, for tests and
// A/B runs) overrides the choice: 0 forces the whole-batch path, n > 0 tiles of n rows.
constexpr int64_t kTileWeightBytesMax = 1 << 20;  // per step, W1 + W2
constexpr int64_t kTileBytes = 768 << 10;         // hidden + output rows of one tile (L2: 2 MB per core here)

// Rows per tile, or 0 for the whole-batch path.
int64_t tile_rows(const Dims& n, int64_t elem) {
  if (const char* e = std::getenv("LATENTFAST_VF_TILE_ROWS"); e != nullptr && e[0] != '\0')
    return std::max<int64_t>(0, std::atoll(e));
  if ((n.H * n.d + n.O * n.H) * elem > kTileWeightBytesMax) return 0;
  // Up to 512 rows (paired A/B at B = 4096, d = 32, H = 256, K = 8: 512-row tiles 7-10%
  // faster than 128), at least two tiles per thread, at least 16 rows.
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  const int64_t rows = std::min(std::clamp<int64_t>(kTileBytes / ((n.H + n.O + 2 * n.d) * elem), 16, 512),
                                n.B / (2 * nt));
  return rows >= 16 ? rows : 0;
}

// LATENTFAST_VF_POISON=1 (read per call; for tests): the outputs the row-tile kernels write
// are filled with NaN first, so a row that no tile writes shows up as NaN.
at::Tensor poisoned(at::Tensor t) {
  const char* e = std::getenv("LATENTFAST_VF_POISON");
  if (e != nullptr && e[0] == '1' && t.numel() > 0) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// Block structure of the masked weights. A MADE mask zeroes about half of W1 and W2, and with
// the hidden units ordered by degree (made_degrees does) and the inputs in natural or reversed
// order, the zeros form staircases: a group of consecutive hidden units reads a contiguous
// range of inputs, a group of consecutive outputs a contiguous range of hidden units (a
// coupling's masks are halves). Both paths (row tiles and whole batch) find these ranges from
// the exact zeros of each step's weights (per call; at most K (H d + O H) reads, far fewer for
// dense rows) and run one GEMM per group over its range only. Products with the skipped entries are exact zeros, so the result is the dense
// one (up to summation order), for any weights: without such structure the ranges are the
// whole width and a layer runs as one GEMM. (One exception: a NaN or Inf in x or in a hidden
// unit no longer spreads through a zero weight, 0 * Inf = NaN, as it does in the dense
// product; the public wrappers reject non-finite inputs.) The weight gradients stay dense.
// LATENTFAST_VF_GROUPS (read per call; for tests and A/B runs) sets the number of groups per
// layer; 1 turns the blocking off.
constexpr int64_t kDefaultGroups = 4;  // 2-4 were best in a paired A/B (8 and 16: slower, small GEMMs)
constexpr double kBlockedMaxFraction = 0.85;  // above this share of the dense flops, one GEMM

struct Span {
  int64_t lo = 0, hi = 0;  // [lo, hi), empty when hi <= lo
  int64_t len() const { return hi > lo ? hi - lo : 0; }
  void add(int64_t a, int64_t b) {
    if (b <= a) return;
    if (len() == 0) {
      lo = a, hi = b;
    } else {
      lo = std::min(lo, a), hi = std::max(hi, b);
    }
  }
};

struct StepBlocks {
  int64_t g1 = 0, g2 = 0;        // hidden units per group (last may be short), outputs per group
  std::vector<Span> in_of_hid;   // per hidden group: the inputs its W1 rows read
  std::vector<Span> hid_of_out;  // per output group: the hidden units its W2 rows read
  std::vector<Span> out_of_hid;  // per hidden group: the outputs whose W2 rows read it
};

int64_t groups_wanted() {
  if (const char* e = std::getenv("LATENTFAST_VF_GROUPS"); e != nullptr && e[0] != '\0')
    return std::max<int64_t>(1, std::atoll(e));
  return kDefaultGroups;
}

// Nonzero column range of row r of a [rows, cols] row-major matrix.
template <typename T>
Span row_span(const T* a, int64_t cols, int64_t r) {
  const T* ar = a + r * cols;
  Span s;
  int64_t j = 0;
  while (j < cols && ar[j] == T(0)) ++j;
  if (j == cols) return s;
  int64_t e = cols;
  while (ar[e - 1] == T(0)) --e;
  s.lo = j, s.hi = e;
  return s;
}

template <typename T>
std::vector<StepBlocks> find_blocks(const Dims& n, const T* w1, const T* w2) {
  const int64_t ng = groups_wanted();
  std::vector<StepBlocks> all(n.K);
  for (int64_t k = 0; k < n.K; ++k) {
    const T* a = w1 + k * n.H * n.d;
    const T* b = w2 + k * n.O * n.H;
    StepBlocks& sb = all[k];
    sb.g1 = std::max<int64_t>(1, (n.H + ng - 1) / ng);
    sb.g2 = std::max<int64_t>(1, (n.O + ng - 1) / ng);
    const int64_t n1 = (n.H + sb.g1 - 1) / sb.g1, n2 = (n.O + sb.g2 - 1) / sb.g2;
    sb.in_of_hid.assign(n1, Span());
    sb.hid_of_out.assign(n2, Span());
    sb.out_of_hid.assign(n1, Span());
    for (int64_t h = 0; h < n.H; ++h) {
      const Span r = row_span(a, n.d, h);
      sb.in_of_hid[h / sb.g1].add(r.lo, r.hi);
    }
    for (int64_t o = 0; o < n.O; ++o) {
      const T* br = b + o * n.H;
      const Span r = row_span(b, n.H, o);
      sb.hid_of_out[o / sb.g2].add(r.lo, r.hi);
      for (int64_t j = r.lo / sb.g1; j < n1 && j * sb.g1 < r.hi; ++j) {  // hidden groups this row reads
        bool any = false;
        for (int64_t h = std::max(r.lo, j * sb.g1); h < std::min(r.hi, (j + 1) * sb.g1) && !any; ++h)
          any = br[h] != T(0);
        if (any) sb.out_of_hid[j].add(o, o + 1);
      }
    }
    // Not worth the extra GEMM calls when little is skipped: one group over the whole width.
    double f1 = 0, f2 = 0;
    for (int64_t j = 0; j < n1; ++j) f1 += double(std::min(sb.g1, n.H - j * sb.g1)) * sb.in_of_hid[j].len();
    for (int64_t i = 0; i < n2; ++i) f2 += double(std::min(sb.g2, n.O - i * sb.g2)) * sb.hid_of_out[i].len();
    if (f1 > kBlockedMaxFraction * n.H * n.d && f2 > kBlockedMaxFraction * n.O * n.H) {
      sb.g1 = n.H, sb.g2 = n.O;
      sb.in_of_hid.assign(1, Span{0, n.d});
      sb.hid_of_out.assign(1, Span{0, n.H});
      sb.out_of_hid.assign(1, Span{0, n.O});
    }
  }
  return all;
}

// Blocked products of one tile (rows of the tile, row-major buffers as in the dense calls):
// g = cur W1^T (beta 0); o += g W2^T; ga = go W2 (beta 0); gx += ga W1.
template <typename T>
void blocked_hidden(const StepBlocks& sb, int64_t rows, const Dims& n, const T* cur, const T* w1k, T* g) {
  for (size_t j = 0; j < sb.in_of_hid.size(); ++j) {
    const int64_t h0 = int64_t(j) * sb.g1, gh = std::min(sb.g1, n.H - h0);
    const Span sp = sb.in_of_hid[j];
    if (sp.len() == 0) {
      for (int64_t r = 0; r < rows; ++r) std::memset(g + r * n.H + h0, 0, sizeof(T) * gh);
      continue;
    }
    gemm_rm<T>(false, true, rows, gh, sp.len(), cur + sp.lo, n.d, w1k + h0 * n.d + sp.lo, n.d, T(0), g + h0, n.H);
  }
}

template <typename T>
void blocked_output(const StepBlocks& sb, int64_t rows, const Dims& n, const T* g, const T* w2k, T* o) {
  for (size_t i = 0; i < sb.hid_of_out.size(); ++i) {
    const int64_t o0 = int64_t(i) * sb.g2, go = std::min(sb.g2, n.O - o0);
    const Span sp = sb.hid_of_out[i];
    if (sp.len() > 0)
      gemm_rm<T>(false, true, rows, go, sp.len(), g + sp.lo, n.H, w2k + o0 * n.H + sp.lo, n.H, T(1), o + o0, n.O);
  }
}

template <typename T>
void blocked_grad_hidden(const StepBlocks& sb, int64_t rows, const Dims& n, const T* go, const T* w2k, T* ga) {
  for (size_t j = 0; j < sb.out_of_hid.size(); ++j) {
    const int64_t h0 = int64_t(j) * sb.g1, gh = std::min(sb.g1, n.H - h0);
    const Span sp = sb.out_of_hid[j];
    if (sp.len() == 0) {
      for (int64_t r = 0; r < rows; ++r) std::memset(ga + r * n.H + h0, 0, sizeof(T) * gh);
      continue;
    }
    gemm_rm<T>(false, false, rows, gh, sp.len(), go + sp.lo, n.O, w2k + sp.lo * n.H + h0, n.H, T(0), ga + h0, n.H);
  }
}

template <typename T>
void blocked_grad_input(const StepBlocks& sb, int64_t rows, const Dims& n, const T* ga, const T* w1k, T* gx) {
  for (size_t j = 0; j < sb.in_of_hid.size(); ++j) {
    const int64_t h0 = int64_t(j) * sb.g1, gh = std::min(sb.g1, n.H - h0);
    const Span sp = sb.in_of_hid[j];
    if (sp.len() > 0)
      gemm_rm<T>(false, false, rows, sp.len(), gh, ga + h0, n.H, w1k + h0 * n.d + sp.lo, n.d, T(1), gx + sp.lo, n.d);
  }
}

// The whole-batch form of one step's hidden layer and output: g = relu(x W1^T + b1 + ctx),
// o = g W2^T + b2, with the blocked GEMMs over all B rows (BLAS threads them), the bias and
// ReLU fused in one parallel pass over g. x, g, o contiguous; o may be null (hidden only).
template <typename T>
void step_params(const Dims& n, const StepBlocks& sb, const at::Tensor& x, const T* ctx_k, const T* w1k,
                 const T* b1k, const T* w2k, const T* b2k, at::Tensor& g, at::Tensor* o) {
  const int64_t B = x.size(0), H = n.H;
  T* gp = g.mutable_data_ptr<T>();
  blocked_hidden<T>(sb, B, n, x.const_data_ptr<T>(), w1k, gp);
  at::parallel_for(0, B, grain(H), [&](int64_t begin, int64_t end) {
    LF_VF_CALL(n.isa, vf_relu_rows<T>, gp, b1k, ctx_k, H, begin, end);
  });
  if (!o) return;
  T* op = o->mutable_data_ptr<T>();
  at::parallel_for(0, B, grain(n.O), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) std::memcpy(op + r * n.O, b2k, sizeof(T) * n.O);
  });
  blocked_output<T>(sb, B, n, gp, w2k, op);
}

template <typename T>
struct StackPtrs {
  const T *w1, *b1, *w2, *b2, *act, *ctx;  // ctx null without context
  const std::vector<StepBlocks>* blocks;   // per step
};

// Step k's hidden layer g = relu(xin W1^T + b1 + ctx) for the tile rows [r0, r0 + rows), and,
// when o is not null, its MLP output o = g W2^T + b2 (blocked GEMMs, single-threaded loops:
// the caller runs one tile per thread). The row-tile form of step_params.
template <typename T>
void tile_step_params(const Dims& n, const StackPtrs<T>& p, int64_t k, int64_t r0, int64_t rows, const T* xin,
                      T* g, T* o) {
  const StepBlocks& sb = (*p.blocks)[k];
  blocked_hidden<T>(sb, rows, n, xin, p.w1 + k * n.H * n.d, g);
  LF_VF_CALL(n.isa, vf_relu_rows<T>, g, p.b1 + k * n.H, p.ctx ? p.ctx + (k * n.B + r0) * n.H : nullptr, n.H, int64_t(0),
             rows);
  if (!o) return;
  const T* b2k = p.b2 + k * n.O;
  for (int64_t r = 0; r < rows; ++r) std::memcpy(o + r * n.O, b2k, sizeof(T) * n.O);
  blocked_output<T>(sb, rows, n, g, p.w2 + k * n.O * n.H, o);
}

// The forward of rows [r0, r0 + rows) through all K steps. xs/out/hid: the saved [K, B, .]
// tensors (null when not saved); logdet (zeroed by the caller) accumulates.
template <typename T>
void fwd_tile(const Dims& n, const StackPtrs<T>& p, bool additive, const T* x, T* y, T* logdet, T* xs, T* out,
              T* hid, T* gbuf, T* obuf, T* ping, T* pong, int64_t r0, int64_t rows) {
  const T* cur = x + r0 * n.d;
  if (xs) std::memcpy(xs + r0 * n.d, cur, sizeof(T) * rows * n.d);
  for (int64_t k = 0; k < n.K; ++k) {
    T* g = hid ? hid + (k * n.B + r0) * n.H : gbuf;
    T* o = out ? out + (k * n.B + r0) * n.O : obuf;
    tile_step_params<T>(n, p, k, r0, rows, cur, g, o);
    T* dst = k + 1 == n.K ? y + r0 * n.d : (xs ? xs + ((k + 1) * n.B + r0) * n.d : (k % 2 == 0 ? ping : pong));
    LF_VF_CALL(n.isa, vf_gate_fwd_rows<T>, cur, o, p.act + k * n.d, dst, logdet + r0, n.d, additive, int64_t(0), rows);
    cur = dst;
  }
}

// Column sums of rows x cols (row stride cols) added to acc.
template <typename T>
void add_col_sums(const T* a, int64_t rows, int64_t cols, T* __restrict__ acc) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict__ ar = a + r * cols;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) acc[j] += ar[j];
  }
}

// The backward of rows [r0, r0 + rows) through all K steps in reverse, as vector_flow_bwd
// below does for the whole batch. The weight and bias gradients of these rows are added to
// one chunk's accumulators (gw1 [K, H, d], gb1 [K, H], gw2 [K, O, H], gb2 [K, O]; zeroed by
// the caller and summed over the chunks after). hidden: the kept hidden layers or null
// (recomputed per tile); gctx: grad ctx [K, B, H] or null.
template <typename T>
struct BwdTileBufs {
  T *hid, *go, *ga, *gcur, *gxd;
};

template <typename T>
void bwd_tile(const Dims& n, const StackPtrs<T>& p, bool additive, const T* gy, const T* gl, const T* xs,
              const T* out, const T* hidden, T* gx, T* gctx, T* gw1, T* gb1, T* gw2, T* gb2, BwdTileBufs<T> buf,
              int64_t r0, int64_t rows) {
  T* gcur = buf.gcur;
  T* gxd = buf.gxd;
  std::memcpy(gcur, gy + r0 * n.d, sizeof(T) * rows * n.d);
  for (int64_t k = n.K - 1; k >= 0; --k) {
    const T* xk = xs + (k * n.B + r0) * n.d;
    const T* w1k = p.w1 + k * n.H * n.d;
    const T* w2k = p.w2 + k * n.O * n.H;
    const T* hk = hidden ? hidden + (k * n.B + r0) * n.H : buf.hid;
    const StepBlocks& sb = (*p.blocks)[k];
    if (!hidden) tile_step_params<T>(n, p, k, r0, rows, xk, buf.hid, static_cast<T*>(nullptr));  // hidden only
    LF_VF_CALL(n.isa, vf_gate_bwd_rows<T>, gcur, gl + r0, xk, out + (k * n.B + r0) * n.O, p.act + k * n.d, buf.go, gxd,
               n.d, additive, int64_t(0), rows);
    gemm_rm<T>(true, false, n.O, n.H, rows, buf.go, n.O, hk, n.H, T(1), gw2 + k * n.O * n.H, n.H);
    add_col_sums<T>(buf.go, rows, n.O, gb2 + k * n.O);
    T* ga = gctx ? gctx + (k * n.B + r0) * n.H : buf.ga;
    blocked_grad_hidden<T>(sb, rows, n, buf.go, w2k, ga);
    LF_VF_CALL(n.isa, vf_relu_mask_rows<T>, ga, hk, n.H, int64_t(0), rows);
    gemm_rm<T>(true, false, n.H, n.d, rows, ga, n.H, xk, n.d, T(1), gw1 + k * n.H * n.d, n.d);
    add_col_sums<T>(ga, rows, n.H, gb1 + k * n.H);
    blocked_grad_input<T>(sb, rows, n, ga, w1k, gxd);  // grad x = direct + ga W1
    std::swap(gcur, gxd);
  }
  std::memcpy(gx + r0 * n.d, gcur, sizeof(T) * rows * n.d);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> vector_flow_fwd(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& ctx_in, const at::Tensor& w1_in,
    const at::Tensor& b1_in, const at::Tensor& w2_in, const at::Tensor& b2_in, const at::Tensor& act_in,
    bool additive, bool save, bool keep_hidden) {
  const Dims n = check_stack(x_in, ctx_in, w1_in, b1_in, w2_in, b2_in, act_in, additive);
  const at::Tensor x = x_in.contiguous(), w1 = w1_in.contiguous(), b1 = b1_in.contiguous();
  const at::Tensor w2 = w2_in.contiguous(), b2 = b2_in.contiguous(), act = act_in.contiguous();
  const c10::optional<at::Tensor> ctx = ctx_in.has_value() ? c10::optional<at::Tensor>(ctx_in->contiguous())
                                                           : c10::nullopt;
  const auto opt = x.options();
  at::Tensor y = at::empty({n.B, n.d}, opt), logdet = at::zeros({n.B}, opt);
  // Kept for the backward: each step's input and MLP output (the hidden layers are recomputed).
  at::Tensor xs = save ? at::empty({n.K, n.B, n.d}, opt) : at::empty({0}, opt);
  at::Tensor out = save ? at::empty({n.K, n.B, n.O}, opt) : at::empty({0}, opt);
  // keep_hidden (with save): also each step's hidden layer [K, B, H], so the backward skips
  // recomputing it (one [B, d] x [d, H] GEMM per step) at the cost of K*B*H memory
  const bool keep = save && keep_hidden;
  at::Tensor hid_all = keep ? at::empty({n.K, n.B, n.H}, opt) : at::empty({0}, opt);
  const int64_t tile = tile_rows(n, x.element_size());
  if (tile > 0) {
    for (at::Tensor* t : {&y, &xs, &out, &hid_all}) *t = poisoned(*t);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "vector_flow_fwd_tiles", [&] {
      using T = scalar_t;
      const std::vector<StepBlocks> blocks = find_blocks<T>(n, w1.const_data_ptr<T>(), w2.const_data_ptr<T>());
      const StackPtrs<T> p{w1.const_data_ptr<T>(), b1.const_data_ptr<T>(), w2.const_data_ptr<T>(),
                           b2.const_data_ptr<T>(), act.const_data_ptr<T>(),
                           ctx.has_value() ? ctx->const_data_ptr<T>() : nullptr, &blocks};
      const int64_t ntiles = (n.B + tile - 1) / tile;
      at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
        AlignedScratch<T> gbuf(keep ? 0 : tile * n.H), obuf(save ? 0 : tile * n.O), pp(save ? 0 : 2 * tile * n.d);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t r0 = t * tile, rows = std::min(tile, n.B - r0);
          fwd_tile<T>(n, p, additive, x.const_data_ptr<T>(), y.mutable_data_ptr<T>(), logdet.mutable_data_ptr<T>(),
                      save ? xs.mutable_data_ptr<T>() : nullptr, save ? out.mutable_data_ptr<T>() : nullptr,
                      keep ? hid_all.mutable_data_ptr<T>() : nullptr, gbuf.data(), obuf.data(), pp.data(),
                      pp.data() + (save ? 0 : tile * n.d), r0, rows);
        }
      });
    });
    return {y, logdet, xs, out, hid_all};
  }
  at::Tensor g_buf = keep ? at::Tensor() : at::empty({n.B, n.H}, opt);
  at::Tensor o_buf = save ? at::Tensor() : at::empty({n.B, n.O}, opt);
  at::Tensor tmp = at::empty({n.B, n.d}, opt);
  if (save) xs[0].copy_(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "vector_flow_fwd", [&] {
    const std::vector<StepBlocks> blocks =
        find_blocks<scalar_t>(n, w1.const_data_ptr<scalar_t>(), w2.const_data_ptr<scalar_t>());
    at::Tensor cur = x;
    for (int64_t k = 0; k < n.K; ++k) {
      at::Tensor o = save ? out[k] : o_buf;
      const at::Tensor ctx_k = ctx.has_value() ? (*ctx)[k] : at::Tensor();
      at::Tensor g = keep ? hid_all[k] : g_buf;
      step_params<scalar_t>(n, blocks[k], cur, ctx.has_value() ? ctx_k.const_data_ptr<scalar_t>() : nullptr,
                            w1.const_data_ptr<scalar_t>() + k * n.H * n.d, b1.const_data_ptr<scalar_t>() + k * n.H,
                            w2.const_data_ptr<scalar_t>() + k * n.O * n.H, b2.const_data_ptr<scalar_t>() + k * n.O, g,
                            &o);
      // Ping-pong so the last step lands in y; with save, each step's output is the next input row.
      at::Tensor dst = (save && k + 1 < n.K) ? xs[k + 1] : (((n.K - 1 - k) % 2 == 0) ? y : tmp);
      const scalar_t* xp = cur.const_data_ptr<scalar_t>();
      const scalar_t* op = o.const_data_ptr<scalar_t>();
      const scalar_t* ap = act.const_data_ptr<scalar_t>() + k * n.d;
      scalar_t* dp = dst.mutable_data_ptr<scalar_t>();
      scalar_t* lp = logdet.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, n.B, grain(n.d), [&](int64_t begin, int64_t end) {
        LF_VF_CALL(n.isa, vf_gate_fwd_rows<scalar_t>, xp, op, ap, dp, lp, n.d, additive, begin, end);
      });
      cur = dst;
    }
  });
  return {y, logdet, xs, out, hid_all};
}

// Steps in reverse; per step: the hidden layer (kept by the forward, or recomputed), the gate backward, then grad W2 =
// go^T g, grad a = (go W2) * [a > 0], grad W1 = ga^T x, grad x = direct + ga W1. The
// [B, H] buffers are reused across steps, so nothing of size K*B*H is written.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> vector_flow_bwd(
    const at::Tensor& grad_y, const at::Tensor& grad_logdet, const at::Tensor& xs_in, const at::Tensor& out_in,
    const c10::optional<at::Tensor>& ctx_in, const at::Tensor& w1_in, const at::Tensor& b1_in,
    const at::Tensor& w2_in, const at::Tensor& act_in, bool additive, const c10::optional<at::Tensor>& hidden_in) {
  const at::Tensor xs = xs_in.contiguous(), out = out_in.contiguous();
  const at::Tensor w1 = w1_in.contiguous(), b1 = b1_in.contiguous(), w2 = w2_in.contiguous();
  const at::Tensor act = act_in.contiguous(), gl = grad_logdet.contiguous();
  TORCH_CHECK(xs.dim() == 3 && out.dim() == 3 && w1.dim() == 3 && w2.dim() == 3,
              "vector_flow_bwd: xs, out, w1, w2 must be rank 3");
  TORCH_CHECK(xs.scalar_type() == at::kFloat || xs.scalar_type() == at::kDouble,
              "vector_flow_bwd: float32 or float64 only");
  const int64_t K = xs.size(0), B = xs.size(1), d = xs.size(2), H = w1.size(1), O = additive ? d : 2 * d;
  constexpr const char* op = "vector_flow_bwd";
  check_arg(op, "xs", xs, {K, B, d}, xs);
  check_arg(op, "out", out, {K, B, O}, xs);
  check_arg(op, "grad_y", grad_y, {B, d}, xs);
  check_numel(op, "grad_logdet", gl, B, xs);
  check_arg(op, "w1", w1, {K, H, d}, xs);
  check_arg(op, "b1", b1, {K, H}, xs);
  check_arg(op, "w2", w2, {K, O, H}, xs);
  check_arg(op, "act", act, {K, d}, xs);
  if (ctx_in.has_value()) check_arg(op, "ctx", *ctx_in, {K, B, H}, xs);
  const c10::optional<at::Tensor> ctx = ctx_in.has_value() ? c10::optional<at::Tensor>(ctx_in->contiguous())
                                                           : c10::nullopt;
  const auto opt = xs.options();
  const bool have_hidden = hidden_in.has_value() && hidden_in->numel() > 0;
  const at::Tensor hidden = have_hidden ? hidden_in->contiguous() : at::Tensor();
  TORCH_CHECK(!have_hidden || (hidden.dim() == 3 && hidden.size(0) == K && hidden.size(1) == B &&
                               hidden.size(2) == H && hidden.scalar_type() == xs.scalar_type()),
              "vector_flow_bwd: hidden must be [K, B, H] of xs's dtype");
  const Dims n{K, B, d, H, O, isa::selected()};
  const int64_t tile = tile_rows(n, xs.element_size());
  if (tile > 0) {
    // Chunks of tiles, one per thread, each with its own weight-gradient accumulators
    // (summed after, so the result does not depend on which thread ran which chunk).
    const int64_t ntiles = (B + tile - 1) / tile;
    const int64_t nchunks = std::min<int64_t>(std::max<int64_t>(1, at::get_num_threads()), ntiles);
    const int64_t per = K * (H * d + H + O * H + O);
    at::Tensor acc = at::zeros({nchunks, per}, opt);
    at::Tensor gx = poisoned(at::empty({B, d}, opt));
    at::Tensor gctx = poisoned(ctx.has_value() ? at::empty({K, B, H}, opt) : at::empty({0}, opt));
    AT_DISPATCH_FLOATING_TYPES(xs.scalar_type(), "vector_flow_bwd_tiles", [&] {
      using T = scalar_t;
      const std::vector<StepBlocks> blocks = find_blocks<T>(n, w1.const_data_ptr<T>(), w2.const_data_ptr<T>());
      const StackPtrs<T> p{w1.const_data_ptr<T>(), b1.const_data_ptr<T>(), w2.const_data_ptr<T>(), nullptr,
                           act.const_data_ptr<T>(), ctx.has_value() ? ctx->const_data_ptr<T>() : nullptr, &blocks};
      const at::Tensor gy = grad_y.contiguous();
      const T* gyp = gy.const_data_ptr<T>();
      const T* glp = gl.const_data_ptr<T>();
      const T* xsp = xs.const_data_ptr<T>();
      const T* outp = out.const_data_ptr<T>();
      const T* hidp = have_hidden ? hidden.const_data_ptr<T>() : nullptr;
      T* gxp = gx.mutable_data_ptr<T>();
      T* gctxp = ctx.has_value() ? gctx.mutable_data_ptr<T>() : nullptr;
      T* accp = acc.mutable_data_ptr<T>();
      at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
        AlignedScratch<T> mem(tile * (2 * H + O + 2 * d));
        BwdTileBufs<T> buf{mem.data(), mem.data() + tile * H, mem.data() + tile * (H + O),
                           mem.data() + tile * (2 * H + O), mem.data() + tile * (2 * H + O + d)};
        for (int64_t c = c0; c < c1; ++c) {
          T* gw1 = accp + c * per;
          T* gb1 = gw1 + K * H * d;
          T* gw2 = gb1 + K * H;
          T* gb2 = gw2 + K * O * H;
          for (int64_t t = c * ntiles / nchunks; t < (c + 1) * ntiles / nchunks; ++t) {
            const int64_t r0 = t * tile;
            bwd_tile<T>(n, p, additive, gyp, glp, xsp, outp, hidp, gxp, gctxp, gw1, gb1, gw2, gb2, buf, r0,
                        std::min(tile, B - r0));
          }
        }
      });
    });
    const at::Tensor sums = acc.sum(0);
    int64_t off = 0;
    auto take = [&](std::initializer_list<int64_t> shape) {
      int64_t len = 1;
      for (int64_t v : shape) len *= v;
      at::Tensor t = sums.narrow(0, off, len).view(shape);
      off += len;
      return t;
    };
    at::Tensor gw1 = take({K, H, d}), gb1 = take({K, H}), gw2 = take({K, O, H}), gb2 = take({K, O});
    return {gx, gctx, gw1, gb1, gw2, gb2};
  }
  at::Tensor g = grad_y.contiguous().clone(), gxd = at::empty({B, d}, opt);
  at::Tensor hid_buf = have_hidden ? at::Tensor() : at::empty({B, H}, opt), go = at::empty({B, O}, opt);
  at::Tensor gctx = ctx.has_value() ? at::empty({K, B, H}, opt) : at::empty({0}, opt);
  at::Tensor ga_buf = ctx.has_value() ? at::Tensor() : at::empty({B, H}, opt);
  at::Tensor gw1 = at::empty({K, H, d}, opt), gb1 = at::empty({K, H}, opt);
  at::Tensor gw2 = at::empty({K, O, H}, opt), gb2 = at::empty({K, O}, opt);
  AT_DISPATCH_FLOATING_TYPES(xs.scalar_type(), "vector_flow_bwd", [&] {
    const std::vector<StepBlocks> blocks =
        find_blocks<scalar_t>(n, w1.const_data_ptr<scalar_t>(), w2.const_data_ptr<scalar_t>());
    for (int64_t k = K - 1; k >= 0; --k) {
      const scalar_t* w1k = w1.const_data_ptr<scalar_t>() + k * H * d;
      const scalar_t* w2k = w2.const_data_ptr<scalar_t>() + k * O * H;
      const at::Tensor x_k = xs[k];
      const at::Tensor ctx_k = ctx.has_value() ? (*ctx)[k] : at::Tensor();
      at::Tensor hid = have_hidden ? hidden[k] : hid_buf;
      if (!have_hidden)  // hidden layer only (no output, so no b2)
        step_params<scalar_t>(n, blocks[k], x_k, ctx.has_value() ? ctx_k.const_data_ptr<scalar_t>() : nullptr, w1k,
                              b1.const_data_ptr<scalar_t>() + k * H, w2k, nullptr, hid, nullptr);
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      const scalar_t* glp = gl.const_data_ptr<scalar_t>();
      const scalar_t* xp = x_k.const_data_ptr<scalar_t>();
      const scalar_t* op = out.const_data_ptr<scalar_t>() + k * B * O;
      const scalar_t* ap = act.const_data_ptr<scalar_t>() + k * d;
      scalar_t* gop = go.mutable_data_ptr<scalar_t>();
      scalar_t* gxp = gxd.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, B, grain(d), [&](int64_t begin, int64_t end) {
        LF_VF_CALL(n.isa, vf_gate_bwd_rows<scalar_t>, gp, glp, xp, op, ap, gop, gxp, d, additive, begin, end);
      });
      at::Tensor gw2_k = gw2[k], gb2_k = gb2[k], gw1_k = gw1[k], gb1_k = gb1[k];
      at::mm_out(gw2_k, go.t(), hid);
      at::sum_out(gb2_k, go, {0});
      at::Tensor ga = ctx.has_value() ? gctx[k] : ga_buf;
      blocked_grad_hidden<scalar_t>(blocks[k], B, n, go.const_data_ptr<scalar_t>(), w2k,
                                    ga.mutable_data_ptr<scalar_t>());
      scalar_t* gap = ga.mutable_data_ptr<scalar_t>();
      const scalar_t* hp = hid.const_data_ptr<scalar_t>();
      at::parallel_for(0, B, grain(H), [&](int64_t begin, int64_t end) {
        LF_VF_CALL(n.isa, vf_relu_mask_rows<scalar_t>, gap, hp, H, begin, end);
      });
      at::mm_out(gw1_k, ga.t(), x_k);
      at::sum_out(gb1_k, ga, {0});
      // grad x = direct + ga W1, accumulated into the direct part, which becomes the running grad
      blocked_grad_input<scalar_t>(blocks[k], B, n, ga.const_data_ptr<scalar_t>(), w1k,
                                   gxd.mutable_data_ptr<scalar_t>());
      std::swap(g, gxd);
    }
  });
  return {g, gctx, gw1, gb1, gw2, gb2};
}

// The inverse by dependency order. From the weights' zero pattern, output dimension j (act > 0)
// depends on input i (act > 0) when some hidden unit h has W1[h, i] != 0 and W2[j, h] != 0 (or,
// affine, W2[d + j, h] != 0). If that graph has no cycle, its levels (a level's dimensions
// depend only on earlier levels; act = 0 dimensions are known: x = y) solve the step exactly
// in one pass: pre-activations of the known inputs by one GEMM, then per level each output
// by dot products and each solved input folded into the pre-activations (a rank-1 update),
// about 3 H multiply-adds per row and dimension, where the fixed-point sweeps evaluate the
// whole MLP once per sweep (d sweeps for MADE). The sweeps reach the same fixed point when
// n_passes >= the number of levels, so this path is taken only then; the values differ from
// the sweeps' by rounding (the pre-activations are summed in another order).
struct SeqPlan {
  bool ok = false;
  std::vector<int32_t> order, level_end;  // solved dimensions by level; level l ends at level_end[l]
  // [lo, hi) over the hidden units, where the row loops run: per input j the nonzero span of
  // W1[:, j] (d pairs), per output o that of W2[o, :] (O pairs), per dimension j the union
  // of W2 rows j and d + j (d pairs). Products with the skipped zeros are exact zeros (see the
  // block structure above for the one exception, non-finite values); a MADE step with its
  // hidden units sorted by degree skips about half. The spans are widened to multiples of
  // kSpanAlign units (the loops' vector width: no scalar tails, which cost as much as the
  // vector body at these lengths). LATENTFAST_VF_GROUPS=1: the whole width.
  std::vector<int32_t> spans;
};

constexpr int64_t kSpanAlign = 16;

template <typename T>
std::vector<int32_t> row_spans(const Dims& n, const T* w1k, const T* w2k) {
  const bool full = groups_wanted() == 1;
  auto aligned = [&](Span r) {
    if (full) return Span{0, n.H};
    if (r.len() == 0) return Span{};
    return Span{r.lo / kSpanAlign * kSpanAlign, std::min(n.H, (r.hi + kSpanAlign - 1) / kSpanAlign * kSpanAlign)};
  };
  std::vector<int32_t> sp(static_cast<size_t>(2 * (2 * n.d + n.O)));
  AlignedScratch<T> col(n.H);
  for (int64_t j = 0; j < n.d; ++j) {
    for (int64_t h = 0; h < n.H; ++h) col.data()[h] = w1k[h * n.d + j];
    const Span r = aligned(row_span(col.data(), n.H, 0));
    sp[2 * j] = static_cast<int32_t>(r.lo), sp[2 * j + 1] = static_cast<int32_t>(r.hi);
  }
  int32_t* s2 = sp.data() + 2 * n.d;
  for (int64_t o = 0; o < n.O; ++o) {
    const Span r = aligned(row_span(w2k, n.H, o));
    s2[2 * o] = static_cast<int32_t>(r.lo), s2[2 * o + 1] = static_cast<int32_t>(r.hi);
  }
  int32_t* su = s2 + 2 * n.O;
  for (int64_t j = 0; j < n.d; ++j) {
    Span u{s2[2 * j], s2[2 * j + 1]};
    if (n.O == 2 * n.d) u.add(s2[2 * (n.d + j)], s2[2 * (n.d + j) + 1]);
    su[2 * j] = static_cast<int32_t>(u.lo), su[2 * j + 1] = static_cast<int32_t>(u.hi);
  }
  return sp;
}

template <typename T>
SeqPlan seq_plan(const Dims& n, const T* w1k, const T* w2k, const T* actk, bool additive) {
  SeqPlan plan;
  const int64_t d = n.d, H = n.H, words = (d + 63) / 64;
  std::vector<uint64_t> dep(static_cast<size_t>(d * words), 0);  // dep[j]: bitset of inputs
  std::vector<uint64_t> in_h(static_cast<size_t>(words));
  for (int64_t h = 0; h < H; ++h) {
    std::fill(in_h.begin(), in_h.end(), 0);
    bool any = false;
    for (int64_t i = 0; i < d; ++i)
      if (actk[i] > T(0) && w1k[h * d + i] != T(0)) in_h[i / 64] |= uint64_t(1) << (i % 64), any = true;
    if (!any) continue;
    for (int64_t j = 0; j < d; ++j) {
      if (!(actk[j] > T(0))) continue;
      if (w2k[j * H + h] != T(0) || (!additive && w2k[(d + j) * H + h] != T(0)))
        for (int64_t w = 0; w < words; ++w) dep[j * words + w] |= in_h[w];
    }
  }
  std::vector<uint64_t> solved(static_cast<size_t>(words), 0);
  for (int64_t i = 0; i < d; ++i)
    if (!(actk[i] > T(0))) solved[i / 64] |= uint64_t(1) << (i % 64);  // known: x = y
  std::vector<int32_t> left;
  for (int64_t j = 0; j < d; ++j)
    if (actk[j] > T(0)) left.push_back(static_cast<int32_t>(j));
  while (!left.empty()) {
    std::vector<int32_t> level, rest;
    for (const int32_t j : left) {
      bool ready = true;
      for (int64_t w = 0; w < words && ready; ++w) ready = (dep[j * words + w] & ~solved[w]) == 0;
      (ready ? level : rest).push_back(j);
    }
    if (level.empty()) return plan;  // a cycle: no order solves it
    for (const int32_t j : level) solved[j / 64] |= uint64_t(1) << (j % 64);
    plan.order.insert(plan.order.end(), level.begin(), level.end());
    plan.level_end.push_back(static_cast<int32_t>(plan.order.size()));
    left.swap(rest);
  }
  plan.spans = row_spans<T>(n, w1k, w2k);
  plan.ok = true;
  return plan;
}

// LATENTFAST_VF_SEQ_INV=0 (read per call; for tests and A/B runs): always the sweeps.
bool seq_inverse_enabled() {
  const char* e = std::getenv("LATENTFAST_VF_SEQ_INV");
  return !(e != nullptr && e[0] == '0');
}

// Per step: the plan, or none (sweeps) when the graph has a cycle, n_passes is below its
// level count, or it has a single level (a coupling: one sweep and the log-det pass are
// already two GEMM pairs, no gain).
template <typename T>
std::vector<SeqPlan> seq_plans(const Dims& n, const T* w1, const T* w2, const T* act, bool additive,
                               int64_t n_passes) {
  std::vector<SeqPlan> plans(static_cast<size_t>(n.K));
  if (!seq_inverse_enabled()) return plans;
  for (int64_t k = 0; k < n.K; ++k) {
    SeqPlan p = seq_plan<T>(n, w1 + k * n.H * n.d, w2 + k * n.O * n.H, act + k * n.d, additive);
    const int64_t levels = static_cast<int64_t>(p.level_end.size());
    if (p.ok && levels >= 2 && levels <= n_passes) plans[k] = std::move(p);
  }
  return plans;
}

// Step k of the inverse for the tile rows by its plan: cy holds the step's output y, cx gets x.
// hid, o (null, or the tile rows' places in the saved [K, B, .] tensors): the forward step at x.
template <typename T>
void seq_inv_step(const Dims& n, const StackPtrs<T>& p, const SeqPlan& plan, const T* w1t_k, bool additive, int64_t k,
                  int64_t r0, int64_t rows, const T* cy, T* cx, T* a, T* logdet, T* hid, T* o) {
  const T* ak = p.act + k * n.d;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n.d; ++j) {
      const T v = cy[r * n.d + j];
      cx[r * n.d + j] = ak[j] > T(0) ? T(0) : vf_base::vf_sanitize(v);  // known: x = y, as the sweeps give
    }
  // the known inputs' share of the pre-activations (none when the step changes every dimension, as MADE steps do)
  if (std::any_of(ak, ak + n.d, [](T v) { return !(v > T(0)); }))
    gemm_rm<T>(false, true, rows, n.H, n.d, cx, n.d, p.w1 + k * n.H * n.d, n.d, T(0), a, n.H);
  else
    std::fill(a, a + rows * n.H, T(0));
  LF_VF_CALL(n.isa, vf_bias_rows<T>, a, p.b1 + k * n.H, p.ctx ? p.ctx + (k * n.B + r0) * n.H : nullptr, n.H,
             int64_t(0), rows);
  const int64_t L = LF_ISA_SELECT(n.isa, vf_, VfLanes<T>::L);  // rows per call: the lanes of the clone's vector
  AlignedScratch<T> lanes((n.H + 3 * n.d + (hid ? n.O : 0)) * L);
  T* aT = lanes.data();
  T* oT = hid ? aT + (n.H + 3 * n.d) * L : nullptr;
  for (int64_t b0 = 0; b0 < rows; b0 += L)
    LF_VF_CALL(n.isa, vf_seq_inv_lanes<T>, aT, aT + n.H * L, aT + (n.H + n.d) * L, aT + (n.H + 2 * n.d) * L,
               a + b0 * n.H, cy + b0 * n.d, cx + b0 * n.d, logdet + r0 + b0, std::min<int64_t>(L, rows - b0), w1t_k,
               p.w2 + k * n.O * n.H, p.b2 + k * n.O, ak, plan.order.data(), plan.level_end.data(),
               static_cast<int64_t>(plan.level_end.size()), n.d, n.H, additive, plan.spans.data(), oT,
               hid ? hid + b0 * n.H : nullptr, o ? o + b0 * n.O : nullptr);
}

// Where the inverse saves the forward stack at its solution (vector_flow_inv_train): the
// [K, B, .] tensors vector_flow_fwd with save and keep_hidden gives (xs[k]: step k's input,
// out[k]: its MLP output, hid[k]: its hidden layer); all null when not saved.
template <typename T>
struct InvSave {
  T *xs = nullptr, *out = nullptr, *hid = nullptr;
};

// The inverse of rows [r0, r0 + rows): per step in reverse, n_passes fixed-point sweeps with
// the tile's rows in cache, then the forward log-det at the recovered x.
// Steps with a plan (plans[k].ok) are solved by it instead (w1t: [K, d, H], W1 transposed).
template <typename T>
void inv_tile(const Dims& n, const StackPtrs<T>& p, bool additive, int64_t n_passes, const T* y, T* x_out,
              T* logdet, T* g, T* o, T* cy, T* cx, T* scratch, int64_t r0, int64_t rows,
              const std::vector<SeqPlan>& plans, const T* w1t, InvSave<T> sv) {
  std::memcpy(cy, y + r0 * n.d, sizeof(T) * rows * n.d);
  for (int64_t k = n.K - 1; k >= 0; --k) {
    T* hid_k = sv.hid ? sv.hid + (k * n.B + r0) * n.H : nullptr;
    T* out_k = sv.out ? sv.out + (k * n.B + r0) * n.O : nullptr;
    if (plans[k].ok) {
      seq_inv_step<T>(n, p, plans[k], w1t + k * n.d * n.H, additive, k, r0, rows, cy, cx, g, logdet, hid_k, out_k);
      if (sv.xs) std::memcpy(sv.xs + (k * n.B + r0) * n.d, cx, sizeof(T) * rows * n.d);
      std::swap(cy, cx);
      continue;
    }
    const T* ak = p.act + k * n.d;
    std::memcpy(cx, cy, sizeof(T) * rows * n.d);
    for (int64_t pass = 0; pass < n_passes; ++pass) {
      tile_step_params<T>(n, p, k, r0, rows, cx, g, o);
      LF_VF_CALL(n.isa, vf_gate_inv_rows<T>, cy, o, ak, cx, n.d, additive, int64_t(0), rows);
    }
    if (!additive || sv.xs) {  // the forward step at the recovered x: its log-det (and the saved values)
      T* gk = hid_k ? hid_k : g;
      T* ok = out_k ? out_k : o;
      tile_step_params<T>(n, p, k, r0, rows, cx, gk, ok);
      if (!additive)
        LF_VF_CALL(n.isa, vf_gate_fwd_rows<T>, cx, ok, ak, scratch, logdet + r0, n.d, additive, int64_t(0), rows);
      if (sv.xs) std::memcpy(sv.xs + (k * n.B + r0) * n.d, cx, sizeof(T) * rows * n.d);
    }
    std::swap(cy, cx);
  }
  std::memcpy(x_out + r0 * n.d, cy, sizeof(T) * rows * n.d);
}

// The inverse (x, logdet) and, with save, the forward stack at x as vector_flow_fwd with save
// and keep_hidden gives it (xs, out, hidden [K, B, .]; empty otherwise): what the inverse's
// backward needs, at no more than the cost of writing it (the one-pass steps have every value
// at hand; a step solved by sweeps evaluates its MLP once more at x when additive).
using InvResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

InvResult vector_flow_inv_impl(const at::Tensor& y_in, const c10::optional<at::Tensor>& ctx_in,
                               const at::Tensor& w1_in, const at::Tensor& b1_in, const at::Tensor& w2_in,
                               const at::Tensor& b2_in, const at::Tensor& act_in, bool additive, int64_t n_passes,
                               bool save) {
  const Dims n = check_stack(y_in, ctx_in, w1_in, b1_in, w2_in, b2_in, act_in, additive);
  TORCH_CHECK(n_passes >= 1, "vector_flow_inv: n_passes must be >= 1");
  const at::Tensor w1 = w1_in.contiguous(), b1 = b1_in.contiguous(), w2 = w2_in.contiguous();
  const at::Tensor b2 = b2_in.contiguous(), act = act_in.contiguous();
  const c10::optional<at::Tensor> ctx = ctx_in.has_value() ? c10::optional<at::Tensor>(ctx_in->contiguous())
                                                           : c10::nullopt;
  const auto opt = y_in.options();
  at::Tensor xs = save ? poisoned(at::empty({n.K, n.B, n.d}, opt)) : at::empty({0}, opt);
  at::Tensor out = save ? poisoned(at::empty({n.K, n.B, n.O}, opt)) : at::empty({0}, opt);
  at::Tensor hid = save ? poisoned(at::empty({n.K, n.B, n.H}, opt)) : at::empty({0}, opt);
  int64_t tile = tile_rows(n, y_in.element_size());
  std::vector<SeqPlan> plans;
  AT_DISPATCH_FLOATING_TYPES(y_in.scalar_type(), "vector_flow_inv_plans", [&] {
    plans = seq_plans<scalar_t>(n, w1.const_data_ptr<scalar_t>(), w2.const_data_ptr<scalar_t>(),
                                act.const_data_ptr<scalar_t>(), additive, n_passes);
  });
  const bool all_seq = std::all_of(plans.begin(), plans.end(), [](const SeqPlan& q) { return q.ok; });
  // Every step by its plan: row tiles at any batch size (the plans need no whole-batch GEMMs).
  if (tile == 0 && all_seq && std::getenv("LATENTFAST_VF_TILE_ROWS") == nullptr) {
    const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
    tile = std::clamp<int64_t>((n.B + nt - 1) / nt, 1, 256);
  }
  if (tile > 0) {
    const at::Tensor y = y_in.contiguous();
    at::Tensor x_out = poisoned(at::empty({n.B, n.d}, opt)), logdet = at::zeros({n.B}, opt);
    AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "vector_flow_inv_tiles", [&] {
      using T = scalar_t;
      AlignedScratch<T> w1t;  // W1^T per step, for the steps with a plan
      if (std::any_of(plans.begin(), plans.end(), [](const SeqPlan& q) { return q.ok; })) {
        w1t.resize(n.K * n.d * n.H);
        for (int64_t k = 0; k < n.K; ++k)
          transpose_blocked(w1.const_data_ptr<T>() + k * n.H * n.d, n.H, n.d, w1t.data() + k * n.d * n.H);
      }
      const std::vector<StepBlocks> blocks = find_blocks<T>(n, w1.const_data_ptr<T>(), w2.const_data_ptr<T>());
      const StackPtrs<T> p{w1.const_data_ptr<T>(), b1.const_data_ptr<T>(), w2.const_data_ptr<T>(),
                           b2.const_data_ptr<T>(), act.const_data_ptr<T>(),
                           ctx.has_value() ? ctx->const_data_ptr<T>() : nullptr, &blocks};
      const T* yp = y.const_data_ptr<T>();
      T* xp = x_out.mutable_data_ptr<T>();
      T* lp = logdet.mutable_data_ptr<T>();
      InvSave<T> sv;
      if (save) sv = {xs.mutable_data_ptr<T>(), out.mutable_data_ptr<T>(), hid.mutable_data_ptr<T>()};
      at::parallel_for(0, (n.B + tile - 1) / tile, 1, [&](int64_t t0, int64_t t1) {
        AlignedScratch<T> mem(tile * (n.H + n.O + 3 * n.d));
        T* g = mem.data();
        T* o = g + tile * n.H;
        T* cy = o + tile * n.O;
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t r0 = t * tile;
          inv_tile<T>(n, p, additive, n_passes, yp, xp, lp, g, o, cy, cy + tile * n.d, cy + 2 * tile * n.d, r0,
                      std::min(tile, n.B - r0), plans, w1t.data(), sv);
        }
      });
    });
    return {x_out, logdet, xs, out, hid};
  }
  at::Tensor cur_y = y_in.contiguous().clone(), x = at::empty({n.B, n.d}, opt), scratch = at::empty({n.B, n.d}, opt);
  at::Tensor g = at::empty({n.B, n.H}, opt), o = at::empty({n.B, n.O}, opt), logdet = at::zeros({n.B}, opt);
  AT_DISPATCH_FLOATING_TYPES(y_in.scalar_type(), "vector_flow_inv", [&] {
    const std::vector<StepBlocks> blocks =
        find_blocks<scalar_t>(n, w1.const_data_ptr<scalar_t>(), w2.const_data_ptr<scalar_t>());
    for (int64_t k = n.K - 1; k >= 0; --k) {
      const at::Tensor ctx_k = ctx.has_value() ? (*ctx)[k] : at::Tensor();
      const scalar_t* cp = ctx.has_value() ? ctx_k.const_data_ptr<scalar_t>() : nullptr;
      const scalar_t* ap = act.const_data_ptr<scalar_t>() + k * n.d;
      const scalar_t* w1k = w1.const_data_ptr<scalar_t>() + k * n.H * n.d;
      const scalar_t* b1k = b1.const_data_ptr<scalar_t>() + k * n.H;
      const scalar_t* w2k = w2.const_data_ptr<scalar_t>() + k * n.O * n.H;
      const scalar_t* b2k = b2.const_data_ptr<scalar_t>() + k * n.O;
      x.copy_(cur_y);
      for (int64_t p = 0; p < n_passes; ++p) {
        step_params<scalar_t>(n, blocks[k], x, cp, w1k, b1k, w2k, b2k, g, &o);
        const scalar_t* yp = cur_y.const_data_ptr<scalar_t>();
        const scalar_t* op = o.const_data_ptr<scalar_t>();
        scalar_t* xp = x.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, n.B, grain(n.d), [&](int64_t begin, int64_t end) {
          LF_VF_CALL(n.isa, vf_gate_inv_rows<scalar_t>, yp, op, ap, xp, n.d, additive, begin, end);
        });
      }
      if (!additive || save) {  // the forward step at the recovered x: its log-det (and the saved values)
        at::Tensor gk = save ? hid[k] : g, ok = save ? out[k] : o;
        step_params<scalar_t>(n, blocks[k], x, cp, w1k, b1k, w2k, b2k, gk, &ok);
        if (save) xs[k].copy_(x);
        if (!additive) {
          const scalar_t* xp = x.const_data_ptr<scalar_t>();
          const scalar_t* op = ok.const_data_ptr<scalar_t>();
          scalar_t* sp = scratch.mutable_data_ptr<scalar_t>();
          scalar_t* lp = logdet.mutable_data_ptr<scalar_t>();
          at::parallel_for(0, n.B, grain(n.d), [&](int64_t begin, int64_t end) {
            LF_VF_CALL(n.isa, vf_gate_fwd_rows<scalar_t>, xp, op, ap, sp, lp, n.d, additive, begin, end);
          });
        }
      }
      std::swap(cur_y, x);
    }
  });
  return {cur_y, logdet, xs, out, hid};
}

std::tuple<at::Tensor, at::Tensor> vector_flow_inv(const at::Tensor& y, const c10::optional<at::Tensor>& ctx,
                                                   const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                                                   const at::Tensor& b2, const at::Tensor& act, bool additive,
                                                   int64_t n_passes) {
  auto r = vector_flow_inv_impl(y, ctx, w1, b1, w2, b2, act, additive, n_passes, false);
  return {std::get<0>(r), std::get<1>(r)};
}

InvResult vector_flow_inv_train(const at::Tensor& y, const c10::optional<at::Tensor>& ctx, const at::Tensor& w1,
                                const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                                const at::Tensor& act, bool additive, int64_t n_passes) {
  return vector_flow_inv_impl(y, ctx, w1, b1, w2, b2, act, additive, n_passes, true);
}


// The inverse's backward (latentfast/ops/vector_flows.py, _ImplicitInverse): from the cotangents
// grad_x [B, d] on the inverse's output x and grad_logdet [B] on its log-det, the cotangent on
// y, u = J_K^-T (... J_1^-T (grad_x + gld dld_1/dx) ...), one transposed solve per step in
// dependency order (vf_inv_grad_lanes), each block of L rows through all K steps. xs, out, hidden:
// the forward stack at x (vector_flow_fwd with save and keep_hidden). Where the Python
// fallback iterates u <- (a' - N^T u) / D (n_passes + 1 vector-Jacobian products through the
// MLP per step), this is one pass of about 3 H multiply-adds per row and dimension. The
// weight gradients are then the stack's backward with cotangents (-u, grad_logdet) (the caller
// runs vector_flow_bwd). Returns a 1-D empty tensor when a step has no dependency order with at
// most n_passes levels (a cycle, or more levels than the forward's sweeps solve exactly):
// the derivatives are then those of the sweeps the forward ran, and the caller iterates.
at::Tensor vector_flow_inv_grad(const at::Tensor& grad_x, const at::Tensor& grad_logdet, const at::Tensor& xs_in,
                                const at::Tensor& out_in, const at::Tensor& hidden_in, const at::Tensor& w1_in,
                                const at::Tensor& w2_in, const at::Tensor& act_in, bool additive, int64_t n_passes) {
  TORCH_CHECK(grad_x.dim() == 2 && grad_logdet.dim() == 1 && xs_in.dim() == 3 && out_in.dim() == 3 &&
                  hidden_in.dim() == 3 && w1_in.dim() == 3 && w2_in.dim() == 3 && act_in.dim() == 2,
              "vector_flow_inv_grad: grad_x [B, d], grad_logdet [B], xs [K, B, d], out [K, B, O], "
              "hidden [K, B, H], w1 [K, H, d], w2 [K, O, H], act [K, d]");
  const int64_t K = w1_in.size(0), B = grad_x.size(0), d = grad_x.size(1), H = w1_in.size(1);
  const int64_t O = additive ? d : 2 * d;
  TORCH_CHECK(grad_logdet.size(0) == B && w1_in.size(2) == d && w2_in.size(0) == K && w2_in.size(1) == O &&
                  w2_in.size(2) == H && act_in.size(0) == K && act_in.size(1) == d,
              "vector_flow_inv_grad: weight shapes do not match");
  TORCH_CHECK(xs_in.sizes() == at::IntArrayRef({K, B, d}) && out_in.sizes() == at::IntArrayRef({K, B, O}) &&
                  hidden_in.sizes() == at::IntArrayRef({K, B, H}),
              "vector_flow_inv_grad: xs, out, hidden must be [K, B, d], [K, B, O], [K, B, H]");
  for (const auto* t : {&grad_x, &grad_logdet, &xs_in, &out_in, &hidden_in, &w1_in, &w2_in, &act_in}) {
    TORCH_CHECK(t->device().is_cpu(), "latentfast_cpp kernels take CPU tensors");
    TORCH_CHECK(t->scalar_type() == grad_x.scalar_type(), "vector_flow_inv_grad: all tensors must share a dtype");
  }
  TORCH_CHECK(grad_x.scalar_type() == at::kFloat || grad_x.scalar_type() == at::kDouble,
              "vector_flow_inv_grad: float32 or float64 only");
  const at::Tensor w1 = w1_in.contiguous(), w2 = w2_in.contiguous(), act = act_in.contiguous();
  const Dims n{K, B, d, H, O, isa::selected()};
  std::vector<SeqPlan> plans(static_cast<size_t>(K));
  AT_DISPATCH_FLOATING_TYPES(grad_x.scalar_type(), "vector_flow_inv_grad_plans", [&] {
    for (int64_t k = 0; k < K; ++k)
      plans[k] = seq_plan<scalar_t>(n, w1.const_data_ptr<scalar_t>() + k * H * d,
                                    w2.const_data_ptr<scalar_t>() + k * O * H, act.const_data_ptr<scalar_t>() + k * d,
                                    additive);
  });
  for (const SeqPlan& q : plans)
    if (!q.ok || static_cast<int64_t>(q.level_end.size()) > n_passes) return at::empty({0}, grad_x.options());
  const at::Tensor xs = xs_in.contiguous(), out = out_in.contiguous(), hidden = hidden_in.contiguous();
  const at::Tensor gld = grad_logdet.contiguous();
  const at::Tensor gx = grad_x.contiguous();
  at::Tensor u = poisoned(at::empty({B, d}, grad_x.options()));
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "vector_flow_inv_grad", [&] {
    using T = scalar_t;
    AlignedScratch<T> w1t(K * d * H);
    for (int64_t k = 0; k < K; ++k) transpose_blocked(w1.const_data_ptr<T>() + k * H * d, H, d, w1t.data() + k * d * H);
    const T* xp = xs.const_data_ptr<T>();
    const T* op = out.const_data_ptr<T>();
    const T* hp = hidden.const_data_ptr<T>();
    const T* gp = gld.const_data_ptr<T>();
    const T* w2p = w2.const_data_ptr<T>();
    const T* ap = act.const_data_ptr<T>();
    const T* gxp = gx.const_data_ptr<T>();
    T* up = u.mutable_data_ptr<T>();
    const int64_t L = LF_ISA_SELECT(n.isa, vf_, VfLanes<T>::L);
    at::parallel_for(0, (B + L - 1) / L, 1, [&](int64_t q0, int64_t q1) {
      AlignedScratch<T> rT(H * L), hT(H * L), cfT(4 * d * L), oT(O * L), xT(d * L), aT(d * L);
      for (int64_t qb = q0; qb < q1; ++qb) {
        const int64_t b0 = qb * L, rows = std::min<int64_t>(L, B - b0);
        LF_VF_CALL(n.isa, vf_to_lanes<T>, gxp + b0 * d, d, rows, d, aT.data());  // solved in place, step by step
        for (int64_t k = 0; k < K; ++k) {
          const int64_t nl = static_cast<int64_t>(plans[k].level_end.size());
          LF_VF_CALL(n.isa, vf_inv_grad_lanes<T>, rT.data(), hT.data(), cfT.data(), oT.data(), xT.data(), aT.data(),
                     hp + (k * B + b0) * H, xp + (k * B + b0) * d, op + (k * B + b0) * O, gp + b0, rows,
                     w1t.data() + k * d * H, w2p + k * O * H, ap + k * d, plans[k].order.data(),
                     plans[k].level_end.data(), nl, d, H, additive, plans[k].spans.data());
        }
        LF_VF_CALL(n.isa, vf_from_lanes<T>, aT.data(), rows, d, up + b0 * d, d);
      }
    });
  });
  return u;
}

}  // namespace
}  // namespace latentfast

TORCH_LIBRARY_IMPL(latentfast_cpp, CPU, m) {
  m.impl("vector_flow_inv_grad", &latentfast::vector_flow_inv_grad);
  m.impl("vector_flow_fwd", &latentfast::vector_flow_fwd);
  m.impl("vector_flow_bwd", &latentfast::vector_flow_bwd);
  m.impl("vector_flow_inv", &latentfast::vector_flow_inv);
  m.impl("vector_flow_inv_train", &latentfast::vector_flow_inv_train);
}
