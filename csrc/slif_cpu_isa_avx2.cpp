// CPU sLIF kernels compiled for AVX2 (8 floats per vector instead of SSE2's 4), chosen at run
// time only on CPUs that report AVX2. The build flags stay portable (no -march=native), so a
// cached or ahead-of-time build can move between x86-64 machines. FMA is deliberately not
// enabled: without contraction both builds round every operation the same way and give
// bitwise-identical results.
#include "slif_cpu_api.h"  // every header before the target switch: only our kernels get AVX2

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2")
#include "slif_cpu_kernel.h"
#pragma GCC pop_options

namespace effst {
namespace cpu {
const KernelTable* kernels_avx2() { return &kTable; }
}  // namespace cpu
}  // namespace effst

#else

namespace effst {
namespace cpu {
const KernelTable* kernels_avx2() { return nullptr; }
}  // namespace cpu
}  // namespace effst

#endif
