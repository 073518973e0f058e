// CPU kernels of the latent-geometry ops: the fused element-wise steps of the tangent
// propagation (activation and derivative scaling), the weighted per-point Gram that
// assembles M(z), and the curve energy/length reduction with its gradient. The GEMMs
// between these steps are issued from Python to ATen's BLAS (latentfast/ops/geometry.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/isa.h"
#include "common/scratch.h"
#ifdef LATENTFAST_X86_CLONES
#include <immintrin.h>  // rbf_rsqrt's AVX-512 estimate (geometry_kernels.inc)
#endif

namespace latentfast {
// LF_GEOM_VEC_BYTES: the clone's vector size, for the register blocking of rbf_metric_points.
#define LF_ISA_BASELINE 1
#define LF_GEOM_VEC_BYTES 16
namespace geom_base {
#include "flows/vec_math.inc"
#include "geometry/geometry_kernels.inc"
}  // namespace geom_base
#undef LF_ISA_BASELINE
#undef LF_GEOM_VEC_BYTES

// Also built for AVX2+FMA and AVX-512 (see common/isa.h); each op call picks one.
#ifdef LATENTFAST_X86_CLONES
#define LF_GEOM_VEC_BYTES 32
LF_TARGET_AVX2
namespace geom_avx2 {
#include "flows/vec_math.inc"
#include "geometry/geometry_kernels.inc"
}  // namespace geom_avx2
LF_TARGET_END
#undef LF_GEOM_VEC_BYTES
#define LF_GEOM_VEC_BYTES 64
LF_TARGET_AVX512
namespace geom_avx512 {
#include "flows/vec_math.inc"
#include "geometry/geometry_kernels.inc"
}  // namespace geom_avx512
LF_TARGET_END
#undef LF_GEOM_VEC_BYTES
#endif

namespace {

#define LF_GEOM_CALL(isa_v, fn, ...) LF_ISA_SELECT(isa_v, geom_, fn(__VA_ARGS__))

void check_cpu_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "latentfast_cpp geometry kernels take CPU tensors (", name, ")");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              name, " must be float32 or float64");
}

void mlp_act_tangent_(at::Tensor& buf, at::Tensor& deriv, int64_t n_points, int64_t n_dirs, int64_t act,
                      const c10::optional<at::Tensor>& bias_in) {
  check_cpu_float(buf, "buf");
  TORCH_CHECK(buf.dim() == 2 && buf.is_contiguous(), "mlp_act_tangent_: buf must be contiguous 2-D");
  TORCH_CHECK(buf.size(0) == n_points * (1 + n_dirs),
              "mlp_act_tangent_: buf must have n_points * (1 + n_dirs) rows");
  TORCH_CHECK(act >= 0 && act <= 4, "mlp_act_tangent_: unknown activation code ", act);
  const int64_t H = buf.size(1);
  TORCH_CHECK(deriv.is_contiguous() && deriv.dim() == 2 && deriv.size(0) == n_points && deriv.size(1) == H &&
                  deriv.scalar_type() == buf.scalar_type(),
              "mlp_act_tangent_: deriv must be a contiguous [n_points, H] tensor of buf's dtype");
  at::Tensor bias;
  if (bias_in.has_value()) {
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == H && bias_in->scalar_type() == buf.scalar_type() &&
                    bias_in->device().is_cpu(),
                "mlp_act_tangent_: bias must be a CPU [H] tensor of buf's dtype");
    bias = bias_in->contiguous();
  }
  const isa::Isa cpu_isa = isa::selected();
  AT_DISPATCH_FLOATING_TYPES(buf.scalar_type(), "mlp_act_tangent_", [&] {
    scalar_t* b = buf.mutable_data_ptr<scalar_t>();
    scalar_t* s = deriv.mutable_data_ptr<scalar_t>();
    const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    const int64_t grain = std::max<int64_t>(1, 16384 / ((1 + n_dirs) * std::max<int64_t>(H, 1)));
    at::parallel_for(0, n_points, grain, [&](int64_t begin, int64_t end) {
      LF_GEOM_CALL(cpu_isa, act_tangent_rows<scalar_t>, b, s, bp, n_points, n_dirs, H, act, begin, end);
    });
  });
}

at::Tensor weighted_gram(const at::Tensor& p, const at::Tensor& q, const c10::optional<at::Tensor>& w) {
  check_cpu_float(p, "p");
  TORCH_CHECK(p.dim() == 3 && q.sizes() == p.sizes() && q.scalar_type() == p.scalar_type(),
              "weighted_gram: p and q must be [N, d, X] of one dtype");
  const int64_t N = p.size(0), d = p.size(1), X = p.size(2);
  const at::Tensor pc = p.contiguous(), qc = q.contiguous();
  at::Tensor wc;
  if (w.has_value()) {
    TORCH_CHECK(w->dim() == 2 && w->size(0) == N && w->size(1) == X && w->scalar_type() == p.scalar_type(),
                "weighted_gram: w must be [N, X]");
    wc = w->contiguous();
  }
  at::Tensor out = at::empty({N, d, d}, p.options());
  const isa::Isa cpu_isa = isa::selected();
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "weighted_gram", [&] {
    const scalar_t* wp = wc.defined() ? wc.const_data_ptr<scalar_t>() : nullptr;
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(d * d * X, 1));
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      LF_GEOM_CALL(cpu_isa, weighted_gram_points<scalar_t>, pc.const_data_ptr<scalar_t>(),
                   qc.const_data_ptr<scalar_t>(), wp, out.mutable_data_ptr<scalar_t>(), d, X,
                   begin, end);
    });
  });
  return out;
}

namespace {

// Energy and length into new [B] tensors; with grads (either given) the gradient wrt g into
// gg, a contiguous tensor of g's shape and dtype (op: the op's name for messages).
std::tuple<at::Tensor, at::Tensor> curve_reduce_into(const char* op, const at::Tensor& g,
                                                     const c10::optional<at::Tensor>& grad_energy,
                                                     const c10::optional<at::Tensor>& grad_length, at::Tensor* gg) {
  check_cpu_float(g, "g");
  TORCH_CHECK(g.dim() == 3 && g.size(1) >= 2, op, ": g must be [B, T+1, F] with T >= 1");
  const int64_t B = g.size(0), T1 = g.size(1), F = g.size(2);
  const at::Tensor gc = g.contiguous();
  at::Tensor energy = at::empty({B}, g.options()), length = at::empty({B}, g.options());
  const bool want = grad_energy.has_value() || grad_length.has_value();
  if (want) {
    TORCH_CHECK(gg->sizes() == g.sizes() && gg->is_contiguous() && gg->scalar_type() == g.scalar_type() &&
                    gg->device().is_cpu(),
                op, ": the gradient buffer must be a contiguous CPU tensor of g's shape and dtype");
  }
  at::Tensor ge, gl;
  for (auto [src, dst] : {std::pair{&grad_energy, &ge}, std::pair{&grad_length, &gl}}) {
    if (src->has_value()) {
      TORCH_CHECK((*src)->dim() == 1 && (*src)->size(0) == B, op, ": grads must be [B]");
      *dst = (*src)->to(g.scalar_type()).contiguous();
    }
  }
  const isa::Isa cpu_isa = isa::selected();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "curve_reduce", [&] {
    const scalar_t* gep = ge.defined() ? ge.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* glp = gl.defined() ? gl.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* ggp = want ? gg->mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(T1 * F, 1));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      LF_GEOM_CALL(cpu_isa, curve_reduce_curves<scalar_t>, gc.const_data_ptr<scalar_t>(),
                   energy.mutable_data_ptr<scalar_t>(), length.mutable_data_ptr<scalar_t>(), gep,
                   glp, ggp, T1, F, begin, end);
    });
  });
  return {energy, length};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> curve_reduce(const at::Tensor& g,
                                                             const c10::optional<at::Tensor>& grad_energy,
                                                             const c10::optional<at::Tensor>& grad_length) {
  const bool want = grad_energy.has_value() || grad_length.has_value();
  at::Tensor gg = want ? at::empty(g.sizes(), g.options()) : at::empty({0}, g.options());
  auto [energy, length] = curve_reduce_into("curve_reduce", g, grad_energy, grad_length, &gg);
  return {energy, length, gg};
}

// curve_reduce with the gradient written into gg (a caller's reused buffer).
std::tuple<at::Tensor, at::Tensor> curve_reduce_grad_(at::Tensor& gg, const at::Tensor& g,
                                                      const c10::optional<at::Tensor>& grad_energy,
                                                      const c10::optional<at::Tensor>& grad_length) {
  TORCH_CHECK(grad_energy.has_value() || grad_length.has_value(),
              "curve_reduce_grad_: needs grad_energy or grad_length");
  return curve_reduce_into("curve_reduce_grad_", g, grad_energy, grad_length, &gg);
}

// The RBF network's metric term for latent dimensions d <= kRbfMaxDim (rbf_metric_points):
// out [m, d, d], added to `base` when given (a new tensor either way).
constexpr int64_t kRbfMaxDim = 7;

// The RBF network's inputs of the rbf_* ops: z [p, d], centres [K, d], lam [K], wr [D, K], all
// CPU tensors of z's dtype (messages prefixed with the op's name).
void check_rbf_network(const char* op, const at::Tensor& z, const at::Tensor& centres, const at::Tensor& lam,
                       const at::Tensor& wr) {
  check_cpu_float(z, "z");
  TORCH_CHECK(z.dim() == 2, op, ": z must be [p, d]");
  TORCH_CHECK(centres.dim() == 2 && centres.size(1) == z.size(1), op, ": centres must be [K, d]");
  TORCH_CHECK(lam.dim() == 1 && lam.size(0) == centres.size(0), op, ": lam must be [K]");
  TORCH_CHECK(wr.dim() == 2 && wr.size(1) == centres.size(0), op, ": wr must be [D, K]");
  for (const at::Tensor* t : {&centres, &lam, &wr})
    TORCH_CHECK(t->scalar_type() == z.scalar_type() && t->device().is_cpu(), op,
                ": all inputs must be CPU tensors of z's dtype");
}

// src [r, c] copied into the first c columns of a zero [r, cols] tensor (cols >= c).
at::Tensor zero_padded_cols(const at::Tensor& src, int64_t cols) {
  at::Tensor out = at::zeros({src.size(0), cols}, src.options());
  out.narrow(1, 0, src.size(1)).copy_(src);
  return out;
}

template <typename T>
void rbf_metric_run(isa::Isa cpu_isa, const at::Tensor& z, const at::Tensor& centres, const at::Tensor& lam,
                    const at::Tensor& wr, double zeta, at::Tensor& out, bool accumulate) {
  const int64_t m = z.size(0), nc = 1 + z.size(1), K = centres.size(0), D = wr.size(0);
  const int64_t Dp = LF_GEOM_CALL(cpu_isa, rbf_padded_nc<T>, nc, D);
  const at::Tensor wrT = zero_padded_cols(wr.t(), Dp);
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(K * Dp / 16, 1));
  at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
    LF_GEOM_CALL(cpu_isa, rbf_metric_points_nc<T>, nc, z.const_data_ptr<T>(), centres.const_data_ptr<T>(),
                 lam.const_data_ptr<T>(), wrT.const_data_ptr<T>(), T(zeta), out.mutable_data_ptr<T>(), K, D,
                 Dp, accumulate, begin, end);
  });
}

at::Tensor rbf_metric(const at::Tensor& z_in, const at::Tensor& centres_in, const at::Tensor& lam_in,
                      const at::Tensor& wr_in, double zeta, const c10::optional<at::Tensor>& base) {
  check_rbf_network("rbf_metric", z_in, centres_in, lam_in, wr_in);
  const int64_t m = z_in.size(0), d = z_in.size(1);
  TORCH_CHECK(d >= 1 && d <= kRbfMaxDim, "rbf_metric: latent dimension must be 1..", kRbfMaxDim, ", got ", d);
  const at::Tensor z = z_in.contiguous(), centres = centres_in.contiguous(), lam = lam_in.contiguous();
  at::Tensor out;
  if (base.has_value()) {
    TORCH_CHECK(base->dim() == 3 && base->size(0) == m && base->size(1) == d && base->size(2) == d &&
                    base->scalar_type() == z.scalar_type() && base->device().is_cpu(),
                "rbf_metric: base must be [m, d, d] of z's dtype");
    out = base->contiguous().clone();
  } else {
    out = at::empty({m, d, d}, z.options());
  }
  const bool accumulate = base.has_value();
  const isa::Isa cpu_isa = isa::selected();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "rbf_metric", [&] {
    rbf_metric_run<scalar_t>(cpu_isa, z, centres, lam, wr_in, zeta, out, accumulate);
  });
  return out;
}

// out [p, D] (rows may be strided, columns contiguous) = (wr v(z) + zeta)^-1/2, the RBF
// variance network's sigma, without the [p, D] product of a separate GEMM, add and rsqrt.
void rbf_sigma_(at::Tensor& out, const at::Tensor& z_in, const at::Tensor& centres_in, const at::Tensor& lam_in,
                const at::Tensor& wr_in, double zeta) {
  check_rbf_network("rbf_sigma_", z_in, centres_in, lam_in, wr_in);
  const int64_t p = z_in.size(0), d = z_in.size(1), K = centres_in.size(0), D = wr_in.size(0);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == p && out.size(1) == D && (D <= 1 || out.stride(1) == 1) &&
                  out.stride(0) >= D && out.scalar_type() == z_in.scalar_type() && out.device().is_cpu(),
              "rbf_sigma_: out must be a [p, D] CPU view with contiguous rows of z's dtype");
  const at::Tensor z = z_in.contiguous(), centres_t = centres_in.t().contiguous(), lam = lam_in.contiguous();
  const isa::Isa cpu_isa = isa::selected();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "rbf_sigma_", [&] {
    const int64_t Dp = LF_GEOM_CALL(cpu_isa, rbf_padded_nc<scalar_t>, 1, D);
    const at::Tensor wrT = zero_padded_cols(wr_in.t(), Dp);
    const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(K * Dp / 16, 1));
    at::parallel_for(0, p, grain, [&](int64_t begin, int64_t end) {
      LF_GEOM_CALL(cpu_isa, rbf_sigma_points<scalar_t>, z.const_data_ptr<scalar_t>(),
                   centres_t.const_data_ptr<scalar_t>(), lam.const_data_ptr<scalar_t>(),
                   wrT.const_data_ptr<scalar_t>(), scalar_t(zeta), out.mutable_data_ptr<scalar_t>(), out.stride(0),
                   d, K, D, Dp, begin, end);
    });
  });
}

// gz [p, d] += the gradient through rbf_sigma_'s sigmas: sigma and grad_sigma are [p, D]
// (rows may be strided, columns contiguous), z [p, d] the points (see rbf_sigma_bwd_points).
void rbf_sigma_backward_(at::Tensor& gz, const at::Tensor& sigma, const at::Tensor& grad_sigma,
                         const at::Tensor& z_in, const at::Tensor& centres_in, const at::Tensor& lam_in,
                         const at::Tensor& wr_in) {
  check_rbf_network("rbf_sigma_backward_", z_in, centres_in, lam_in, wr_in);
  const int64_t p = z_in.size(0), d = z_in.size(1), K = centres_in.size(0), D = wr_in.size(0);
  for (const at::Tensor* t : {&sigma, &grad_sigma})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == p && t->size(1) == D && (D <= 1 || t->stride(1) == 1) &&
                    t->scalar_type() == z_in.scalar_type() && t->device().is_cpu(),
                "rbf_sigma_backward_: sigma and grad_sigma must be [p, D] CPU views with contiguous rows");
  TORCH_CHECK(gz.dim() == 2 && gz.size(0) == p && gz.size(1) == d && gz.is_contiguous() &&
                  gz.scalar_type() == z_in.scalar_type() && gz.device().is_cpu(),
              "rbf_sigma_backward_: gz must be a contiguous [p, d] CPU tensor");
  const at::Tensor z = z_in.contiguous(), centres_t = centres_in.t().contiguous(), lam = lam_in.contiguous();
  const isa::Isa cpu_isa = isa::selected();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "rbf_sigma_backward_", [&] {
    const int64_t kb = LF_GEOM_CALL(cpu_isa, rbf_kblock<scalar_t>);
    const int64_t Kp = (K + kb - 1) / kb * kb;
    const at::Tensor wrp = zero_padded_cols(wr_in, Kp);
    const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(Kp * D / 16, 1));
    at::parallel_for(0, p, grain, [&](int64_t begin, int64_t end) {
      LF_GEOM_CALL(cpu_isa, rbf_sigma_bwd_points<scalar_t>, sigma.const_data_ptr<scalar_t>(), sigma.stride(0),
                   grad_sigma.const_data_ptr<scalar_t>(), grad_sigma.stride(0), z.const_data_ptr<scalar_t>(),
                   centres_t.const_data_ptr<scalar_t>(), lam.const_data_ptr<scalar_t>(),
                   wrp.const_data_ptr<scalar_t>(), gz.mutable_data_ptr<scalar_t>(), d, K, Kp, D, begin, end);
    });
  });
}

// One chunk of latentfast/ops/geometry.py's _curve_native in one call, for few points: the
// MLP forward (a GEMM and mlp_act_tangent_ per layer), the RBF sigmas beside the outputs
// (rbf_sigma_), the energy / length reduction, and, given grad_energy or grad_length, the
// backward to the curve points (_features_backward: a GEMM and a product per layer, the
// first layer's narrow operand stored transposed, then rbf_sigma_backward_). The same
// operations in the same order as that path, which issues them one by one from Python: for
// a curve of 33 points its ~40 operator calls cost several times their arithmetic. weights
// and biases are the layers _energy_layers gives (a linear last layer may be R of its QR).
// Returns (energy [B], length [B], grad [B, T+1, d], or [0] without grads).
std::tuple<at::Tensor, at::Tensor, at::Tensor> curve_energy_small(
    const at::Tensor& curves, at::TensorList weights, at::TensorList biases, at::IntArrayRef acts,
    const c10::optional<at::Tensor>& centres, const c10::optional<at::Tensor>& lam,
    const c10::optional<at::Tensor>& wr, double zeta, const c10::optional<at::Tensor>& grad_energy,
    const c10::optional<at::Tensor>& grad_length) {
  const char* op = "curve_energy_small";
  check_cpu_float(curves, "curves");
  TORCH_CHECK(curves.dim() == 3 && curves.size(1) >= 2, op, ": curves must be [B, T+1, d] with T >= 1");
  const int64_t n_layers = static_cast<int64_t>(weights.size());
  TORCH_CHECK(n_layers >= 1 && static_cast<int64_t>(biases.size()) == n_layers &&
                  static_cast<int64_t>(acts.size()) == n_layers,
              op, ": need one weight, bias and activation per layer");
  const bool rbf = centres.has_value();
  TORCH_CHECK(rbf == lam.has_value() && rbf == wr.has_value(), op, ": centres, lam and wr go together");
  const int64_t b = curves.size(0), t1 = curves.size(1), d = curves.size(2), p = b * t1;
  const at::Tensor zf = curves.reshape({p, d}).contiguous();
  std::vector<at::Tensor> derivs;
  at::Tensor h = zf;
  for (int64_t li = 0; li < n_layers; ++li) {
    const at::Tensor& w = weights[li];
    TORCH_CHECK(w.dim() == 2 && w.size(1) == h.size(1) && w.scalar_type() == curves.scalar_type() &&
                    w.device().is_cpu(),
                op, ": weights[", li, "] must be a CPU [out, ", h.size(1), "] tensor of the curves' dtype");
    at::Tensor a = at::mm(h, w.t());
    at::Tensor dv = at::empty_like(a);
    mlp_act_tangent_(a, dv, p, 0, acts[li], biases[li]);
    derivs.push_back(dv);
    h = a;
  }
  const int64_t n_out = h.size(1);
  at::Tensor feats = h;
  if (rbf) {
    const int64_t D = wr->size(0);
    feats = at::empty({p, n_out + D}, h.options());
    feats.narrow(1, 0, n_out).copy_(h);
    at::Tensor sigma = feats.narrow(1, n_out, D);
    rbf_sigma_(sigma, zf, *centres, *lam, *wr, zeta);
  }
  const int64_t F = feats.size(1);
  const bool want = grad_energy.has_value() || grad_length.has_value();
  at::Tensor gg = at::empty(want ? at::IntArrayRef{b, t1, F} : at::IntArrayRef{0}, feats.options());
  auto [energy, length] = curve_reduce_into(op, feats.view({b, t1, F}), grad_energy, grad_length, &gg);
  if (!want) return {energy, length, at::empty({0}, curves.options())};
  const at::Tensor g2 = gg.view({p, F});
  at::Tensor ga = at::mul(g2.narrow(1, 0, n_out), derivs.back());
  at::Tensor gz;
  for (int64_t li = n_layers - 1; li >= 0; --li) {
    at::Tensor w = weights[li];
    if (li == 0 && w.size(1) < 16) w = w.t().contiguous().t();  // (see _NARROW_B in ops/geometry.py)
    gz = at::mm(ga, w);
    if (li > 0) ga = gz.mul_(derivs[li - 1]);
  }
  if (rbf) {
    const int64_t D = wr->size(0);
    rbf_sigma_backward_(gz, feats.narrow(1, n_out, D), g2.narrow(1, n_out, D), zf, *centres, *lam, *wr);
  }
  return {energy, length, gz.view({b, t1, d})};
}

}  // namespace
}  // namespace latentfast

TORCH_LIBRARY_IMPL(latentfast_cpp, CPU, m) {
  m.impl("rbf_sigma_backward_", &latentfast::rbf_sigma_backward_);
  m.impl("rbf_sigma_", &latentfast::rbf_sigma_);
  m.impl("rbf_metric", &latentfast::rbf_metric);
  m.impl("mlp_act_tangent_", &latentfast::mlp_act_tangent_);
  m.impl("weighted_gram", &latentfast::weighted_gram);
  m.impl("curve_reduce", &latentfast::curve_reduce);
  m.impl("curve_reduce_grad_", &latentfast::curve_reduce_grad_);
  m.impl("curve_energy_small", &latentfast::curve_energy_small);
}
