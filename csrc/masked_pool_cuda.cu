// CUDA kernels for crformer::masked_pool / masked_pool_backward (launched from
// masked_pool_cuda_host.cpp through masked_pool_cuda.h; no torch headers here, see that header).
//
// One block per (row b, tile of TC channels); the block is TC x TL threads: threadIdx.x walks the
// channels (consecutive lanes read consecutive channels of one token, so loads and stores are
// coalesced when x's channel stride is 1), threadIdx.y splits the tokens into TL interleaved
// slices. Each thread accumulates its slice in fp32 (fp64 for double); the TL partials are combined
// through shared memory. Semantics are those of masked_pool.h (rows with no valid token give 0,
// NaN propagates in max, max's gradient goes to the lowest-index arg-max).

#include "masked_pool_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

namespace crformer {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // __launch_bounds__(kThreads, 4): without the 4, ptxas caps max-backward at 32
                               // registers and spills
constexpr int64_t kMaxGridY = 65535;

// Storage type <-> accumulation type.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

struct Launch {
  dim3 grid, block;
};

// TL token slices (up to 8, no more than L needs), TC = 256 / TL channels per block.
Launch launch_config(int64_t B, int64_t L, int64_t C) {
  int tl = 1;
  while (tl < 8 && tl * 2 <= L) tl *= 2;
  const int tc = kThreads / tl;
  Launch cfg;
  cfg.block = dim3(tc, tl);
  cfg.grid = dim3(static_cast<unsigned>((C + tc - 1) / tc), static_cast<unsigned>(B < kMaxGridY ? B : kMaxGridY));
  return cfg;
}

// Number of valid tokens in row m (every thread of the block must call it).
__device__ __forceinline__ int block_count(const bool* m, int64_t L) {
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  const int n = blockDim.x * blockDim.y;
  int total = 0;
  for (int64_t base = 0; base < L; base += n) {
    const int64_t l = base + t;
    total += __syncthreads_count(l < L && m[l]);
  }
  return total;
}

// Does candidate (v, a) beat the current arg-max (best, arg)? Empty slices carry arg = INT_MAX.
// Any NaN beats a number; otherwise the larger wins; equal values (or two NaNs): the lower index.
template <typename acc_t>
__device__ __forceinline__ bool beats(acc_t v, int a, acc_t best, int arg) {
  if (a == INT_MAX) return false;
  if (arg == INT_MAX) return true;
  const bool vn = v != v, bn = best != best;
  if (vn != bn) return vn;
  if (vn || v == best) return a < arg;
  return v > best;
}

template <typename T, bool kMax>
__global__ void __launch_bounds__(kThreads, 4)
forward_kernel(const T* __restrict__ x, const bool* __restrict__ mask, T* __restrict__ out, int64_t B,
               int64_t L, int64_t C, int64_t sB, int64_t sL, int64_t sC) {
  using acc_t = typename Acc<T>::type;
  __shared__ acc_t s_val[kThreads];
  __shared__ bool s_seen[kThreads];
  const int tx = threadIdx.x, ty = threadIdx.y, TC = blockDim.x, TL = blockDim.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * TC + tx;
  const bool active = c < C;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const bool* m = mask + b * L;
    const int count = block_count(m, L);  // also the barrier before s_val is reused
    acc_t acc = acc_t(0);
    bool seen = false;
    if (active) {
      const T* xp = x + b * sB + c * sC;
      for (int64_t l = ty; l < L; l += TL) {
        if (!m[l]) continue;
        const acc_t v = to_acc(xp[l * sL]);
        if (kMax) {
          acc = (!seen || v > acc || v != v) ? v : acc;  // NaN propagates
        } else {
          acc += v;
        }
        seen = true;
      }
    }
    if (TL > 1) {
      s_val[ty * TC + tx] = acc;
      s_seen[ty * TC + tx] = seen;
      __syncthreads();
      if (ty == 0) {
        for (int s = 1; s < TL; ++s) {
          const acc_t v = s_val[s * TC + tx];
          if (kMax) {
            if (s_seen[s * TC + tx]) acc = (!seen || v > acc || v != v) ? v : acc;
            seen = seen || s_seen[s * TC + tx];
          } else {
            acc += v;
          }
        }
      }
    }
    if (ty == 0 && active) {
      acc_t r = acc_t(0);
      if (count > 0) r = kMax ? acc : acc / static_cast<acc_t>(count);
      out[b * C + c] = from_acc<T>(r);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 4)
mean_backward_kernel(const T* __restrict__ grad, const bool* __restrict__ mask, T* __restrict__ gx,
                     int64_t B, int64_t L, int64_t C) {
  using acc_t = typename Acc<T>::type;
  const int tx = threadIdx.x, ty = threadIdx.y, TC = blockDim.x, TL = blockDim.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * TC + tx;
  const T zero = from_acc<T>(acc_t(0));
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const bool* m = mask + b * L;
    const int count = block_count(m, L);
    if (c >= C) continue;
    T val = zero;
    if (count > 0) val = from_acc<T>(to_acc(grad[b * C + c]) / static_cast<acc_t>(count));
    for (int64_t l = ty; l < L; l += TL) gx[(b * L + l) * C + c] = m[l] ? val : zero;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 4)
max_backward_kernel(const T* __restrict__ grad, const bool* __restrict__ mask, const T* __restrict__ x,
                    T* __restrict__ gx, int64_t B, int64_t L, int64_t C, int64_t sB, int64_t sL, int64_t sC) {
  using acc_t = typename Acc<T>::type;
  __shared__ acc_t s_val[kThreads];
  __shared__ int s_arg[kThreads];
  const int tx = threadIdx.x, ty = threadIdx.y, TC = blockDim.x, TL = blockDim.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * TC + tx;
  const bool active = c < C;
  const T zero = from_acc<T>(acc_t(0));
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const bool* m = mask + b * L;
    acc_t best = acc_t(0);
    int arg = INT_MAX;
    if (active) {
      // Within a slice tokens come in increasing order: strict '>' keeps the lowest index, and the
      // first NaN wins over numbers.
      const T* xp = x + b * sB + c * sC;
      for (int64_t l = ty; l < L; l += TL) {
        if (!m[l]) continue;
        const acc_t v = to_acc(xp[l * sL]);
        if (arg == INT_MAX || v > best || (v != v && best == best)) {
          best = v;
          arg = static_cast<int>(l);
        }
      }
    }
    if (TL > 1) {
      __syncthreads();  // the previous row's readers of s_arg are done
      s_val[ty * TC + tx] = best;
      s_arg[ty * TC + tx] = arg;
      __syncthreads();
      if (ty == 0) {
        for (int s = 1; s < TL; ++s) {
          const acc_t v = s_val[s * TC + tx];
          const int a = s_arg[s * TC + tx];
          if (beats(v, a, best, arg)) {
            best = v;
            arg = a;
          }
        }
        s_arg[tx] = arg;  // slot (0, tx) is only ever read by this thread
      }
      __syncthreads();
      arg = s_arg[tx];
    }
    if (active) {
      const T g = grad[b * C + c];
      for (int64_t l = ty; l < L; l += TL) gx[(b * L + l) * C + c] = (l == arg) ? g : zero;
    }
  }
}

template <typename T>
cudaError_t forward_typed(bool is_max, const void* x, const bool* mask, void* out, int64_t B, int64_t L,
                          int64_t C, int64_t sB, int64_t sL, int64_t sC, cudaStream_t stream) {
  const Launch cfg = launch_config(B, L, C);
  auto kernel = is_max ? forward_kernel<T, true> : forward_kernel<T, false>;
  kernel<<<cfg.grid, cfg.block, 0, stream>>>(static_cast<const T*>(x), mask, static_cast<T*>(out), B, L, C,
                                             sB, sL, sC);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_typed(bool is_max, const void* grad, const bool* mask, const void* x, void* gx,
                           int64_t B, int64_t L, int64_t C, int64_t sB, int64_t sL, int64_t sC,
                           cudaStream_t stream) {
  const Launch cfg = launch_config(B, L, C);
  if (is_max) {
    max_backward_kernel<T><<<cfg.grid, cfg.block, 0, stream>>>(
        static_cast<const T*>(grad), mask, static_cast<const T*>(x), static_cast<T*>(gx), B, L, C, sB, sL, sC);
  } else {
    mean_backward_kernel<T><<<cfg.grid, cfg.block, 0, stream>>>(static_cast<const T*>(grad), mask,
                                                                static_cast<T*>(gx), B, L, C);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_forward(DType dtype, bool is_max, const void* x, const bool* mask, void* out, int64_t B,
                           int64_t L, int64_t C, int64_t sB, int64_t sL, int64_t sC, cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32: return forward_typed<float>(is_max, x, mask, out, B, L, C, sB, sL, sC, stream);
    case DType::Float64: return forward_typed<double>(is_max, x, mask, out, B, L, C, sB, sL, sC, stream);
    case DType::Float16: return forward_typed<__half>(is_max, x, mask, out, B, L, C, sB, sL, sC, stream);
    case DType::BFloat16:
      return forward_typed<__nv_bfloat16>(is_max, x, mask, out, B, L, C, sB, sL, sC, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_backward(DType dtype, bool is_max, const void* grad, const bool* mask, const void* x,
                            void* grad_x, int64_t B, int64_t L, int64_t C, int64_t sB, int64_t sL, int64_t sC,
                            cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32:
      return backward_typed<float>(is_max, grad, mask, x, grad_x, B, L, C, sB, sL, sC, stream);
    case DType::Float64:
      return backward_typed<double>(is_max, grad, mask, x, grad_x, B, L, C, sB, sL, sC, stream);
    case DType::Float16:
      return backward_typed<__half>(is_max, grad, mask, x, grad_x, B, L, C, sB, sL, sC, stream);
    case DType::BFloat16:
      return backward_typed<__nv_bfloat16>(is_max, grad, mask, x, grad_x, B, L, C, sB, sL, sC, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace crformer
