"""Fused Triton memory attention: the decoder's folded cross-attention (docs/DESIGN.md §3), forward
and backward.

Public API::

    triton_memory_attention(q, memory, pos=None, key_padding_mask=None, scale=None) -> Tensor

    q: B×M×D queries, memory: B×N×D (the pixel memory F), pos: B×N×D position table P (any strides;
    a batch-shared N×D table expanded with batch stride 0 is read once per batch from L2) or None,
    key_padding_mask: B×N bool (True = keep) or None, scale: default D**-0.5.
    Returns softmax(scale · q (F + P)ᵀ, masked) F, B×M×D in q's dtype; rows with no valid key give
    0 and zero gradients. Gradients for q, memory and pos.

The oracle is ``crformer.ops.attention.reference_memory_attention``.

Why a kernel of its own. With the decoder's projections folded into the queries
(``MultiHeadAttention(fold_decoder_attention=True)``), all heads of a cross-attention are ONE D-wide
attention whose keys are F + P and whose values are F itself. The generic long-key kernel
(``cross_attention.py``, regime b) needs the keys materialised (F + P written, then read), reads F
a second time as V, and with D = 256 covers the head dim in chunks whose programs each re-read the
full key rows. Here a program keeps its query block and the whole head dim (D <= 256) in one tile,
loads each F tile (and the L2-resident P tile) once and feeds both dots from it, so the pixel
memory is read once per query block. Same split-over-keys structure as regime (b): splits combined
by log-sum-exp (the combine and delta kernels of ``key_splits.py``, with H = 1), backward from
the saved log-sum-exp: dF per key block (key-major, written directly), dQ as fp32 partials per key
split summed by torch in a fixed order (deterministic).

dF = Pᵀ dO (value path) + dSᵀ Q · scale (key path) in one accumulator. dP is the key path alone:
when pos needs a gradient the dF kernel keeps it in a second accumulator and also writes it per
batch (fp32), and torch sums over the batch. (The model's positions are a fixed sine table that
needs no gradient, so its calls take the NEED_DPOS=False variant; the position gradient serves
callers whose pos requires grad.)

fp32 inputs, and D > 256, take the generic kernels with the keys materialised: the full-width fp32
tiles this kernel needs do not fit the registers (``input_precision="ieee"`` dots on CUDA cores).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from crformer.kernels import blocks, host, key_splits
from crformer.kernels import cross_attention as ca
from crformer.kernels.host import shipped
from crformer.kernels.inputs import check_memory_attention_inputs, memory_as_cross_attention

__all__ = ["triton_memory_attention", "MAX_D", "KERNEL_TABLE", "KERNELS", "POINTER_ARGS", "POINTER_TYPES"]

MAX_D = 256  # the whole head dim sits in one register tile

# Shipped configurations, in the format described in host.py (the AOT sm_90 test compiles
# every one and fails on a spill). BLOCK_D is the smallest shipped width >= D. The tiles are the
# largest that ptxas (sm_90a, triton 3.8) fits without spilling at D = 256 with a position table,
# 8 warps (benchmarks/NOTES.md, "memory attention"): the forward keeps a 64-row query tile (wgmma)
# with 32-key blocks; the backward kernels hold two more full-width tiles (dO, and Q or the
# accumulator), so one of their tile sides drops to 32 rows and their dots use mma.sync. At D = 256
# memory_bwd_dmem uses 150 registers (152 without a position table); its position-gradient variant
# (NEED_DPOS, a second accumulator) 194 (192): the model's calls skip that variant, since its
# position table is a fixed sine table (tests/kernels/test_compile_sm90.py, measured 2026-12-06).
# Tiles were chosen by registers only: not timed on a GPU yet.
_LOWP = ("fp16", "bf16")
_POS_AND_D = dict(HAS_POS=(False, True), BLOCK_D=(64, 128, 256))
KERNEL_TABLE = {
    "memory_fwd": shipped("memory_fwd", _LOWP, 8, 2, "wgmma", BLOCK_M=64, BLOCK_N=32, **_POS_AND_D),
    "memory_bwd_dq": shipped("memory_bwd_dq", _LOWP, 8, 2, "mma", BLOCK_M=32, BLOCK_N=64, **_POS_AND_D),
    "memory_bwd_dmem": shipped("memory_bwd_dmem", _LOWP, 8, 2, "mma", BLOCK_M=64, BLOCK_N=32, **_POS_AND_D,
                               NEED_DPOS=(False, True)),
}


# ============================================================================================
# Kernels. Grids put the query block first so the programs that share a key range run side by
# side and the second read of an F tile is an L2 hit. s2 = scores · scale · log2(e) (exp2).
# ============================================================================================


@triton.jit
def _keys(f, pos_base, cols, dd, cd, s_pn, s_pd, HAS_POS: tl.constexpr):
    """The key tile F + P, rounded once to F's dtype (as the unfolded layer's input would be)."""
    k = f
    if HAS_POS:
        p = blocks.load_tile(pos_base, cols, s_pn, dd, s_pd, cd)
        k = (f.to(tl.float32) + p.to(tl.float32)).to(f.dtype)
    return k


@triton.jit
def _key_block(q, f_base, pos_base, keep_base, n0, n_end, dd, dmask, s_fn, s_fd, s_pn, s_pd, s_keep_n, qk_scale,
               HAS_POS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key block [n0, n0 + BLOCK_N) ∩ [0, n_end) seen from a query tile q: (F tile, K = F + P tile,
    s2 = q Kᵀ · scale · log2(e) with masked and padded keys at -inf)."""
    cols, cmask = blocks.span(n0, BLOCK_N, n_end)
    cd = cmask[:, None] & dmask[None, :]
    keep = blocks.load_keep(keep_base, cols, cmask, s_keep_n)
    f = blocks.load_tile(f_base, cols, s_fn, dd, s_fd, cd)
    k = _keys(f, pos_base, cols, dd, cd, s_pn, s_pd, HAS_POS)
    s = tl.dot(q, tl.trans(k), input_precision="ieee")
    return f, k, blocks.scaled_logits(s, (keep & cmask)[None, :], qk_scale)


@triton.jit
def _memory_fwd_kernel(Q, F, POS, KEEP, OP, LP,
                       s_qb, s_qm, s_qd, s_fb, s_fn, s_fd, s_pb, s_pn, s_pd, s_keep_b, s_keep_n,
                       M, N, D, qk_scale, keys_per_split,
                       HAS_POS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    """Forward, one key split. Grid (cdiv(M, BLOCK_M), n_splits, B).

    Online softmax over keys [split·keys_per_split, (split+1)·keys_per_split) ∩ [0, N); writes the
    normalised partial OP (n_splits, B, M, D) fp32 and LP (n_splits, B, M) fp32, the log2-sum-exp2
    of the scaled logits (-inf where the split has no valid key).
    """
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows, rmask = blocks.span(tl.program_id(0) * BLOCK_M, BLOCK_M, M)
    dd, dmask = blocks.span(0, BLOCK_D, D)
    rd = rmask[:, None] & dmask[None, :]
    q = blocks.load_tile(Q + b * s_qb, rows, s_qm, dd, s_qd, rd)
    n_start, n_end = blocks.key_range(split, keys_per_split, N)

    m_i, l_i, acc = blocks.online_softmax_start(BLOCK_M, BLOCK_D)
    for n0 in range(n_start, n_end, BLOCK_N):
        f, _, s = _key_block(q, F + b * s_fb, POS + b * s_pb, KEEP + b * s_keep_b, n0, n_end, dd, dmask,
                             s_fn, s_fd, s_pn, s_pd, s_keep_n, qk_scale, HAS_POS, BLOCK_N)
        p, alpha, m_i, l_i = blocks.online_softmax_step(s, m_i, l_i)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(f.dtype), f, acc, input_precision="ieee")

    l_safe, lse = blocks.online_softmax_finish(m_i, l_i)
    part = split.to(tl.int64) * tl.num_programs(2) + b
    tl.store(blocks.part_ptrs(OP, part, M, rows, dd, D), acc / l_safe[:, None], mask=rd)
    tl.store(LP + part * M + rows, lse, mask=rmask)


@triton.jit
def _memory_bwd_dq_kernel(Q, F, POS, KEEP, DO, LSE, DELTA, DQP,
                          s_qb, s_qm, s_qd, s_fb, s_fn, s_fd, s_pb, s_pn, s_pd, s_dob, s_dom, s_dod,
                          s_keep_b, s_keep_n, M, N, D, qk_scale, sm_scale, keys_per_split,
                          HAS_POS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """dQ partial of one key split. Grid (cdiv(M, BLOCK_M), n_splits, B).

    dS = P ⊙ (dO Fᵀ - delta) with P = 2^(s2 - lse); dQ = scale · dS (F + P).
    DQP (n_splits, B, M, D) fp32; the launcher sums the splits in a fixed order.
    """
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows, rmask = blocks.span(tl.program_id(0) * BLOCK_M, BLOCK_M, M)
    lse, delta = blocks.load_lse_and_delta(LSE, DELTA, b * M, rows, rmask)
    dd, dmask = blocks.span(0, BLOCK_D, D)
    rd = rmask[:, None] & dmask[None, :]
    q = blocks.load_tile(Q + b * s_qb, rows, s_qm, dd, s_qd, rd)
    do = blocks.load_tile(DO + b * s_dob, rows, s_dom, dd, s_dod, rd)
    n_start, n_end = blocks.key_range(split, keys_per_split, N)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        f, k, s = _key_block(q, F + b * s_fb, POS + b * s_pb, KEEP + b * s_keep_b, n0, n_end, dd, dmask,
                             s_fn, s_fd, s_pn, s_pd, s_keep_n, qk_scale, HAS_POS, BLOCK_N)
        dp = tl.dot(do, tl.trans(f), input_precision="ieee")
        _, ds = blocks.softmax_grad(s, dp, lse, delta, KEY_MAJOR=False)
        dq = tl.dot(ds.to(f.dtype), k, dq, input_precision="ieee")
    part = split.to(tl.int64) * tl.num_programs(2) + b
    tl.store(blocks.part_ptrs(DQP, part, M, rows, dd, D), dq * sm_scale, mask=rd)


@triton.jit
def _memory_bwd_dmem_kernel(Q, F, POS, KEEP, DO, LSE, DELTA, DMEM, DPOSP,
                            s_qb, s_qm, s_qd, s_fb, s_fn, s_fd, s_pb, s_pn, s_pd, s_dob, s_dom, s_dod,
                            s_keep_b, s_keep_n, s_dmb, s_dmn, s_dmd, M, N, D, qk_scale, sm_scale,
                            HAS_POS: tl.constexpr, NEED_DPOS: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dF of one key block. Grid (cdiv(N, BLOCK_N), B).

    Key-major (Sᵀ = K Qᵀ, so the MMA rows are the keys): loops over all query blocks and
    accumulates dF = Pᵀ dO + scale · dSᵀ Q, written directly (each key belongs to one program).
    NEED_DPOS keeps the key path scale · dSᵀ Q in a second accumulator and also writes it to
    DPOSP (B, N, D) fp32, the per-batch gradient of the keys, which the launcher sums over B.
    """
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    # Written out rather than with blocks.span: so ptxas (sm_90a) allocates 192 registers, not 196,
    # at D = 256 with NEED_DPOS (tests/kernels/test_compile_sm90.py).
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    dd, dmask = blocks.span(0, BLOCK_D, D)
    cd = cmask[:, None] & dmask[None, :]
    valid = blocks.load_keep(KEEP + b * s_keep_b, cols, cmask, s_keep_n) & cmask
    f = blocks.load_tile(F + b * s_fb, cols, s_fn, dd, s_fd, cd)
    k = _keys(f, POS + b * s_pb, cols, dd, cd, s_pn, s_pd, HAS_POS)
    q_base = Q + b * s_qb
    do_base = DO + b * s_dob
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    acc_k = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows, rmask = blocks.span(m0, BLOCK_M, M)
        rd = rmask[:, None] & dmask[None, :]
        q = blocks.load_tile(q_base, rows, s_qm, dd, s_qd, rd)
        do = blocks.load_tile(do_base, rows, s_dom, dd, s_dod, rd)
        lse, delta = blocks.load_lse_and_delta(LSE, DELTA, b * M, rows, rmask)
        st = tl.dot(k, tl.trans(q), input_precision="ieee")
        dpt = tl.dot(f, tl.trans(do), input_precision="ieee")
        st = blocks.scaled_logits(st, valid[:, None], qk_scale)
        pt, dst = blocks.softmax_grad(st, dpt, lse, delta, KEY_MAJOR=True)
        acc = tl.dot(pt.to(f.dtype), do, acc, input_precision="ieee")
        if NEED_DPOS:
            acc_k = tl.dot(dst.to(f.dtype), q, acc_k, input_precision="ieee")
        else:
            acc = tl.dot((dst * sm_scale).to(f.dtype), q, acc, input_precision="ieee")
    if NEED_DPOS:
        acc_k = acc_k * sm_scale
        tl.store(blocks.part_ptrs(DPOSP, b, N, cols, dd, D), acc_k, mask=cd)
        acc += acc_k
    blocks.store_tile(DMEM + b * s_dmb, cols, s_dmn, dd, s_dmd, acc, cd)


# Name -> kernel, pointer arguments and their element types (pointers not listed carry the input
# dtype), for ahead-of-time compilation (tests/kernels/test_compile_sm90.py).
KERNELS = {
    "memory_fwd": _memory_fwd_kernel,
    "memory_bwd_dq": _memory_bwd_dq_kernel,
    "memory_bwd_dmem": _memory_bwd_dmem_kernel,
}
POINTER_ARGS = ("Q", "F", "POS", "KEEP", "DO", "OP", "LP", "LSE", "DELTA", "DQP", "DMEM", "DPOSP")
POINTER_TYPES = {"KEEP": "u8", "OP": "fp32", "LP": "fp32", "LSE": "fp32", "DELTA": "fp32", "DQP": "fp32",
                 "DPOSP": "fp32"}

# ============================================================================================
# Launchers
# ============================================================================================


def _fused(q: torch.Tensor) -> bool:
    """This kernel covers the shape and dtype; otherwise the generic kernels run (see the top)."""
    return q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= MAX_D


def _config(entry, has_pos, D, **want):
    return host.config(KERNEL_TABLE, entry, HAS_POS=has_pos, BLOCK_D=triton.next_power_of_2(D), **want)


def _pos_args(memory, pos):
    """(tensor, batch/row/dim strides, HAS_POS); without pos the memory stands in, unread."""
    if pos is None:
        return memory, (0, 0, 0), False
    return pos, tuple(pos.stride()), True


def _forward(q, memory, pos, keep, scale):
    """(o B×M×D in q.dtype, lse B×M fp32: log2-sum-exp2 of the scaled logits, +inf for rows
    without a valid key)."""
    B, M, D = q.shape
    N = memory.shape[1]
    device = q.device
    o = host.alloc((B, M, D), q.dtype, device)
    lse = host.alloc((B, M), torch.float32, device)
    if M == 0 or B == 0:
        return o, lse
    if N == 0:  # no key at all: every row is fully masked
        return o.zero_(), lse.fill_(float("inf"))
    keep_bytes = host.keep_u8(keep, B, N, device)
    pos_arg, pos_strides, has_pos = _pos_args(memory, pos)
    constexprs, launch = _config("memory_fwd", has_pos, D)
    n_query_blocks = triton.cdiv(M, constexprs["BLOCK_M"])
    n_splits, keys_per_split = host.split_keys(N, constexprs["BLOCK_N"], n_query_blocks * B, device,
                                                 ca.PROGRAMS_PER_SM)
    o_parts = host.alloc((n_splits, B, M, D), torch.float32, device)
    lse_parts = host.alloc((n_splits, B, M), torch.float32, device)
    _memory_fwd_kernel[(n_query_blocks, n_splits, B)](
        q, memory, pos_arg, keep_bytes, o_parts, lse_parts, *q.stride(), *memory.stride(), *pos_strides,
        *keep_bytes.stride(), M, N, D, scale * blocks.LOG2E, keys_per_split, **constexprs, **launch)
    key_splits.combine_splits(o_parts, lse_parts, o[:, None], lse)  # one head
    return o, lse


def _backward(do, q, memory, pos, keep, o, lse, scale, need_dpos):
    """(dq, dmemory, dpos): inputs' dtypes; dpos is an empty tensor unless ``need_dpos``."""
    B, M, D = q.shape
    N = memory.shape[1]
    device = q.device
    no_dpos = q.new_empty((0,))
    if M == 0 or N == 0 or B == 0:
        dpos = torch.zeros_like(pos) if need_dpos else no_dpos
        return torch.zeros_like(q), torch.zeros_like(memory), dpos
    keep_bytes = host.keep_u8(keep, B, N, device)
    pos_arg, pos_strides, has_pos = _pos_args(memory, pos)
    qk_scale = scale * blocks.LOG2E
    delta = key_splits.row_delta(o[:, None], do[:, None])  # one head

    constexprs, launch = _config("memory_bwd_dmem", has_pos, D, NEED_DPOS=need_dpos)
    dmem = host.alloc((B, N, D), memory.dtype, device)
    # Without need_dpos, dmem stands in for the unwritten per-batch position gradient.
    dpos_per_batch = host.alloc((B, N, D), torch.float32, device) if need_dpos else dmem
    _memory_bwd_dmem_kernel[(triton.cdiv(N, constexprs["BLOCK_N"]), B)](
        q, memory, pos_arg, keep_bytes, do, lse, delta, dmem, dpos_per_batch, *q.stride(), *memory.stride(),
        *pos_strides, *do.stride(), *keep_bytes.stride(), *dmem.stride(), M, N, D, qk_scale, scale, **constexprs,
        **launch)
    dpos = dpos_per_batch.to(pos.dtype) if need_dpos else no_dpos

    constexprs, launch = _config("memory_bwd_dq", has_pos, D)
    n_query_blocks = triton.cdiv(M, constexprs["BLOCK_M"])
    n_splits, keys_per_split = host.split_keys(N, constexprs["BLOCK_N"], n_query_blocks * B, device,
                                                 ca.PROGRAMS_PER_SM)
    dq_parts = host.alloc((n_splits, B, M, D), torch.float32, device)
    _memory_bwd_dq_kernel[(n_query_blocks, n_splits, B)](
        q, memory, pos_arg, keep_bytes, do, lse, delta, dq_parts, *q.stride(), *memory.stride(), *pos_strides,
        *do.stride(), *keep_bytes.stride(), M, N, D, qk_scale, scale, keys_per_split, **constexprs, **launch)
    return dq_parts.sum(0).to(q.dtype), dmem, dpos  # fixed-order reduction over splits: deterministic


# ============================================================================================
# torch.library custom ops (traceable by torch.compile) + autograd
# ============================================================================================

@torch.library.custom_op("crformer::triton_memory_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, memory: torch.Tensor, pos: Optional[torch.Tensor],
            key_padding_mask: Optional[torch.Tensor], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(o B×M×D, lse B×M fp32)."""
    return _forward(q, memory, pos, key_padding_mask, scale)


@_fwd_op.register_fake
def _fwd_fake(q, memory, pos, key_padding_mask, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.custom_op("crformer::triton_memory_attention_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, memory: torch.Tensor, pos: Optional[torch.Tensor],
            key_padding_mask: Optional[torch.Tensor], o: torch.Tensor, lse: torch.Tensor, scale: float,
            need_dpos: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dmemory, dpos); dpos is an empty tensor unless ``need_dpos``."""
    return _backward(do, q, memory, pos, key_padding_mask, o, lse, scale, need_dpos)


@_bwd_op.register_fake
def _bwd_fake(do, q, memory, pos, key_padding_mask, o, lse, scale, need_dpos):
    dpos = pos.new_empty(pos.shape) if need_dpos else q.new_empty((0,))
    return q.new_empty(q.shape), memory.new_empty(memory.shape), dpos


def _setup_context(ctx, inputs, output):
    q, memory, pos, key_padding_mask, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, memory, pos, key_padding_mask, o, lse)
    ctx.scale = scale


def _backward_rule(ctx, do, dlse):
    q, memory, pos, key_padding_mask, o, lse = ctx.saved_tensors
    need_dpos = pos is not None and ctx.needs_input_grad[2]
    dq, dmem, dpos = _bwd_op(do, q, memory, pos, key_padding_mask, o, lse, ctx.scale, need_dpos)
    return dq, dmem, (dpos if need_dpos else None), None, None


torch.library.register_autograd("crformer::triton_memory_attention_fwd", _backward_rule,
                                setup_context=_setup_context)


def triton_memory_attention(q: torch.Tensor, memory: torch.Tensor, pos: Optional[torch.Tensor] = None,
                            key_padding_mask: Optional[torch.Tensor] = None,
                            scale: Optional[float] = None) -> torch.Tensor:
    """Fused ``softmax(q (memory + pos)ᵀ·scale, masked) memory``, forward and backward in Triton.

    Args:
        q: B×M×D; memory: B×N×D; pos: B×N×D or N×D (batch-shared) or None. One dtype (fp16/bf16
           fused; fp32 and D > 256 run the generic kernels with the keys materialised), CUDA (or CPU
           under TRITON_INTERPRET=1), any strides.
        key_padding_mask: optional B×N bool, True = valid key (any pattern).
        scale: softmax scale, default D**-0.5.
    Returns:
        B×M×D contiguous, q's dtype; rows with no valid key are 0 (zero gradients).
    Raises:
        ValueError on shape/dtype/device mismatch.
    """
    check_memory_attention_inputs(q, memory, pos, key_padding_mask, name="triton_memory_attention")
    host.check_kernel_inputs(q, "triton_memory_attention")
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    if not _fused(q):
        return ca.triton_cross_attention(*memory_as_cross_attention(q, memory, pos), key_padding_mask, scale)[:, 0]
    if pos is not None:
        pos = pos.expand_as(memory)
    o, _ = _fwd_op(q, memory, pos, key_padding_mask, scale)
    return o
