// CPU kernels of the Glow step ops: fused ActNorm + invertible 1x1 conv (+ coupling), the
// standalone coupling, forward and backward. See glow_kernels.inc for the math.
//
// The tile kernels are compiled three times (see common/isa.h): for the baseline ISA, for
// AVX2+FMA (8-wide float vectors, 6-row micro kernels) and for AVX-512 (16-wide, 32
// registers: 12-row micro kernels); tile and vector sizes come from the clone in use.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/isa.h"
#include "common/scratch.h"
#include "common/stream.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace latentfast {
// Baseline: 16-byte vectors, the native width of SSE2 and NEON (32-byte generic vectors there
// are pairs of registers, and the 6-row micro kernel's accumulators then spilled to the stack:
// 10x slower than the AVX2 build on x86).
#define LF_VEC_BYTES 16
#define LF_GEMM_MB 6
#define LF_ISA_BASELINE 1
namespace glow_base {
#include "flows/vec_math.inc"
#include "flows/glow_kernels.inc"
}  // namespace glow_base
#undef LF_ISA_BASELINE

#undef LF_VEC_BYTES
#define LF_VEC_BYTES 32
#ifdef LATENTFAST_X86_CLONES
LF_TARGET_AVX2
namespace glow_avx2 {
#include "flows/vec_math.inc"
#include "flows/glow_kernels.inc"
}  // namespace glow_avx2
LF_TARGET_END
#undef LF_VEC_BYTES
#undef LF_GEMM_MB
#define LF_VEC_BYTES 64
#define LF_GEMM_MB 12
LF_TARGET_AVX512
namespace glow_avx512 {
#include "flows/vec_math.inc"
#include "flows/glow_kernels.inc"
}  // namespace glow_avx512
LF_TARGET_END
#endif
#undef LF_VEC_BYTES
#undef LF_GEMM_MB

namespace {

using isa::Isa;

// LATENTFAST_GLOW_PREFETCH: whether the step kernels prefetch the next macro tile's input
// rows: auto (default) when the inputs they read (`bytes`) are at least the threads' L2 caches
// together (smaller ones stay in cache, where the prefetches cost up to 6%:
// `python scripts/glow_prefetch.py --op`), 1 always, 0 never (read per call).
bool glow_prefetch(int64_t bytes) { return beyond_cache("LATENTFAST_GLOW_PREFETCH", bytes); }
#define LF_GLOW(isa_v, expr) LF_ISA_SELECT(isa_v, glow_, expr)

void check_common(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                  const c10::optional<at::Tensor>& h, int64_t mode) {
  TORCH_CHECK(x.dim() == 4, "actnorm_invconv: x must be [N, C, H, W], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1),
              "actnorm_invconv: weight must be [Co, ", x.size(1), "], got ", weight.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0),
              "actnorm_invconv: bias must be [", weight.size(0), "]");
  TORCH_CHECK(mode >= 0 && mode <= 2, "actnorm_invconv: mode must be 0, 1 or 2");
  TORCH_CHECK(x.device().is_cpu(), "latentfast_cpp kernels take CPU tensors");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && bias.scalar_type() == x.scalar_type(),
              "actnorm_invconv: dtypes of x, weight and bias differ");
  if (mode) {
    TORCH_CHECK(weight.size(0) % 2 == 0, "actnorm_invconv: coupling needs an even Co");
    TORCH_CHECK(h.has_value(), "actnorm_invconv: coupling mode needs h");
    const int64_t cb = weight.size(0) / 2;
    const int64_t hc = mode == 1 ? cb : 2 * cb;
    TORCH_CHECK(h->dim() == 4 && h->size(0) == x.size(0) && h->size(1) == hc &&
                    h->size(2) == x.size(2) && h->size(3) == x.size(3),
                "actnorm_invconv: h must be [N, ", hc, ", H, W], got ", h->sizes());
    TORCH_CHECK(h->scalar_type() == x.scalar_type(), "actnorm_invconv: dtype of h differs");
  }
}

std::tuple<at::Tensor, at::Tensor> actnorm_invconv_fwd(const at::Tensor& x_in,
                                                       const at::Tensor& weight,
                                                       const at::Tensor& bias,
                                                       const c10::optional<at::Tensor>& h_in,
                                                       int64_t mode) {
  check_common(x_in, weight, bias, h_in, mode);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor coef_t = weight.t().contiguous();
  const at::Tensor b = bias.contiguous();
  const at::Tensor h = mode ? h_in->contiguous() : at::Tensor();
  const int64_t N = x.size(0), Ci = x.size(1), Co = weight.size(0);
  const int64_t P = x.size(2) * x.size(3);
  at::Tensor y = at::empty({N, Co, x.size(2), x.size(3)}, x.options());
  at::Tensor logdet;
  const Isa cpu_isa = isa::selected();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "actnorm_invconv_fwd", [&] {
    const int64_t mac = LF_GLOW(cpu_isa, Tiles<scalar_t>::macro);
    const int64_t tiles = (P + mac - 1) / mac;
    at::Tensor part = at::empty({N, tiles}, x.options());
    const scalar_t* hp = mode ? h.const_data_ptr<scalar_t>() : nullptr;
    const bool stream = stream_stores(y.nbytes());
    const bool prefetch = glow_prefetch(x.nbytes() + (mode ? h.nbytes() : 0));
    at::parallel_for(0, N * tiles, 1, [&](int64_t begin, int64_t end) {
      LF_GLOW(cpu_isa, glow_fwd_tiles<scalar_t>(x.const_data_ptr<scalar_t>(),
                  coef_t.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), hp,
                  y.mutable_data_ptr<scalar_t>(), part.mutable_data_ptr<scalar_t>(), Ci, Co, P,
                  mode, begin, end, stream, prefetch));
    });
    logdet = part.sum(1);
  });
  return {y, logdet};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> actnorm_invconv_bwd(
    const at::Tensor& grad_y, const at::Tensor& grad_logdet, const at::Tensor& x_in,
    const at::Tensor& weight, const at::Tensor& bias, const c10::optional<at::Tensor>& h_in,
    int64_t mode, const c10::optional<at::Tensor>& y_in) {
  check_common(x_in, weight, bias, h_in, mode);
  const at::Tensor x = x_in.contiguous();
  TORCH_CHECK(grad_y.dim() == 4 && grad_y.size(0) == x.size(0) && grad_y.size(1) == weight.size(0) &&
                  grad_y.size(2) == x.size(2) && grad_y.size(3) == x.size(3),
              "actnorm_invconv_bwd: grad_y has the wrong shape");
  // grad_y is read in place where its pixels are contiguous (any sample and channel strides)
  // or all one value per sample and channel (the expanded gradient of a sum: copying it
  // contiguous wrote a whole tensor); any other layout is copied first
  const int64_t gH = grad_y.size(2), gW = grad_y.size(3);
  const bool pix_rows = (gW == 1 || grad_y.stride(3) == 1) && (gH == 1 || grad_y.stride(2) == gW);
  const bool pix_bcast = (gW == 1 || grad_y.stride(3) == 0) && (gH == 1 || grad_y.stride(2) == 0);
  const at::Tensor gy = pix_rows || pix_bcast ? grad_y : grad_y.contiguous();
  const bool gy_bcast = !pix_rows && pix_bcast;
  TORCH_CHECK(gy.scalar_type() == x.scalar_type() && gy.device() == x.device(),
              "actnorm_invconv_bwd: grad_y must have x's dtype and device");
  const at::Tensor gld = grad_logdet.contiguous();
  check_numel("actnorm_invconv_bwd", "grad_logdet", gld, x.size(0), x);
  const at::Tensor coef = weight.contiguous();
  const at::Tensor coef_t = weight.t().contiguous();
  const at::Tensor b = bias.contiguous();
  const at::Tensor h = mode ? h_in->contiguous() : at::Tensor();
  // y, the forward's output, lets mode 2 skip recomputing z_b (optional: None recomputes)
  const bool use_y = mode == 2 && y_in.has_value() && y_in->defined();
  const at::Tensor y = use_y ? y_in->contiguous() : at::Tensor();
  if (use_y)
    TORCH_CHECK(y.sizes() == gy.sizes() && y.scalar_type() == x.scalar_type() && y.device() == x.device(),
                "actnorm_invconv_bwd: y must be the forward output, shape ", gy.sizes());
  const int64_t N = x.size(0), Ci = x.size(1), Co = weight.size(0);
  const int64_t P = x.size(2) * x.size(3);
  at::Tensor gx = at::empty_like(x);
  at::Tensor gh = mode ? at::empty_like(h) : at::zeros({0}, x.options());
  at::Tensor ga, gc;
  const Isa cpu_isa = isa::selected();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "actnorm_invconv_bwd", [&] {
    const int64_t mac = LF_GLOW(cpu_isa, Tiles<scalar_t>::macro);
    const int64_t width = LF_GLOW(cpu_isa, Vec<scalar_t>::width);
    const int64_t tiles = (P + mac - 1) / mac, total = N * tiles;
    const int64_t cip = (Ci + width - 1) / width * width;
    // grad A and grad c summed in the tile loop: one accumulator per chunk of tiles (one
    // chunk per thread), added up after, so the sum does not depend on the thread schedule.
    const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total));
    at::Tensor acc = at::zeros({nchunks, Co * cip + Co}, x.options());
    const scalar_t* hp = mode ? h.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* ghp = mode ? gh.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* accp = acc.mutable_data_ptr<scalar_t>();
    const bool stream = stream_stores(gx.nbytes() + gh.nbytes());
    const bool prefetch = glow_prefetch(x.nbytes() + (gy_bcast ? 0 : gy.nbytes()) + (mode == 2 ? h.nbytes() : 0));
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        scalar_t* a = accp + c * (Co * cip + Co);
        LF_GLOW(cpu_isa, glow_bwd_tiles<scalar_t>(gy.const_data_ptr<scalar_t>(), gy.stride(0), gy.stride(1),
                    gy_bcast, gld.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                    coef.const_data_ptr<scalar_t>(), coef_t.const_data_ptr<scalar_t>(),
                    b.const_data_ptr<scalar_t>(), hp, use_y ? y.const_data_ptr<scalar_t>() : nullptr,
                    a, a + Co * cip, gx.mutable_data_ptr<scalar_t>(), ghp,
                    Ci, Co, P, mode, c * total / nchunks, (c + 1) * total / nchunks, stream, prefetch));
      }
    });
    const at::Tensor sums = acc.sum(0);
    ga = sums.narrow(0, 0, Co * cip).view({Co, cip}).narrow(1, 0, Ci).clone();  // own storage: outputs may not alias
    gc = sums.narrow(0, Co * cip, Co).clone();
  });
  return {gx, ga, gc, gh};
}

void check_coupling(const at::Tensor& x, const at::Tensor& h, bool additive) {
  TORCH_CHECK(x.dim() == 4 && h.dim() == 4, "affine_coupling: x and h must be [N, C, H, W]");
  TORCH_CHECK(x.device().is_cpu() && h.device().is_cpu(), "latentfast_cpp kernels take CPU tensors");
  const int64_t hc = additive ? x.size(1) : 2 * x.size(1);
  TORCH_CHECK(h.size(0) == x.size(0) && h.size(1) == hc && h.size(2) == x.size(2) &&
                  h.size(3) == x.size(3),
              "affine_coupling: h must be [N, ", hc, ", H, W], got ", h.sizes());
  TORCH_CHECK(h.scalar_type() == x.scalar_type(), "affine_coupling: dtypes of x and h differ");
}

std::tuple<at::Tensor, at::Tensor> affine_coupling_fwd(const at::Tensor& x_in,
                                                       const at::Tensor& h_in, bool additive,
                                                       bool inverse) {
  check_coupling(x_in, h_in, additive);
  const at::Tensor x = x_in.contiguous(), h = h_in.contiguous();
  const int64_t N = x.size(0), Cb = x.size(1), P = x.size(2) * x.size(3);
  at::Tensor y = at::empty_like(x);
  at::Tensor part = at::zeros({N, Cb}, x.options());
  const Isa cpu_isa = isa::selected();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "affine_coupling_fwd", [&] {
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(P, 1));
    at::parallel_for(0, N * Cb, grain, [&](int64_t begin, int64_t end) {
      LF_GLOW(cpu_isa, coupling_rows<scalar_t>(x.const_data_ptr<scalar_t>(),
                  h.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                  part.mutable_data_ptr<scalar_t>(), Cb, P, additive, inverse, begin, end));
    });
  });
  return {y, part.sum(1)};
}

std::tuple<at::Tensor, at::Tensor> affine_coupling_bwd(const at::Tensor& grad_y,
                                                       const at::Tensor& grad_logdet,
                                                       const at::Tensor& x_in,
                                                       const at::Tensor& h_in, bool additive,
                                                       const c10::optional<at::Tensor>& y_in) {
  check_coupling(x_in, h_in, additive);
  const at::Tensor x = x_in.contiguous(), h = h_in.contiguous();
  const at::Tensor gy = grad_y.contiguous(), gld = grad_logdet.contiguous();
  check_arg("affine_coupling_bwd", "grad_y", gy, {x.size(0), x.size(1), x.size(2), x.size(3)}, x);
  check_numel("affine_coupling_bwd", "grad_logdet", gld, x.size(0), x);
  // y, the forward's output, replaces x + shift by y / s (optional: None reads x and shift)
  const bool use_y = !additive && y_in.has_value() && y_in->defined();
  const at::Tensor y = use_y ? y_in->contiguous() : at::Tensor();
  if (use_y)
    TORCH_CHECK(y.sizes() == x.sizes() && y.scalar_type() == x.scalar_type() && y.device() == x.device(),
                "affine_coupling_bwd: y must be the forward output, shape ", x.sizes());
  const int64_t N = x.size(0), Cb = x.size(1), P = x.size(2) * x.size(3);
  at::Tensor gx = at::empty_like(x), gh = at::empty_like(h);
  const Isa cpu_isa = isa::selected();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "affine_coupling_bwd", [&] {
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(P, 1));
    at::parallel_for(0, N * Cb, grain, [&](int64_t begin, int64_t end) {
      LF_GLOW(cpu_isa, coupling_bwd_rows<scalar_t>(gy.const_data_ptr<scalar_t>(),
                  gld.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                  h.const_data_ptr<scalar_t>(), use_y ? y.const_data_ptr<scalar_t>() : nullptr,
                  gx.mutable_data_ptr<scalar_t>(),
                  gh.mutable_data_ptr<scalar_t>(), Cb, P, additive, begin, end));
    });
  });
  return {gx, gh};
}

}  // namespace
}  // namespace latentfast

TORCH_LIBRARY_IMPL(latentfast_cpp, CPU, m) {
  m.impl("actnorm_invconv_fwd", &latentfast::actnorm_invconv_fwd);
  m.impl("actnorm_invconv_bwd", &latentfast::actnorm_invconv_bwd);
  m.impl("affine_coupling_fwd", &latentfast::affine_coupling_fwd);
  m.impl("affine_coupling_bwd", &latentfast::affine_coupling_bwd);
}
