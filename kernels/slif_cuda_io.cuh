// 16-bit element types for the CUDA sLIF kernels: explicit round-to-nearest conversions to
// and from the float compute type (torch builds disable the implicit __half/bfloat16 ones).
// Shared by kernels/slif_cuda.cu and the CUDA kernel test, which runs the same drivers on the
// host as a reference.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "slif_recurrence.cuh"

namespace effst {
namespace slif {

template <>
EFFST_HD float load_as<float, __half>(const __half* p) { return __half2float(*p); }
template <>
EFFST_HD void store_as<float, __half>(__half* p, float v) { *p = __float2half_rn(v); }
template <>
EFFST_HD float load_as<float, __nv_bfloat16>(const __nv_bfloat16* p) { return __bfloat162float(*p); }
template <>
EFFST_HD void store_as<float, __nv_bfloat16>(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

}  // namespace slif
}  // namespace effst
