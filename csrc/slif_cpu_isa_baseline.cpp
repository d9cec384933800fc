// CPU sLIF kernels for the compiler's baseline instruction set (runs on any CPU of the target).
#include "slif_cpu_api.h"

#include "slif_cpu_kernel.h"

namespace effst {
namespace cpu {

const KernelTable* kernels_baseline() { return &kTable; }

}  // namespace cpu
}  // namespace effst
