// Run-time choice among the per-instruction-set builds of the C++ kernel files.
//
// Kernel files written once (flows/glow_kernels.inc, flows/vector_flow_kernels.inc,
// geometry/geometry_kernels.inc, the rnn/*_kernels.inc) are compiled in several namespaces: the baseline ISA (the
// wheel-wide default, SSE2 on x86-64), AVX2+FMA and AVX-512 (F, VL, DQ, BW). An op picks one
// clone per call: the widest the CPU runs, or the one LATENTFAST_CPU_ISA names (base, avx2,
// avx512; read once per op call, for tests and A/B runs). Asking for one the CPU or this build
// lacks is an error, not a silent fallback.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define LATENTFAST_X86_CLONES 1
#endif

// The target of each clone, for `LF_TARGET_AVX2 namespace x_avx2 { ... } LF_TARGET_END`.
// The AVX-512 set is the one best() checks for.
#define LF_TARGET_AVX2 _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma\")")
#define LF_TARGET_AVX512  \
  _Pragma("GCC push_options") \
      _Pragma("GCC target(\"avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,prefer-vector-width=512\")")
#define LF_TARGET_END _Pragma("GCC pop_options")

namespace latentfast {
namespace isa {

enum class Isa { base = 0, avx2 = 1, avx512 = 2 };

inline Isa best() {
#ifdef LATENTFAST_X86_CLONES
  static const Isa b = (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw"))
                           ? Isa::avx512
                           : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? Isa::avx2 : Isa::base);
  return b;
#else
  return Isa::base;
#endif
}

inline Isa selected() {
  const char* e = std::getenv("LATENTFAST_CPU_ISA");
  if (!e || !*e) return best();
  const std::string v(e);
  if (v == "auto") return best();
  Isa want = Isa::base;
  if (v == "avx2") {
    want = Isa::avx2;
  } else if (v == "avx512") {
    want = Isa::avx512;
  } else {
    TORCH_CHECK(v == "base", "LATENTFAST_CPU_ISA must be auto, base, avx2 or avx512, got '", v, "'");
  }
  TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(best()), "LATENTFAST_CPU_ISA=", v,
              ": this CPU (or this build) does not run that instruction set");
  return want;
}

inline const char* name(Isa i) { return i == Isa::avx512 ? "avx512" : (i == Isa::avx2 ? "avx2" : "base"); }

}  // namespace isa
}  // namespace latentfast

// LF_ISA_SELECT(isa, ns_prefix, expr): the expression `expr` evaluated in the namespace
// ns_prefix##base / ##avx2 / ##avx512 that `isa` names.
#ifdef LATENTFAST_X86_CLONES
#define LF_ISA_SELECT(isa_v, P, expr)                                   \
  ((isa_v) == ::latentfast::isa::Isa::avx512 ? P##avx512::expr          \
   : (isa_v) == ::latentfast::isa::Isa::avx2 ? P##avx2::expr : P##base::expr)
#else
#define LF_ISA_SELECT(isa_v, P, expr) P##base::expr
#endif
