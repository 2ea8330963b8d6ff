// Launchers for the masked-pooling CUDA kernels (masked_pool_cuda.cu).
//
// This interface uses plain types only, so the .cu file includes no torch headers: nvcc then compiles
// a small translation unit per GPU architecture, which keeps the build fast. Tensor checks,
// allocation, streams and the dispatcher registration live in masked_pool_cuda_host.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace crformer {
namespace cuda {

enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

// out (B x C, contiguous) = masked mean (is_max = false) or max of x (B x L x C, strides sB/sL/sC).
cudaError_t launch_forward(DType dtype, bool is_max, const void* x, const bool* mask, void* out,
                           int64_t B, int64_t L, int64_t C, int64_t sB, int64_t sL, int64_t sC,
                           cudaStream_t stream);

// grad_x (B x L x C, contiguous) from grad_out (B x C, contiguous). x is only read when is_max.
cudaError_t launch_backward(DType dtype, bool is_max, const void* grad, const bool* mask,
                            const void* x, void* grad_x, int64_t B, int64_t L, int64_t C,
                            int64_t sB, int64_t sL, int64_t sC, cudaStream_t stream);

}  // namespace cuda
}  // namespace crformer
