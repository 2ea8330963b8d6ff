// CPU kernels for crformer::masked_pool / masked_pool_backward.
//
// Work is split into tasks (row b, chunk of kChunk channels) run by at::parallel_for. Inside a task
// the token loop is outermost and the channel loop innermost: with x's channel stride 1 that loop
// reads contiguous memory and keeps a small opmath accumulator array, so the compiler vectorises it.

#include "masked_pool.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace crformer {
namespace {

constexpr int64_t kChunk = 256;          // channels per task (accumulators live on the stack)
constexpr int64_t kTaskElems = 1 << 15;  // aim for >= this many x elements per thread

struct Geometry {
  int64_t B, L, C;
  int64_t sB, sL, sC;  // x strides (elements)
  int64_t chunks;      // channel chunks per row
};

Geometry geometry(const at::Tensor& mask, int64_t C, const at::Tensor* x) {
  Geometry g{};
  g.B = mask.size(0);
  g.L = mask.size(1);
  g.C = C;
  if (x != nullptr) {
    g.sB = x->stride(0);
    g.sL = x->stride(1);
    g.sC = x->stride(2);
  }
  g.chunks = (C + kChunk - 1) / kChunk;
  return g;
}

template <typename F>
void for_each_task(const Geometry& g, F&& fn) {
  const int64_t tasks = g.B * g.chunks;
  const int64_t per_task = std::max<int64_t>(1, g.L * std::min(g.C, kChunk));
  const int64_t grain = std::max<int64_t>(1, kTaskElems / per_task);
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / g.chunks;
      const int64_t c0 = (t % g.chunks) * kChunk;
      fn(b, c0, std::min(kChunk, g.C - c0));
    }
  });
}

// acc[j] (op) x[b, l, c0 + j] for j < n, choosing the unit-stride loop when possible.
template <typename scalar_t, typename acc_t, typename Op>
inline void row_apply(acc_t* acc, const scalar_t* p, int64_t sC, int64_t n, Op op) {
  if (sC == 1) {
    for (int64_t j = 0; j < n; ++j) acc[j] = op(acc[j], static_cast<acc_t>(p[j]));
  } else {
    for (int64_t j = 0; j < n; ++j) acc[j] = op(acc[j], static_cast<acc_t>(p[j * sC]));
  }
}

// Max over the valid tokens of one task into acc[0, n); returns the number of valid tokens (acc is
// left unset when it is 0). Strict '>' keeps the first of equal values; 'v != v' lets a NaN through.
template <typename scalar_t, typename acc_t>
inline int64_t masked_max(acc_t* acc, const scalar_t* xb, const bool* m, const Geometry& g, int64_t n) {
  int64_t count = 0;
  for (int64_t l = 0; l < g.L; ++l) {
    if (!m[l]) continue;
    const scalar_t* p = xb + l * g.sL;
    if (count++ == 0) {
      row_apply(acc, p, g.sC, n, [](acc_t, acc_t v) { return v; });
    } else {
      row_apply(acc, p, g.sC, n, [](acc_t a, acc_t v) { return (v > a || v != v) ? v : a; });
    }
  }
  return count;
}

template <typename scalar_t>
void forward_kernel(const Geometry& g, const scalar_t* x, const bool* mask, scalar_t* out,
                    PoolMode mode) {
  using acc_t = at::opmath_type<scalar_t>;
  for_each_task(g, [&](int64_t b, int64_t c0, int64_t n) {
    acc_t acc[kChunk];
    const bool* m = mask + b * g.L;
    const scalar_t* xb = x + b * g.sB + c0 * g.sC;
    int64_t count = 0;
    if (mode == PoolMode::Mean) {
      std::fill(acc, acc + n, acc_t(0));
      for (int64_t l = 0; l < g.L; ++l) {
        if (!m[l]) continue;
        ++count;
        row_apply(acc, xb + l * g.sL, g.sC, n, [](acc_t a, acc_t v) { return a + v; });
      }
      scalar_t* o = out + b * g.C + c0;
      const acc_t denom = static_cast<acc_t>(count);
      for (int64_t j = 0; j < n; ++j) o[j] = count ? static_cast<scalar_t>(acc[j] / denom) : scalar_t(0);
    } else {
      count = masked_max(acc, xb, m, g, n);
      scalar_t* o = out + b * g.C + c0;
      for (int64_t j = 0; j < n; ++j) o[j] = count ? static_cast<scalar_t>(acc[j]) : scalar_t(0);
    }
  });
}

template <typename scalar_t>
void backward_kernel(const Geometry& g, const scalar_t* grad, const bool* mask, const scalar_t* x,
                     scalar_t* gx, PoolMode mode) {
  using acc_t = at::opmath_type<scalar_t>;
  for_each_task(g, [&](int64_t b, int64_t c0, int64_t n) {
    const bool* m = mask + b * g.L;
    const scalar_t* gr = grad + b * g.C + c0;
    scalar_t* gxb = gx + b * g.L * g.C + c0;
    if (mode == PoolMode::Mean) {
      int64_t count = 0;
      for (int64_t l = 0; l < g.L; ++l) count += m[l] ? 1 : 0;
      scalar_t val[kChunk];
      const acc_t denom = static_cast<acc_t>(count);
      for (int64_t j = 0; j < n; ++j)
        val[j] = count ? static_cast<scalar_t>(static_cast<acc_t>(gr[j]) / denom) : scalar_t(0);
      for (int64_t l = 0; l < g.L; ++l) {
        scalar_t* o = gxb + l * g.C;
        if (m[l]) {
          std::copy(val, val + n, o);
        } else {
          std::fill(o, o + n, scalar_t(0));
        }
      }
    } else {
      // Pass 1: the max of each channel (as in the forward). Pass 2: the first valid token equal to
      // it (the first NaN if the max is NaN) takes the gradient; everything else gets 0. Two
      // branch-free passes over the task's x block (L x kChunk, cache-resident) vectorise; a single
      // pass tracking (max, arg-max) does not.
      // Selection works on the raw bits of grad (copied with memcpy) so the loop has no control
      // flow for any dtype.
      using bits_t = std::conditional_t<sizeof(scalar_t) == 2, uint16_t,
                                        std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint64_t>>;
      static_assert(sizeof(bits_t) == sizeof(scalar_t));
      acc_t best[kChunk];
      bits_t pending[kChunk];  // all ones until this channel's arg-max token has been written
      bits_t gbits[kChunk], obits[kChunk];
      std::memcpy(gbits, gr, n * sizeof(scalar_t));
      const scalar_t* xb = x + b * g.sB + c0 * g.sC;
      const int64_t count = masked_max(best, xb, m, g, n);
      std::fill(pending, pending + n, count > 0 ? static_cast<bits_t>(~bits_t(0)) : bits_t(0));
      for (int64_t l = 0; l < g.L; ++l) {
        scalar_t* o = gxb + l * g.C;
        if (!m[l] || count == 0) {
          std::fill(o, o + n, scalar_t(0));
          continue;
        }
        const scalar_t* p = xb + l * g.sL;
        auto hit = [&](int64_t j, acc_t v) {
          const acc_t bj = best[j];
          const bits_t eq = static_cast<bits_t>(0) - static_cast<bits_t>((v == bj) | ((v != v) & (bj != bj)));
          const bits_t h = pending[j] & eq;
          obits[j] = gbits[j] & h;
          pending[j] &= static_cast<bits_t>(~h);
        };
        if (g.sC == 1) {
          for (int64_t j = 0; j < n; ++j) hit(j, static_cast<acc_t>(p[j]));
        } else {
          for (int64_t j = 0; j < n; ++j) hit(j, static_cast<acc_t>(p[j * g.sC]));
        }
        std::memcpy(static_cast<void*>(o), obits, n * sizeof(scalar_t));
      }
    }
  });
}

}  // namespace

at::Tensor masked_pool_cpu(const at::Tensor& x, const at::Tensor& mask, c10::string_view mode_str) {
  const PoolMode mode = parse_mode(mode_str);
  check_forward(x, mask);
  const at::Tensor m = mask.contiguous();
  at::Tensor out = x.new_empty({x.size(0), x.size(2)});
  if (out.numel() == 0) return out;
  const Geometry g = geometry(m, x.size(2), &x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_pool_cpu", [&] {
    forward_kernel<scalar_t>(g, x.const_data_ptr<scalar_t>(), m.const_data_ptr<bool>(),
                             out.mutable_data_ptr<scalar_t>(), mode);
  });
  return out;
}

at::Tensor masked_pool_backward_cpu(const at::Tensor& grad, const at::Tensor& mask,
                        const std::optional<at::Tensor>& x, c10::string_view mode_str) {
  const PoolMode mode = parse_mode(mode_str);
  check_backward(grad, mask, x, mode);
  TORCH_CHECK_VALUE(mask.size(1) <= INT32_MAX, "masked_pool_backward: L too large");
  const at::Tensor m = mask.contiguous();
  const at::Tensor gr = grad.contiguous();
  at::Tensor gx = gr.new_empty({m.size(0), m.size(1), gr.size(1)});
  if (gx.numel() == 0) return gx;
  const at::Tensor* xp = mode == PoolMode::Max ? &*x : nullptr;
  const Geometry g = geometry(m, gr.size(1), xp);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gr.scalar_type(), "masked_pool_backward_cpu", [&] {
    backward_kernel<scalar_t>(g, gr.const_data_ptr<scalar_t>(), m.const_data_ptr<bool>(),
                              xp ? xp->const_data_ptr<scalar_t>() : nullptr,
                              gx.mutable_data_ptr<scalar_t>(), mode);
  });
  return gx;
}

}  // namespace crformer
