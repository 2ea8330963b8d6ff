"""Fused Triton cross-attention, forward and backward (docs/DESIGN.md §3 "Kernels").

Public API::

    triton_cross_attention(q, k, v, key_padding_mask=None, scale=None) -> Tensor

    q: B×H×M×d, k/v: B×H×N×d (same dtype/device; fp32, fp16 or bf16; any strides),
    key_padding_mask: B×N bool (True = keep; any pattern) or None, scale: default d**-0.5.
    Returns B×H×M×d in q's dtype. Rows with no valid key give 0 and zero gradients.

The oracle is ``crformer.ops.attention.reference_cross_attention``.

Layout of this file (flash-attention ``ops/triton`` style): the shipped-config table, the Triton
kernels, their launchers, then the ``torch.library.custom_op`` pair (forward / backward) with fake
implementations and ``register_autograd``. Everything accumulates in fp32. The building blocks the
kernels are written in (the chunked Q Kᵀ, the exact and the online softmax, the backward from the
log-sum-exp) and the split-combine and delta kernels of regime (b), which memory_attention.py shares,
are in ``blocks.py`` (device) and ``host.py`` (host); key splits in ``key_splits.py``.

Two regimes, dispatched on the number of keys N:

(a) SHORT KEYS, N <= 64 (VLF pixel->word, calibration, QGM, LRM). All keys of a (batch, head) fit
    in one register tile, so the softmax is exact: no running max, no rescaling, and the backward
    recomputes P instead of saving O or the log-sum-exp. Forward: one program per BLOCK_M queries;
    pass 1 loops over the head dim in BLOCK_D chunks accumulating S = Q K^T (Q read once), pass 2
    writes O chunk by chunk (O written once). Backward: dQ is written directly; dK/dV are sums over
    all queries, so each program owns a *run* of query blocks, accumulates dK/dV in registers and
    writes one fp32 partial; torch sums the partials (fixed order -> deterministic, no atomics).

(b) LONG KEYS, N > 64 (CDec: ~16 queries over up to 14,400 pixels). B·H alone is fewer programs
    than SMs, so keys are split over programs (flash-decoding): each program runs the online
    softmax over its key range and writes a normalised fp32 partial O and its log-sum-exp; a small
    kernel combines the splits by log-sum-exp and saves the final LSE. Backward from the LSE with
    delta = rowsum(dO ⊙ O): dK/dV per key block (looping over all query blocks, written directly),
    dQ per key split as fp32 partials summed by torch. With large M the split count drops to 1 and
    this is the standard flash loop, so any shape is handled.

Head dims: Triton needs power-of-two tiles, so d is covered by BLOCK_D-wide chunks and the tail is
masked in every load/store (no padded copies). Wherever an accumulator would have to hold the whole
head dim (dK/dV in (a), O/dK/dV/dQ in (b)) the grid gets a head-dim-chunk axis instead: each
chunk's program recomputes the scores over the full d (cheap: these kernels are memory-bound,
docs/DESIGN.md §6) and owns one BLOCK_D slice of the outputs. Chunk programs of the same block are
adjacent in launch order, so their repeated reads of Q/K/V/dO are mostly L2 hits.

Precision: fp16/bf16 run on tensor cores with fp32 accumulation; P and dS are rounded to the input
dtype before their matmuls (as in flash-attention). fp32 inputs use ``input_precision="ieee"``:
exact fp32 products, so the fp32 path is a faithful (slow, non-tensor-core) twin of the reference
rather than a TF32 approximation; use fp16/bf16 for speed.

Fully masked rows: the forward clamps the row max to 0 when it is -inf and guards 1/l, so P = 0 and
O = 0; the saved LSE of such a row is +inf, so the backward's exp2(s - lse) is 0 and all gradients
of that row are exactly 0. Padded rows/keys/dims are masked in every load and store (in
TRITON_INTERPRET=1 an out-of-bounds access is a segfault, not an error).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from crformer.kernels import blocks, host, key_splits
from crformer.kernels.host import shipped
from crformer.kernels.inputs import check_attention_inputs

__all__ = ["triton_cross_attention", "SHORT_MAX_N", "PROGRAMS_PER_SM", "KERNEL_TABLE", "KERNELS"]

SHORT_MAX_N = 64  # regime (a) holds all keys of a row in one register tile of at most this width
# Key splits (regime b) and query runs (regime a backward) aim at this many programs per SM: enough
# to hide memory latency, few enough that the partials stay small (benchmarks/tune_kernels.py).
# Read at every launch (the tuner changes it), also by memory_attention.py.
PROGRAMS_PER_SM = 2

# --------------------------------------------------------------------------------------------
# Shipped configurations, in the format described in host.py (the single source of truth for
# the launchers below and for tests/kernels/test_compile_sm90.py). The combine and delta kernels of
# regime (b) are shared with memory_attention.py and ship from key_splits.KERNEL_TABLE.
# mma = "mma" (mma.sync) where the 16-row query tile is below wgmma's 64-row warpgroup minimum
# (CDec: M ~ 16 queries; these kernels are HBM-bound, tensor-core time is a few % of the byte
# floor, docs/DESIGN.md §6); "fma" for fp32 (exact fp32 on CUDA cores, see the top).
# In short_bwd with BLOCK_N < 64 the key-major dK/dV dots have only BLOCK_N rows, so those two
# dots use mma.sync while the score/dP/dQ dots (64 query rows) use wgmma.
# Tiles, warps and stages of the fp16/bf16 entries are the fastest spill-free candidates of
# benchmarks/tune_kernels.py on an H200 (2026-11-26, CUDA-graph GPU time on the VLF and CDec shapes;
# benchmarks/NOTES.md): 4 warps with 2 stages beat 8 warps with 1 in regime (a) (1.3-1.6x), and
# 128-key blocks beat 64 in regime (b). Candidates that were faster but spilled were not shipped
# (short_bwd with 128-row tiles; long_fwd with a 256-wide head-dim chunk).
# Register notes (ptxas, sm_90a): 64-row tiles with 128-wide head-dim chunks fit the forward in 4
# warps; the backward holds S, dP, dK and dV, so it stays at 64-wide chunks; the 64-row long-key
# kernels need 8 warps (4 spill).
# The fp32 FMA dot keeps whole operand rows in registers, so fp32 entries use 32-wide head-dim
# chunks and 32/16-row query tiles (64-row fp32 tiles spill).
# --------------------------------------------------------------------------------------------
_LOWP = ("fp16", "bf16")
_FP32 = ("fp32",)
KERNEL_TABLE = {
    # regime (a) forward / backward; BLOCK_N = smallest shipped power of two >= N.
    "short_fwd": shipped("short_fwd", _LOWP, 4, 2, "wgmma", BLOCK_M=64, BLOCK_N=(16, 32, 64), BLOCK_D=(32, 64, 128)),
    "short_fwd_fp32": shipped("short_fwd", _FP32, 8, 1, "fma", BLOCK_M=32, BLOCK_N=(16, 32, 64), BLOCK_D=32),
    "short_bwd": shipped("short_bwd", _LOWP, 4, 2, "wgmma", BLOCK_M=64, BLOCK_N=(16, 32), BLOCK_D=(32, 64)),
    # 33-64 keys: the 4-warp tile spills under triton 3.6's ptxas (not 3.8's), so 8 warps, 1 stage.
    "short_bwd_n64": shipped("short_bwd", _LOWP, 8, 1, "wgmma", BLOCK_M=64, BLOCK_N=64, BLOCK_D=(32, 64)),
    "short_bwd_fp32": shipped("short_bwd", _FP32, 8, 1, "fma", BLOCK_M=32, BLOCK_N=(16, 32, 64), BLOCK_D=32),
    # regime (b) forward split: 16-row tile for the CDec shape (M <= 16), 64-row tile for large M.
    "long_fwd_m16": shipped("long_fwd", _LOWP, 4, 1, "mma", BLOCK_M=16, BLOCK_N=128, BLOCK_D=(32, 64)),
    "long_fwd_m64": shipped("long_fwd", _LOWP, 8, 3, "wgmma", BLOCK_M=64, BLOCK_N=128, BLOCK_D=(32, 64, 128)),
    "long_fwd_fp32": shipped("long_fwd", _FP32, 4, 2, "fma", BLOCK_M=16, BLOCK_N=64, BLOCK_D=32),
    # regime (b) dK/dV: key-major (S^T = K Q^T), so the MMA M dimension is the 64-key block and all
    # its dots can use wgmma even with a 16-row query tile.
    "long_bwd_dkdv_m16": shipped("long_bwd_dkdv", _LOWP, 4, 1, "wgmma", BLOCK_M=16, BLOCK_N=64, BLOCK_D=(32, 64)),
    "long_bwd_dkdv_m64": shipped("long_bwd_dkdv", _LOWP, 8, 1, "wgmma", BLOCK_M=64, BLOCK_N=64, BLOCK_D=(32, 64)),
    "long_bwd_dkdv_fp32": shipped("long_bwd_dkdv", _FP32, 8, 1, "fma", BLOCK_M=16, BLOCK_N=64, BLOCK_D=32),
    # regime (b) dQ partials per key split; same tile argument as the forward.
    "long_bwd_dq_m16": shipped("long_bwd_dq", _LOWP, 4, 2, "mma", BLOCK_M=16, BLOCK_N=64, BLOCK_D=(32, 64)),
    "long_bwd_dq_m64": shipped("long_bwd_dq", _LOWP, 8, 2, "wgmma", BLOCK_M=64, BLOCK_N=64, BLOCK_D=(32, 64)),
    "long_bwd_dq_fp32": shipped("long_bwd_dq", _FP32, 4, 2, "fma", BLOCK_M=16, BLOCK_N=64, BLOCK_D=32),
}


def _entry(base: str, dtype: torch.dtype, M: Optional[int] = None, N: Optional[int] = None) -> str:
    """Table entry for kernel family ``base`` at this dtype (and query count, long-key regime; key
    count, short-key backward)."""
    if dtype == torch.float32 and base + "_fp32" in KERNEL_TABLE:
        return base + "_fp32"
    if base + "_n64" in KERNEL_TABLE:  # the base entry covers the keys up to its largest BLOCK_N
        return base + ("_n64" if N > max(KERNEL_TABLE[base]["choices"]["BLOCK_N"]) else "")
    if base + "_m16" in KERNEL_TABLE:
        return base + ("_m16" if M <= 16 else "_m64")
    return base


def _config(entry: str, **want) -> tuple[dict, dict]:
    """Constexprs + launch options of a ``KERNEL_TABLE`` entry, ``want`` as in ``host.config``
    (benchmarks/tune_kernels.py reads it to start from the shipped choice; tests/kernels/test_tune.py
    wraps it to see what the launchers pick)."""
    return host.config(KERNEL_TABLE, entry, **want)


# ============================================================================================
# Kernels. Conventions: pid over (batch*head) is the last grid axis; base offsets are int64 (a
# B·H·M·d tensor can exceed 2^31 elements); s2 = scores * scale * log2(e) so softmax uses exp2.
# KEEP is the B×N key mask as uint8 (1 = valid). The building blocks are in blocks.py.
# ============================================================================================


@triton.jit
def _short_fwd_kernel(Q, K, V, KEEP, O,
                      s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                      s_ob, s_oh, s_om, s_od, s_keep_b, s_keep_n,
                      H, M, N, D, qk_scale,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Regime (a) forward. Grid (cdiv(M, BLOCK_M), B*H). All N <= BLOCK_N keys in one tile."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h = blocks.batch_head(pid_bh, H)
    rows, rmask = blocks.span(pid_m * BLOCK_M, BLOCK_M, M)
    cols, cmask = blocks.span(0, BLOCK_N, N)
    dd = tl.arange(0, BLOCK_D)
    q_base = Q + b * s_qb + h * s_qh
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    o_base = O + b * s_ob + h * s_oh
    keep = blocks.load_keep(KEEP + b * s_keep_b, cols, cmask, s_keep_n)

    # Pass 1: S = Q K^T over the full head dim (Q is read exactly once), then the exact softmax.
    s = blocks.chunked_dot_t(q_base, s_qm, s_qd, k_base, s_kn, s_kd, rows, rmask, cols, cmask,
                             tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), D, BLOCK_D)
    p = blocks.exact_softmax(blocks.scaled_logits(s, (keep & cmask)[None, :], qk_scale)).to(V.dtype.element_ty)

    # Pass 2: O = P V, one head-dim chunk at a time (O is written exactly once).
    for d0 in range(0, D, BLOCK_D):
        dm = (d0 + dd) < D
        v = blocks.load_tile(v_base, cols, s_vn, d0 + dd, s_vd, cmask[:, None] & dm[None, :])
        o = tl.dot(p, v, input_precision="ieee")
        blocks.store_tile(o_base, rows, s_om, d0 + dd, s_od, o, rmask[:, None] & dm[None, :])


@triton.jit
def _short_bwd_kernel(Q, K, V, KEEP, DO, DQ, DKP, DVP,
                      s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                      s_dob, s_doh, s_dom, s_dod, s_dqb, s_dqh, s_dqm, s_dqd, s_keep_b, s_keep_n,
                      H, M, N, D, qk_scale, sm_scale, blocks_per_run, n_mblocks,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Regime (a) backward. Grid (cdiv(D, BLOCK_D), n_runs, B*H).

    Program (c, r, bh) handles query blocks [r*blocks_per_run, (r+1)*blocks_per_run) and head-dim
    chunk c: it recomputes P and dP over the full head dim, writes dQ[:, chunk c] directly and
    accumulates dK/dV[:, chunk c] over its query blocks in registers; the fp32 partials
    DKP/DVP (n_runs × B×H × N × D, contiguous) are summed by the launcher.
    """
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b, h = blocks.batch_head(pid_bh, H)
    cols, cmask = blocks.span(0, BLOCK_N, N)
    own, omask = blocks.span(pid_c * BLOCK_D, BLOCK_D, D)
    q_base = Q + b * s_qb + h * s_qh
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    do_base = DO + b * s_dob + h * s_doh
    dq_base = DQ + b * s_dqb + h * s_dqh
    valid = blocks.load_keep(KEEP + b * s_keep_b, cols, cmask, s_keep_n) & cmask
    # This chunk's K slice is reused by every query block of the run.
    k_own = blocks.load_tile(k_base, cols, s_kn, own, s_kd, cmask[:, None] & omask[None, :])

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    mb_start = pid_r * blocks_per_run
    mb_end = tl.minimum(mb_start + blocks_per_run, n_mblocks)
    for mb in range(mb_start, mb_end):
        rows, rmask = blocks.span(mb * BLOCK_M, BLOCK_M, M)
        s, dp = blocks.chunked_dot_t_pair(q_base, s_qm, s_qd, k_base, s_kn, s_kd, do_base, s_dom, s_dod,
                                          v_base, s_vn, s_vd, rows, rmask, cols, cmask,
                                          tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
                                          tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), D, BLOCK_D)
        # Recompute the exact softmax (same arithmetic as the forward).
        p = blocks.exact_softmax(blocks.scaled_logits(s, valid[None, :], qk_scale))
        p = tl.where(rmask[:, None], p, 0.0)  # padded rows contribute nothing to dK/dV
        # delta = rowsum(P ⊙ dP) = rowsum(dO ⊙ O): no saved O needed.
        delta = tl.sum(p * dp, 1)
        ds = p * (dp - delta[:, None])  # gradient w.r.t. the scaled logits
        rd_own = rmask[:, None] & omask[None, :]
        dq = tl.dot(ds.to(K.dtype.element_ty), k_own, input_precision="ieee") * sm_scale
        blocks.store_tile(dq_base, rows, s_dqm, own, s_dqd, dq, rd_own)
        dk, dv = blocks.accumulate_dkdv(p, ds, q_base, s_qm, s_qd, do_base, s_dom, s_dod, rows, own, rd_own, dk, dv,
                                        KEY_MAJOR=False)

    # Partials are contiguous (n_runs, B*H, N, D) fp32.
    part = (pid_r.to(tl.int64) * tl.num_programs(2) + pid_bh) * N * D
    offs = part + cols[:, None] * D + own[None, :]
    cd_own = cmask[:, None] & omask[None, :]
    tl.store(DKP + offs, dk * sm_scale, mask=cd_own)
    tl.store(DVP + offs, dv, mask=cd_own)


@triton.jit
def _long_fwd_kernel(Q, K, V, KEEP, OP, LP,
                     s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                     s_keep_b, s_keep_n, H, M, N, D, qk_scale, keys_per_split, n_dchunks,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Regime (b) forward, one key split. Grid (n_splits * n_dchunks, cdiv(M, BLOCK_M), B*H).

    Online softmax over keys [split*keys_per_split, (split+1)*keys_per_split) ∩ [0, N).
    Writes the normalised partial OP (n_splits, B*H, M, D) fp32 for head-dim chunk c and, from
    chunk 0, LP (n_splits, B*H, M) fp32 = log2-sum-exp2 of the scaled logits (-inf if no key).
    """
    pid_bh = tl.program_id(2)
    split, pid_c = blocks.split_and_chunk(tl.program_id(0), n_dchunks)
    b, h = blocks.batch_head(pid_bh, H)
    rows, rmask = blocks.span(tl.program_id(1) * BLOCK_M, BLOCK_M, M)
    own, omask = blocks.span(pid_c * BLOCK_D, BLOCK_D, D)
    q_base = Q + b * s_qb + h * s_qh
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    n_start, n_end = blocks.key_range(split, keys_per_split, N)

    m_i, l_i, acc = blocks.online_softmax_start(BLOCK_M, BLOCK_D)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols, cmask = blocks.span(n0, BLOCK_N, n_end)
        keep = blocks.load_keep(KEEP + b * s_keep_b, cols, cmask, s_keep_n)
        s = blocks.chunked_dot_t(q_base, s_qm, s_qd, k_base, s_kn, s_kd, rows, rmask, cols, cmask,
                                 tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), D, BLOCK_D)
        s = blocks.scaled_logits(s, (keep & cmask)[None, :], qk_scale)
        p, alpha, m_i, l_i = blocks.online_softmax_step(s, m_i, l_i)
        v = blocks.load_tile(v_base, cols, s_vn, own, s_vd, cmask[:, None] & omask[None, :])
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(V.dtype.element_ty), v, acc, input_precision="ieee")

    l_safe, lse = blocks.online_softmax_finish(m_i, l_i)
    bh_split = split.to(tl.int64) * tl.num_programs(2) + pid_bh
    tl.store(blocks.part_ptrs(OP, bh_split, M, rows, own, D), acc / l_safe[:, None],
             mask=rmask[:, None] & omask[None, :])
    tl.store(LP + bh_split * M + rows, lse, mask=rmask & (pid_c == 0))


@triton.jit
def _long_bwd_dkdv_kernel(Q, K, V, KEEP, DO, LSE, DELTA, DK, DV,
                          s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                          s_dob, s_doh, s_dom, s_dod, s_keep_b, s_keep_n,
                          s_dkb, s_dkh, s_dkn, s_dkd, s_dvb, s_dvh, s_dvn, s_dvd,
                          H, M, N, D, qk_scale, sm_scale,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Regime (b) dK/dV. Grid (cdiv(D, BLOCK_D), cdiv(N, BLOCK_N), B*H).

    Key-major: S^T = K Q^T (BLOCK_N × BLOCK_M) so the MMA M dimension is the key block; loops over
    all query blocks; P^T = 2^(S^T - lse), dS^T = P^T ⊙ (dP^T - delta); dV += P^T dO, dK += dS^T Q.
    Written directly (each key belongs to exactly one program per chunk).
    """
    pid_c = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b, h = blocks.batch_head(pid_bh, H)
    cols, cmask = blocks.span(pid_n * BLOCK_N, BLOCK_N, N)
    own, omask = blocks.span(pid_c * BLOCK_D, BLOCK_D, D)
    q_base = Q + b * s_qb + h * s_qh
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    do_base = DO + b * s_dob + h * s_doh
    valid = blocks.load_keep(KEEP + b * s_keep_b, cols, cmask, s_keep_n) & cmask
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows, rmask = blocks.span(m0, BLOCK_M, M)
        st, dpt = blocks.chunked_dot_t_pair(k_base, s_kn, s_kd, q_base, s_qm, s_qd, v_base, s_vn, s_vd,
                                            do_base, s_dom, s_dod, cols, cmask, rows, rmask,
                                            tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32),
                                            tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), D, BLOCK_D)
        lse, delta = blocks.load_lse_and_delta(LSE, DELTA, pid_bh.to(tl.int64) * M, rows, rmask)
        st = blocks.scaled_logits(st, valid[:, None], qk_scale)
        pt, dst = blocks.softmax_grad(st, dpt, lse, delta, KEY_MAJOR=True)
        dk, dv = blocks.accumulate_dkdv(pt, dst, q_base, s_qm, s_qd, do_base, s_dom, s_dod, rows, own,
                                        rmask[:, None] & omask[None, :], dk, dv, KEY_MAJOR=True)
    cd_own = cmask[:, None] & omask[None, :]
    # Not store_tile: the scale is applied after the address arithmetic (operation order, blocks.py).
    tl.store(DK + b * s_dkb + h * s_dkh + cols[:, None] * s_dkn + own[None, :] * s_dkd,
             (dk * sm_scale).to(DK.dtype.element_ty), mask=cd_own)
    blocks.store_tile(DV + b * s_dvb + h * s_dvh, cols, s_dvn, own, s_dvd, dv, cd_own)


@triton.jit
def _long_bwd_dq_kernel(Q, K, V, KEEP, DO, LSE, DELTA, DQP,
                        s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                        s_dob, s_doh, s_dom, s_dod, s_keep_b, s_keep_n,
                        H, M, N, D, qk_scale, sm_scale, keys_per_split, n_dchunks,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Regime (b) dQ partial for one key split. Grid (n_splits * n_dchunks, cdiv(M, BLOCK_M), B*H).

    DQP (n_splits, B*H, M, D) fp32; the launcher sums over splits in a fixed order.
    """
    pid_bh = tl.program_id(2)
    split, pid_c = blocks.split_and_chunk(tl.program_id(0), n_dchunks)
    b, h = blocks.batch_head(pid_bh, H)
    rows, rmask = blocks.span(tl.program_id(1) * BLOCK_M, BLOCK_M, M)
    lse, delta = blocks.load_lse_and_delta(LSE, DELTA, pid_bh.to(tl.int64) * M, rows, rmask)
    own, omask = blocks.span(pid_c * BLOCK_D, BLOCK_D, D)
    q_base = Q + b * s_qb + h * s_qh
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    do_base = DO + b * s_dob + h * s_doh
    n_start, n_end = blocks.key_range(split, keys_per_split, N)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols, cmask = blocks.span(n0, BLOCK_N, n_end)
        keep = blocks.load_keep(KEEP + b * s_keep_b, cols, cmask, s_keep_n)
        s, dp = blocks.chunked_dot_t_pair(q_base, s_qm, s_qd, k_base, s_kn, s_kd, do_base, s_dom, s_dod,
                                          v_base, s_vn, s_vd, rows, rmask, cols, cmask,
                                          tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
                                          tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), D, BLOCK_D)
        s = blocks.scaled_logits(s, (keep & cmask)[None, :], qk_scale)
        _, ds = blocks.softmax_grad(s, dp, lse, delta, KEY_MAJOR=False)
        k_own = blocks.load_tile(k_base, cols, s_kn, own, s_kd, cmask[:, None] & omask[None, :])
        dq = tl.dot(ds.to(K.dtype.element_ty), k_own, dq, input_precision="ieee")
    bh_split = split.to(tl.int64) * tl.num_programs(2) + pid_bh
    tl.store(blocks.part_ptrs(DQP, bh_split, M, rows, own, D), dq * sm_scale, mask=rmask[:, None] & omask[None, :])


# Name -> kernel, and the pointer arguments' element types, for ahead-of-time compilation
# (tests/kernels/test_compile_sm90.py). Pointers not listed here carry the q/k/v dtype.
KERNELS = {
    "short_fwd": _short_fwd_kernel,
    "short_bwd": _short_bwd_kernel,
    "long_fwd": _long_fwd_kernel,
    "long_bwd_dkdv": _long_bwd_dkdv_kernel,
    "long_bwd_dq": _long_bwd_dq_kernel,
}
POINTER_ARGS = ("Q", "K", "V", "KEEP", "O", "DO", "DQ", "DK", "DV", "OP", "LP", "LSE", "DELTA", "DKP", "DVP", "DQP")
POINTER_TYPES = {"KEEP": "u8", "OP": "fp32", "LP": "fp32", "LSE": "fp32", "DELTA": "fp32", "DKP": "fp32",
                 "DVP": "fp32", "DQP": "fp32"}

# ============================================================================================
# Launchers
# ============================================================================================


def _forward(q, k, v, keep, scale):
    """Returns (o B×H×M×d in q.dtype, lse (B*H, M) fp32 for regime (b) or an empty tensor)."""
    B, H, M, D = q.shape
    N = k.shape[2]
    device = q.device
    o = host.alloc((B, H, M, D), q.dtype, device)
    if M == 0 or B * H == 0 or N == 0:  # N == 0: no key at all, every row is fully masked
        return o.zero_(), torch.empty(0, dtype=torch.float32, device=device)
    keep_bytes = host.keep_u8(keep, B, N, device)
    qk_scale = scale * blocks.LOG2E
    whole_head_dim = triton.next_power_of_2(D)
    if N <= SHORT_MAX_N:
        constexprs, launch = _config(_entry("short_fwd", q.dtype), BLOCK_N=N, BLOCK_D=whole_head_dim)
        grid = (triton.cdiv(M, constexprs["BLOCK_M"]), B * H)
        _short_fwd_kernel[grid](q, k, v, keep_bytes, o, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                                *keep_bytes.stride(), H, M, N, D, qk_scale, **constexprs, **launch)
        return o, torch.empty(0, dtype=torch.float32, device=device)

    constexprs, launch = _config(_entry("long_fwd", q.dtype, M), BLOCK_D=whole_head_dim)
    n_query_blocks = triton.cdiv(M, constexprs["BLOCK_M"])
    n_dchunks = triton.cdiv(D, constexprs["BLOCK_D"])
    n_splits, keys_per_split = host.split_keys(N, constexprs["BLOCK_N"], n_query_blocks * B * H * n_dchunks,
                                                 device, PROGRAMS_PER_SM)
    o_parts = host.alloc((n_splits, B * H, M, D), torch.float32, device)
    lse_parts = host.alloc((n_splits, B * H, M), torch.float32, device)
    _long_fwd_kernel[(n_splits * n_dchunks, n_query_blocks, B * H)](
        q, k, v, keep_bytes, o_parts, lse_parts, *q.stride(), *k.stride(), *v.stride(), *keep_bytes.stride(), H, M,
        N, D, qk_scale, keys_per_split, n_dchunks, **constexprs, **launch)
    lse = host.alloc((B * H, M), torch.float32, device)
    key_splits.combine_splits(o_parts, lse_parts, o, lse)
    return o, lse


def _backward(do, q, k, v, keep, o, lse, scale):
    """Returns (dq, dk, dv) in the inputs' dtype."""
    B, H, M, D = q.shape
    N = k.shape[2]
    device = q.device
    if M == 0 or N == 0 or B * H == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    keep_bytes = host.keep_u8(keep, B, N, device)
    qk_scale = scale * blocks.LOG2E
    whole_head_dim = triton.next_power_of_2(D)
    if N <= SHORT_MAX_N:
        constexprs, launch = _config(_entry("short_bwd", q.dtype, N=N), BLOCK_N=N, BLOCK_D=whole_head_dim)
        n_dchunks = triton.cdiv(D, constexprs["BLOCK_D"])
        n_query_blocks = triton.cdiv(M, constexprs["BLOCK_M"])
        # About PROGRAMS_PER_SM programs per SM over (chunks × runs × B·H); each run is a contiguous
        # range of query blocks, so each program writes exactly one dK/dV partial.
        n_runs, blocks_per_run = host.split_blocks(n_query_blocks, B * H * n_dchunks, device, PROGRAMS_PER_SM)
        dq = host.alloc((B, H, M, D), q.dtype, device)
        dk_parts = host.alloc((n_runs, B, H, N, D), torch.float32, device)
        dv_parts = host.alloc((n_runs, B, H, N, D), torch.float32, device)
        _short_bwd_kernel[(n_dchunks, n_runs, B * H)](
            q, k, v, keep_bytes, do, dq, dk_parts, dv_parts, *q.stride(), *k.stride(), *v.stride(),
            *do.stride(), *dq.stride(), *keep_bytes.stride(), H, M, N, D, qk_scale, scale, blocks_per_run,
            n_query_blocks, **constexprs, **launch)
        # Fixed-order reduction over runs: deterministic.
        return dq, dk_parts.sum(0).to(k.dtype), dv_parts.sum(0).to(v.dtype)

    delta = key_splits.row_delta(o, do)
    dk = host.alloc(k.shape, k.dtype, device)
    dv = host.alloc(v.shape, v.dtype, device)
    constexprs, launch = _config(_entry("long_bwd_dkdv", q.dtype, M), BLOCK_D=whole_head_dim)
    grid = (triton.cdiv(D, constexprs["BLOCK_D"]), triton.cdiv(N, constexprs["BLOCK_N"]), B * H)
    _long_bwd_dkdv_kernel[grid](
        q, k, v, keep_bytes, do, lse, delta, dk, dv, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
        *keep_bytes.stride(), *dk.stride(), *dv.stride(), H, M, N, D, qk_scale, scale, **constexprs, **launch)

    constexprs, launch = _config(_entry("long_bwd_dq", q.dtype, M), BLOCK_D=whole_head_dim)
    n_dchunks = triton.cdiv(D, constexprs["BLOCK_D"])
    n_query_blocks = triton.cdiv(M, constexprs["BLOCK_M"])
    n_splits, keys_per_split = host.split_keys(N, constexprs["BLOCK_N"], n_query_blocks * B * H * n_dchunks,
                                                 device, PROGRAMS_PER_SM)
    dq_parts = host.alloc((n_splits, B, H, M, D), torch.float32, device)
    _long_bwd_dq_kernel[(n_splits * n_dchunks, n_query_blocks, B * H)](
        q, k, v, keep_bytes, do, lse, delta, dq_parts, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
        *keep_bytes.stride(), H, M, N, D, qk_scale, scale, keys_per_split, n_dchunks, **constexprs, **launch)
    # Fixed-order reduction over splits: deterministic.
    return dq_parts.sum(0).to(q.dtype), dk, dv


# ============================================================================================
# torch.library custom ops (traceable by torch.compile) + autograd
# ============================================================================================

@torch.library.custom_op("crformer::triton_cross_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(o B×H×M×d, lse): lse is (B*H, M) fp32 for N > SHORT_MAX_N, else an empty tensor."""
    return _forward(q, k, v, key_padding_mask, scale)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, key_padding_mask, scale):
    B, H, M, _ = q.shape
    o = q.new_empty(q.shape)
    if k.shape[2] > SHORT_MAX_N:
        return o, q.new_empty((B * H, M), dtype=torch.float32)
    return o, q.new_empty((0,), dtype=torch.float32)


@torch.library.custom_op("crformer::triton_cross_attention_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            key_padding_mask: Optional[torch.Tensor], o: torch.Tensor, lse: torch.Tensor,
            scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the inputs' dtype. ``o``/``lse`` are only read for N > SHORT_MAX_N."""
    return _backward(do, q, k, v, key_padding_mask, o, lse, scale)


@_bwd_op.register_fake
def _bwd_fake(do, q, k, v, key_padding_mask, o, lse, scale):
    return (q.new_empty(q.shape),
            k.new_empty(k.shape),
            v.new_empty(v.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, scale = inputs
    o, lse = output
    # Regime (a) recomputes the softmax and needs neither O nor the LSE: don't keep O alive.
    if k.shape[2] <= SHORT_MAX_N:
        o = lse
    ctx.save_for_backward(q, k, v, key_padding_mask, o, lse)
    ctx.scale = scale


def _backward_rule(ctx, do, dlse):
    q, k, v, key_padding_mask, o, lse = ctx.saved_tensors
    dq, dk, dv = _bwd_op(do, q, k, v, key_padding_mask, o, lse, ctx.scale)
    return dq, dk, dv, None, None


torch.library.register_autograd("crformer::triton_cross_attention_fwd", _backward_rule,
                                setup_context=_setup_context)


def triton_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           key_padding_mask: Optional[torch.Tensor] = None,
                           scale: Optional[float] = None) -> torch.Tensor:
    """Fused cross-attention ``softmax(q kᵀ·scale, masked) v`` (forward and backward in Triton).

    Args:
        q: B×H×M×d; k, v: B×H×N×d. fp32/fp16/bf16 (one dtype), CUDA (or CPU under
           TRITON_INTERPRET=1). Any strides.
        key_padding_mask: optional B×N bool, True = valid key (any pattern).
        scale: softmax scale, default d**-0.5.
    Returns:
        B×H×M×d contiguous, q's dtype; rows with no valid key are 0 (zero gradients).
    Raises:
        ValueError on shape/dtype/device mismatch.
    """
    check_attention_inputs(q, k, v, key_padding_mask, name="triton_cross_attention")
    host.check_kernel_inputs(q, "triton_cross_attention")
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    o, _ = _fwd_op(q, k, v, key_padding_mask, scale)
    return o
