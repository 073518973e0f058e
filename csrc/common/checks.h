// Argument checks shared by the kernels' entry points.
//
// The kernels index raw pointers with sizes taken from a few "primary" arguments (x, the
// weights); every other argument must then match those sizes exactly, or a direct
// torch.ops.latentfast_cpp call with inconsistent tensors would read or write out of bounds.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>

namespace latentfast {

// t must be a CPU tensor of exactly `sizes` with like's dtype.
inline void check_arg(const char* op, const char* name, const at::Tensor& t, std::initializer_list<int64_t> sizes,
                      const at::Tensor& like) {
  const at::IntArrayRef want(sizes);
  TORCH_CHECK(t.sizes() == want, op, ": ", name, " must be ", want, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), ", expected ",
              like.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " is on ", t.device(), "; latentfast_cpp kernels take CPU tensors");
}

// t must be a CPU tensor of like's dtype with exactly `n` elements (a vector given as [n] or
// any shape of that size: the kernels read it flat).
inline void check_numel(const char* op, const char* name, const at::Tensor& t, int64_t n, const at::Tensor& like) {
  TORCH_CHECK(t.numel() == n, op, ": ", name, " must have ", n, " elements, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), ", expected ",
              like.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " is on ", t.device(), "; latentfast_cpp kernels take CPU tensors");
}

}  // namespace latentfast
