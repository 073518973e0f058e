// When the C++ kernels stream their outputs (non-temporal stores) or prefetch their inputs.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <unistd.h>

namespace latentfast {

// The L2 caches of the threads together: sysconf's L2 size (1 MiB when unknown) times
// at::get_num_threads().
inline int64_t l2_of_threads() {
  static const int64_t l2 = [] {
    long v = -1;
#ifdef _SC_LEVEL2_CACHE_SIZE
    v = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return v > 0 ? static_cast<int64_t>(v) : int64_t(1) << 20;
  }();
  return l2 * at::get_num_threads();
}

// A kernel option for data that does not stay in cache, read per call from the environment
// variable `name`: auto (unset, empty or "auto": bytes >= l2_of_threads()), 1 (on) or 0 (off);
// any other value raises.
inline bool beyond_cache(const char* name, int64_t bytes) {
  const char* e = std::getenv(name);
  if (e != nullptr && *e != '\0' && std::strcmp(e, "auto") != 0) {
    TORCH_CHECK(std::strcmp(e, "0") == 0 || std::strcmp(e, "1") == 0, name, " must be auto, 0 or 1, got '", e,
                "'");
    return e[0] == '1';
  }
  return bytes >= l2_of_threads();
}

// Whether a kernel that writes `bytes` of fresh output (each byte once, read by no later
// step of the same kernel) should store it with non-temporal stores. They skip the read for
// ownership and the cache, so they pay where the output cannot stay in cache for its reader
// anyway, and cost where it could: the reader then loads it from memory instead of L2/L3.
// LATENTFAST_STREAM_STORES: auto (default) streams outputs of at least the L2 caches of the
// threads together; 1 always (where the kernel has aligned full vectors to store); 0 never.
// Measured on the 2-core AVX-512 Xeon (2 MiB L2 per core), normal / streaming, paired:
// `python scripts/stream_stores.py`, Glow step [N, 48, 32, 32] with its outputs read right
// after: backward 1.29-1.52x at 6.3-25 MB of output, forward 1.03-1.07x at 6.3-12.6 MB,
// 0.88-1.02x at 0.8-3.1 MB. The standalone affine coupling (no GEMM, all memory traffic) lost
// with its outputs read after (0.67-0.89x at 0.8-9.4 MB) and keeps normal stores.
inline bool stream_stores(int64_t bytes) { return beyond_cache("LATENTFAST_STREAM_STORES", bytes); }

}  // namespace latentfast
