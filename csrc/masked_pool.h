// Masked language pooling over the token axis: x (B x L x C), mask (B x L bool) -> B x C.
//
// Ops (schema in module.cpp):
//   crformer::masked_pool(Tensor x, Tensor mask, str mode) -> Tensor
//   crformer::masked_pool_backward(Tensor grad_out, Tensor mask, Tensor? x, str mode) -> Tensor
//
// Semantics shared by every backend:
//   * mean: sum of valid tokens / number of valid tokens; max: max over valid tokens (NaN propagates).
//   * a row with no valid token gives 0 and a zero gradient.
//   * max backward sends the gradient to one arg-max per (row, channel): the lowest index among ties
//     (the first NaN if the row holds one). Masked tokens never receive gradient.
//   * accumulation in fp32 (fp64 for double inputs); x may have any strides; the output and the
//     input gradient are contiguous and have x's dtype.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>

namespace crformer {

enum class PoolMode : int { Mean = 0, Max = 1 };

inline PoolMode parse_mode(c10::string_view mode) {
  if (mode == "mean") return PoolMode::Mean;
  TORCH_CHECK_VALUE(mode == "max", "masked_pool: mode must be 'mean' or 'max', got '",
                    std::string(mode.data(), mode.size()), "'");
  return PoolMode::Max;
}

inline void check_mask(const at::Tensor& mask, const char* op) {
  TORCH_CHECK_VALUE(mask.dim() == 2, op, ": mask must be 2-D (B x L), got ", mask.dim(), "-D ",
                    mask.sizes());
  TORCH_CHECK_VALUE(mask.scalar_type() == at::kBool, op, ": mask must be bool, got ",
                    mask.scalar_type());
}

inline void check_forward(const at::Tensor& x, const at::Tensor& mask) {
  TORCH_CHECK_VALUE(x.dim() == 3, "masked_pool: x must be 3-D (B x L x C), got ", x.dim(), "-D ",
                    x.sizes());
  check_mask(mask, "masked_pool");
  TORCH_CHECK_VALUE(mask.size(0) == x.size(0) && mask.size(1) == x.size(1),
                    "masked_pool: mask is ", mask.size(0), " x ", mask.size(1), " but x's B x L is ",
                    x.size(0), " x ", x.size(1));
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()),
                    "masked_pool: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK_VALUE(mask.device() == x.device(), "masked_pool: mask is on ", mask.device(),
                    ", x on ", x.device());
}

// Checks grad_out (B x C) against mask (B x L) and, in max mode, x (B x L x C).
inline void check_backward(const at::Tensor& grad, const at::Tensor& mask,
                           const std::optional<at::Tensor>& x, PoolMode mode) {
  check_mask(mask, "masked_pool_backward");
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(0) == mask.size(0),
                    "masked_pool_backward: grad_out must be B x C with B = ", mask.size(0),
                    ", got ", grad.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(grad.scalar_type()),
                    "masked_pool_backward: grad_out must be floating point, got ", grad.scalar_type());
  TORCH_CHECK_VALUE(grad.device() == mask.device(), "masked_pool_backward: grad_out is on ",
                    grad.device(), ", mask on ", mask.device());
  if (mode == PoolMode::Max) {
    TORCH_CHECK_VALUE(x.has_value() && x->defined(), "masked_pool_backward: max mode needs x");
    TORCH_CHECK_VALUE(x->dim() == 3 && x->size(0) == mask.size(0) && x->size(1) == mask.size(1) &&
                          x->size(2) == grad.size(1),
                      "masked_pool_backward: x must be B x L x C = [", mask.size(0), ", ",
                      mask.size(1), ", ", grad.size(1), "], got ", x->sizes());
    TORCH_CHECK_VALUE(x->scalar_type() == grad.scalar_type(),
                      "masked_pool_backward: x dtype ", x->scalar_type(),
                      " differs from grad_out dtype ", grad.scalar_type());
    TORCH_CHECK_VALUE(x->device() == grad.device(), "masked_pool_backward: x is on ",
                      x->device(), ", grad_out on ", grad.device());
  }
}

// Tensor-level implementations, registered with the dispatcher in module.cpp (so only that file
// includes the heavy torch/library.h). Each checks its inputs.
at::Tensor masked_pool_cpu(const at::Tensor& x, const at::Tensor& mask, c10::string_view mode);
at::Tensor masked_pool_backward_cpu(const at::Tensor& grad_out, const at::Tensor& mask,
                                    const std::optional<at::Tensor>& x, c10::string_view mode);
#ifdef CRFORMER_WITH_CUDA
at::Tensor masked_pool_cuda(const at::Tensor& x, const at::Tensor& mask, c10::string_view mode);
at::Tensor masked_pool_backward_cuda(const at::Tensor& grad_out, const at::Tensor& mask,
                                     const std::optional<at::Tensor>& x, c10::string_view mode);
#endif

}  // namespace crformer
