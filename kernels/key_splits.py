"""Flash-decoding key splits: the kernel that merges split partials by log-sum-exp (``combine_splits``)
and the one for delta = rowsum(dO ⊙ O) of the backward (``row_delta``), with their shipped configs.
Both the generic cross-attention (``cross_attention.py``) and the memory attention
(``memory_attention.py``, H = 1) use them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from crformer.kernels.blocks import batch_head, load_tile, part_ptrs, span, store_tile
from crformer.kernels.host import alloc, config, shipped

KERNEL_TABLE = {
    # log-sum-exp combine of the split partials, and delta = rowsum(dO ⊙ O): no dot.
    "long_combine": shipped("long_combine", ("fp32", "fp16", "bf16"), 4, 1, None, BLOCK_M=16, BLOCK_D=64),
    "long_bwd_delta": shipped("long_bwd_delta", ("fp32", "fp16", "bf16"), 4, 1, None, BLOCK_M=16, BLOCK_D=64),
}


@triton.jit
def _split_lse(LP, row0, rows, rmask):
    """Log-sum-exp of one split's partial for these rows (-inf for padded rows)."""
    return tl.load(LP + row0 + rows, mask=rmask, other=float("-inf"))


@triton.jit
def _long_combine_kernel(OP, LP, O, LSE, s_ob, s_oh, s_om, s_od, H, M, D, n_splits, n_bh,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merge split partials by log-sum-exp. Grid (cdiv(M, BLOCK_M), B*H).

    O = Σ_s 2^(lse_s - lse) · o_s with lse = log2 Σ_s 2^lse_s; LSE (B*H, M) fp32 saved for the
    backward, +inf where a row has no valid key (so the backward's P = 2^(s - lse) is 0 there).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h = batch_head(pid_bh, H)
    rows, rmask = span(pid_m * BLOCK_M, BLOCK_M, M)
    dd = tl.arange(0, BLOCK_D)
    mx = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    for sp in range(0, n_splits):
        mx = tl.maximum(mx, _split_lse(LP, (sp * n_bh + pid_bh).to(tl.int64) * M, rows, rmask))
    m_safe = tl.where(mx == float("-inf"), 0.0, mx)
    den = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for sp in range(0, n_splits):
        den += tl.exp2(_split_lse(LP, (sp * n_bh + pid_bh).to(tl.int64) * M, rows, rmask) - m_safe)
    has = den > 0.0
    den_safe = tl.where(has, den, 1.0)
    inv = tl.where(has, 1.0 / den_safe, 0.0)
    tl.store(LSE + pid_bh.to(tl.int64) * M + rows, tl.where(has, m_safe + tl.log2(den_safe), float("inf")),
             mask=rmask)
    # One head-dim chunk at a time: the weights are recomputed per chunk rather than kept for all splits.
    for d0 in range(0, D, BLOCK_D):
        dm = (d0 + dd) < D
        rd = rmask[:, None] & dm[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for sp in range(0, n_splits):
            part = (sp * n_bh + pid_bh).to(tl.int64)
            w = tl.exp2(_split_lse(LP, part * M, rows, rmask) - m_safe) * inv
            o_part = tl.load(part_ptrs(OP, part, M, rows, d0 + dd, D), mask=rd, other=0.0)
            acc += w[:, None] * o_part
        store_tile(O + b * s_ob + h * s_oh, rows, s_om, d0 + dd, s_od, acc, rd)


@triton.jit
def _long_bwd_delta_kernel(O, DO, DELTA, s_ob, s_oh, s_om, s_od, s_dob, s_doh, s_dom, s_dod, H, M, D,
                           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta = rowsum(dO ⊙ O) in fp32, (B*H, M). Grid (cdiv(M, BLOCK_M), B*H)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h = batch_head(pid_bh, H)
    rows, rmask = span(pid_m * BLOCK_M, BLOCK_M, M)
    dd = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dm = (d0 + dd) < D
        rd = rmask[:, None] & dm[None, :]
        o = load_tile(O + b * s_ob + h * s_oh, rows, s_om, d0 + dd, s_od, rd)
        do = load_tile(DO + b * s_dob + h * s_doh, rows, s_dom, d0 + dd, s_dod, rd)
        acc += tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * M + rows, acc, mask=rmask)


# Name -> kernel, and the pointer arguments' element types, for ahead-of-time compilation
# (tests/kernels/test_compile_sm90.py). Pointers not listed here carry the q/k/v dtype.
KERNELS = {"long_combine": _long_combine_kernel, "long_bwd_delta": _long_bwd_delta_kernel}


POINTER_ARGS = ("OP", "LP", "O", "LSE", "DO", "DELTA")


POINTER_TYPES = {"OP": "fp32", "LP": "fp32", "LSE": "fp32", "DELTA": "fp32"}


def combine_splits(o_parts, lse_parts, o, lse) -> None:
    """Write o (B×H×M×d, any strides) and lse ((B*H, M) fp32, +inf for rows without a valid key)
    from the split partials o_parts (n_splits, B*H, M, d) and lse_parts (n_splits, B*H, M)."""
    n_splits, n_bh = lse_parts.shape[:2]
    _, H, M, D = o.shape
    constexprs, launch = config(KERNEL_TABLE, "long_combine")
    _long_combine_kernel[(triton.cdiv(M, constexprs["BLOCK_M"]), n_bh)](
        o_parts, lse_parts, o, lse, *o.stride(), H, M, D, n_splits, n_bh, **constexprs, **launch)


def row_delta(o, do) -> torch.Tensor:
    """delta = rowsum(dO ⊙ O) of B×H×M×d o and do (any strides), (B*H, M) fp32."""
    B, H, M, D = o.shape
    delta = alloc((B * H, M), torch.float32, o.device)
    constexprs, launch = config(KERNEL_TABLE, "long_bwd_delta")
    _long_bwd_delta_kernel[(triton.cdiv(M, constexprs["BLOCK_M"]), B * H)](
        o, do, delta, *o.stride(), *do.stride(), H, M, D, **constexprs, **launch)
    return delta
