// CPU kernels of the vector flow stack (K masked-MLP flow steps on [B, d] latent vectors):
// forward (optionally keeping what the backward needs), backward to x and to the per-step
// pre-activations and outputs, and the inverse by fixed-point sweeps. Per step: two ATen
// GEMMs over the whole batch and fused row loops for the ReLU and the gated update (the
// loops eager PyTorch spends most of its time in). The weight gradients are batched GEMMs
// over the steps, done by the caller (latentfast/ops/vector_flows.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace latentfast {
namespace vf_base {
#include "flows/vec_math.inc"
#include "flows/vector_flow_kernels.inc"
}  // namespace vf_base

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define LATENTFAST_VF_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace vf_avx2 {
#include "flows/vec_math.inc"
#include "flows/vector_flow_kernels.inc"
}  // namespace vf_avx2
#pragma GCC pop_options
#endif

namespace {

bool vf_use_avx2() {
#ifdef LATENTFAST_VF_AVX2
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

#ifdef LATENTFAST_VF_AVX2
#define LF_VF_CALL(fn, ...) (vf_use_avx2() ? vf_avx2::fn(__VA_ARGS__) : vf_base::fn(__VA_ARGS__))
#else
#define LF_VF_CALL(fn, ...) vf_base::fn(__VA_ARGS__)
#endif

int64_t grain(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)); }

struct Dims {
  int64_t K, B, d, H, O;
};

Dims check_stack(const at::Tensor& x, const c10::optional<at::Tensor>& ctx, const at::Tensor& w1,
                 const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& act,
                 bool additive) {
  TORCH_CHECK(x.dim() == 2 && w1.dim() == 3 && w2.dim() == 3 && b1.dim() == 2 && b2.dim() == 2 && act.dim() == 2,
              "vector_flow_stack: x [B, d], w1 [K, H, d], b1 [K, H], w2 [K, O, H], b2 [K, O], act [K, d]");
  Dims n{w1.size(0), x.size(0), x.size(1), w1.size(1), w2.size(1)};
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
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "vector_flow_stack: float32 or float64 only");
  return n;
}

// One step's hidden layer and output: g = relu(x W1^T + b1 + ctx), o = g W2^T + b2 (the bias
// and ReLU fused in one pass over g).
template <typename scalar_t>
void step_params(const at::Tensor& x, const at::Tensor* ctx_k, const at::Tensor& w1, const at::Tensor& b1,
                 const at::Tensor& w2, const at::Tensor& b2, at::Tensor& g, at::Tensor* o, int64_t H) {
  at::mm_out(g, x, w1.t());
  scalar_t* gp = g.mutable_data_ptr<scalar_t>();
  const scalar_t* bp = b1.const_data_ptr<scalar_t>();
  const scalar_t* cp = ctx_k ? ctx_k->const_data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, x.size(0), grain(H), [&](int64_t begin, int64_t end) {
    LF_VF_CALL(vf_relu_rows<scalar_t>, gp, bp, cp, H, begin, end);
  });
  if (o) at::addmm_out(*o, b2, g, w2.t());
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
  at::Tensor g_buf = keep ? at::Tensor() : at::empty({n.B, n.H}, opt);
  at::Tensor o_buf = save ? at::Tensor() : at::empty({n.B, n.O}, opt);
  at::Tensor tmp = at::empty({n.B, n.d}, opt);
  if (save) xs[0].copy_(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "vector_flow_fwd", [&] {
    at::Tensor cur = x;
    for (int64_t k = 0; k < n.K; ++k) {
      at::Tensor o = save ? out[k] : o_buf;
      const at::Tensor ctx_k = ctx.has_value() ? (*ctx)[k] : at::Tensor();
      at::Tensor g = keep ? hid_all[k] : g_buf;
      step_params<scalar_t>(cur, ctx.has_value() ? &ctx_k : nullptr, w1[k], b1[k], w2[k], b2[k], g, &o, n.H);
      // Ping-pong so the last step lands in y; with save, each step's output is the next input row.
      at::Tensor dst = (save && k + 1 < n.K) ? xs[k + 1] : (((n.K - 1 - k) % 2 == 0) ? y : tmp);
      const scalar_t* xp = cur.const_data_ptr<scalar_t>();
      const scalar_t* op = o.const_data_ptr<scalar_t>();
      const scalar_t* ap = act.const_data_ptr<scalar_t>() + k * n.d;
      scalar_t* dp = dst.mutable_data_ptr<scalar_t>();
      scalar_t* lp = logdet.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, n.B, grain(n.d), [&](int64_t begin, int64_t end) {
        LF_VF_CALL(vf_gate_fwd_rows<scalar_t>, xp, op, ap, dp, lp, n.d, additive, begin, end);
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
  const int64_t K = xs.size(0), B = xs.size(1), d = xs.size(2), H = w1.size(1), O = out.size(2);
  TORCH_CHECK(grad_y.size(0) == B && grad_y.size(1) == d && gl.numel() == B, "vector_flow_bwd: grad shapes");
  const c10::optional<at::Tensor> ctx = ctx_in.has_value() ? c10::optional<at::Tensor>(ctx_in->contiguous())
                                                           : c10::nullopt;
  const auto opt = xs.options();
  at::Tensor g = grad_y.contiguous().clone(), gxd = at::empty({B, d}, opt);
  const bool have_hidden = hidden_in.has_value() && hidden_in->numel() > 0;
  const at::Tensor hidden = have_hidden ? hidden_in->contiguous() : at::Tensor();
  TORCH_CHECK(!have_hidden || (hidden.dim() == 3 && hidden.size(0) == K && hidden.size(1) == B &&
                               hidden.size(2) == H && hidden.scalar_type() == xs.scalar_type()),
              "vector_flow_bwd: hidden must be [K, B, H] of xs's dtype");
  at::Tensor hid_buf = have_hidden ? at::Tensor() : at::empty({B, H}, opt), go = at::empty({B, O}, opt);
  at::Tensor gctx = ctx.has_value() ? at::empty({K, B, H}, opt) : at::empty({0}, opt);
  at::Tensor ga_buf = ctx.has_value() ? at::Tensor() : at::empty({B, H}, opt);
  at::Tensor gw1 = at::empty({K, H, d}, opt), gb1 = at::empty({K, H}, opt);
  at::Tensor gw2 = at::empty({K, O, H}, opt), gb2 = at::empty({K, O}, opt);
  AT_DISPATCH_FLOATING_TYPES(xs.scalar_type(), "vector_flow_bwd", [&] {
    for (int64_t k = K - 1; k >= 0; --k) {
      const at::Tensor x_k = xs[k];
      const at::Tensor ctx_k = ctx.has_value() ? (*ctx)[k] : at::Tensor();
      at::Tensor hid = have_hidden ? hidden[k] : hid_buf;
      if (!have_hidden)
        step_params<scalar_t>(x_k, ctx.has_value() ? &ctx_k : nullptr, w1[k], b1[k], w2[k], at::Tensor(), hid,
                              nullptr, H);  // hidden layer only (no output, so no b2)
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      const scalar_t* glp = gl.const_data_ptr<scalar_t>();
      const scalar_t* xp = x_k.const_data_ptr<scalar_t>();
      const scalar_t* op = out.const_data_ptr<scalar_t>() + k * B * O;
      const scalar_t* ap = act.const_data_ptr<scalar_t>() + k * d;
      scalar_t* gop = go.mutable_data_ptr<scalar_t>();
      scalar_t* gxp = gxd.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, B, grain(d), [&](int64_t begin, int64_t end) {
        LF_VF_CALL(vf_gate_bwd_rows<scalar_t>, gp, glp, xp, op, ap, gop, gxp, d, additive, begin, end);
      });
      at::Tensor gw2_k = gw2[k], gb2_k = gb2[k], gw1_k = gw1[k], gb1_k = gb1[k];
      at::mm_out(gw2_k, go.t(), hid);
      at::sum_out(gb2_k, go, {0});
      at::Tensor ga = ctx.has_value() ? gctx[k] : ga_buf;
      at::mm_out(ga, go, w2[k]);
      scalar_t* gap = ga.mutable_data_ptr<scalar_t>();
      const scalar_t* hp = hid.const_data_ptr<scalar_t>();
      at::parallel_for(0, B, grain(H), [&](int64_t begin, int64_t end) {
        LF_VF_CALL(vf_relu_mask_rows<scalar_t>, gap, hp, H, begin, end);
      });
      at::mm_out(gw1_k, ga.t(), x_k);
      at::sum_out(gb1_k, ga, {0});
      at::addmm_out(g, gxd, ga, w1[k]);
    }
  });
  return {g, gctx, gw1, gb1, gw2, gb2};
}

std::tuple<at::Tensor, at::Tensor> vector_flow_inv(const at::Tensor& y_in, const c10::optional<at::Tensor>& ctx_in,
                                                   const at::Tensor& w1_in, const at::Tensor& b1_in,
                                                   const at::Tensor& w2_in, const at::Tensor& b2_in,
                                                   const at::Tensor& act_in, bool additive, int64_t n_passes) {
  const Dims n = check_stack(y_in, ctx_in, w1_in, b1_in, w2_in, b2_in, act_in, additive);
  TORCH_CHECK(n_passes >= 1, "vector_flow_inv: n_passes must be >= 1");
  const at::Tensor w1 = w1_in.contiguous(), b1 = b1_in.contiguous(), w2 = w2_in.contiguous();
  const at::Tensor b2 = b2_in.contiguous(), act = act_in.contiguous();
  const c10::optional<at::Tensor> ctx = ctx_in.has_value() ? c10::optional<at::Tensor>(ctx_in->contiguous())
                                                           : c10::nullopt;
  const auto opt = y_in.options();
  at::Tensor cur_y = y_in.contiguous().clone(), x = at::empty({n.B, n.d}, opt), scratch = at::empty({n.B, n.d}, opt);
  at::Tensor g = at::empty({n.B, n.H}, opt), o = at::empty({n.B, n.O}, opt), logdet = at::zeros({n.B}, opt);
  AT_DISPATCH_FLOATING_TYPES(y_in.scalar_type(), "vector_flow_inv", [&] {
    for (int64_t k = n.K - 1; k >= 0; --k) {
      const at::Tensor ctx_k = ctx.has_value() ? (*ctx)[k] : at::Tensor();
      const at::Tensor* cp = ctx.has_value() ? &ctx_k : nullptr;
      const scalar_t* ap = act.const_data_ptr<scalar_t>() + k * n.d;
      x.copy_(cur_y);
      for (int64_t p = 0; p < n_passes; ++p) {
        step_params<scalar_t>(x, cp, w1[k], b1[k], w2[k], b2[k], g, &o, n.H);
        const scalar_t* yp = cur_y.const_data_ptr<scalar_t>();
        const scalar_t* op = o.const_data_ptr<scalar_t>();
        scalar_t* xp = x.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, n.B, grain(n.d), [&](int64_t begin, int64_t end) {
          LF_VF_CALL(vf_gate_inv_rows<scalar_t>, yp, op, ap, xp, n.d, additive, begin, end);
        });
      }
      if (!additive) {  // log-det of the forward step at the recovered x
        step_params<scalar_t>(x, cp, w1[k], b1[k], w2[k], b2[k], g, &o, n.H);
        const scalar_t* xp = x.const_data_ptr<scalar_t>();
        const scalar_t* op = o.const_data_ptr<scalar_t>();
        scalar_t* sp = scratch.mutable_data_ptr<scalar_t>();
        scalar_t* lp = logdet.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, n.B, grain(n.d), [&](int64_t begin, int64_t end) {
          LF_VF_CALL(vf_gate_fwd_rows<scalar_t>, xp, op, ap, sp, lp, n.d, additive, begin, end);
        });
      }
      std::swap(cur_y, x);
    }
  });
  return {cur_y, logdet};
}

}  // namespace
}  // namespace latentfast

TORCH_LIBRARY_IMPL(latentfast_cpp, CPU, m) {
  m.impl("vector_flow_fwd", &latentfast::vector_flow_fwd);
  m.impl("vector_flow_bwd", &latentfast::vector_flow_bwd);
  m.impl("vector_flow_inv", &latentfast::vector_flow_inv);
}
