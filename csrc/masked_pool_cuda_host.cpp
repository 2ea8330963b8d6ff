// CUDA implementations of crformer::masked_pool / masked_pool_backward (registered in module.cpp):
// checks, allocation, device guard and stream, then the launchers of masked_pool_cuda.cu. Only c10/cuda headers are used
// (ATen/cuda/CUDAContext.h would pull in cuSPARSE/cuBLAS headers the toolkit may lack).

#include "masked_pool.h"
#include "masked_pool_cuda.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <climits>

namespace crformer {
namespace {

cuda::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::Float32;
    case at::kDouble: return cuda::DType::Float64;
    case at::kHalf: return cuda::DType::Float16;
    case at::kBFloat16: return cuda::DType::BFloat16;
    default: break;
  }
  TORCH_CHECK_VALUE(false, "masked_pool (CUDA): unsupported dtype ", t, "; use float32, float16, bfloat16 or float64");
}

}  // namespace

at::Tensor masked_pool_cuda(const at::Tensor& x, const at::Tensor& mask, c10::string_view mode_str) {
  const PoolMode mode = parse_mode(mode_str);
  check_forward(x, mask);
  const cuda::DType dtype = to_dtype(x.scalar_type());
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor m = mask.contiguous();
  at::Tensor out = x.new_empty({x.size(0), x.size(2)});
  if (out.numel() == 0) return out;
  C10_CUDA_CHECK(cuda::launch_forward(dtype, mode == PoolMode::Max, x.const_data_ptr(), m.const_data_ptr<bool>(),
                                      out.mutable_data_ptr(), x.size(0), x.size(1), x.size(2), x.stride(0),
                                      x.stride(1), x.stride(2), c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor masked_pool_backward_cuda(const at::Tensor& grad, const at::Tensor& mask, const std::optional<at::Tensor>& x,
                         c10::string_view mode_str) {
  const PoolMode mode = parse_mode(mode_str);
  check_backward(grad, mask, x, mode);
  TORCH_CHECK_VALUE(mask.size(1) < INT_MAX, "masked_pool_backward: L too large");
  const cuda::DType dtype = to_dtype(grad.scalar_type());
  c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor m = mask.contiguous();
  const at::Tensor gr = grad.contiguous();
  const int64_t B = m.size(0), L = m.size(1), C = gr.size(1);
  at::Tensor gx = gr.new_empty({B, L, C});
  if (gx.numel() == 0) return gx;
  const bool is_max = mode == PoolMode::Max;
  const at::Tensor* xt = is_max ? &*x : nullptr;
  C10_CUDA_CHECK(cuda::launch_backward(dtype, is_max, gr.const_data_ptr(), m.const_data_ptr<bool>(),
                                       xt ? xt->const_data_ptr() : nullptr, gx.mutable_data_ptr(), B, L, C,
                                       xt ? xt->stride(0) : 0, xt ? xt->stride(1) : 0, xt ? xt->stride(2) : 0,
                                       c10::cuda::getCurrentCUDAStream()));
  return gx;
}

}  // namespace crformer
