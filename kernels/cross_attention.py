"""Fused Triton cross-attention, forward and backward (DESIGN.md §3 "Kernels").

Public API::

    triton_cross_attention(q, k, v, key_padding_mask=None, scale=None) -> Tensor

    q: B×H×M×d, k/v: B×H×N×d (same dtype/device; fp32, fp16 or bf16; any strides),
    key_padding_mask: B×N bool (True = keep; any pattern) or None, scale: default d**-0.5.
    Returns B×H×M×d in q's dtype. Rows with no valid key give 0 and zero gradients.

The oracle is ``crformer.ops.attention.reference_cross_attention``.

Layout of this file (flash-attention ``ops/triton`` style): the shipped-config table, the Triton
kernels, their launchers, then the ``torch.library.custom_op`` pair (forward / backward) with fake
implementations and ``register_autograd``. Everything accumulates in fp32.

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
DESIGN.md §6) and owns one BLOCK_D slice of the outputs. Chunk programs of the same block are
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

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from crformer.ops.attention import check_attention_inputs

__all__ = ["triton_cross_attention", "SHORT_MAX_N", "KERNEL_TABLE", "KERNELS", "shipped_configs"]

# Kernels are decorated at import; TRITON_INTERPRET decides then whether they run on CPU tensors
# (and it must already have been set when triton itself was imported: tests/kernels/conftest.py).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

SHORT_MAX_N = 64  # regime (a) holds all keys of a row in one register tile of at most this width
# Key splits (regime b) and query runs (regime a backward) aim at this many programs per SM: enough
# to hide memory latency, few enough that the partials stay small (benchmarks/tune_kernels.py).
PROGRAMS_PER_SM = 2
_LOG2E = 1.4426950408889634

# --------------------------------------------------------------------------------------------
# Shipped configurations: the single source of truth for the launchers below AND for
# tests/kernels/test_compile_sm90.py, which compiles every entry for sm_90 with ptxas and fails on
# any spill or a missing tensor-core instruction. One entry = one kernel with its launch options:
#   kernel:  key into KERNELS        dtypes: q/k/v dtypes it is shipped for
#   choices: constexpr -> values the launcher may pick (the cartesian product is shipped)
#   fixed:   constexprs that never change for this entry
#   mma:     instruction expected on sm_90: "wgmma"; "mma" (mma.sync) where the 16-row query tile
#            is below wgmma's 64-row warpgroup minimum (CDec: M ~ 16 queries; these kernels are
#            HBM-bound, tensor-core time is a few % of the byte floor, DESIGN.md §6); "fma" for fp32,
#            whose dots use input_precision="ieee" (exact fp32 on CUDA cores, see the top);
#            None = no tl.dot.
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
KERNEL_TABLE = {
    # regime (a) forward / backward; BLOCK_N = smallest shipped power of two >= N.
    "short_fwd": dict(kernel="short_fwd", dtypes=_LOWP, choices={"BLOCK_N": (16, 32, 64), "BLOCK_D": (32, 64, 128)},
                      fixed={"BLOCK_M": 64}, num_warps=4, num_stages=2, mma="wgmma"),
    "short_fwd_fp32": dict(kernel="short_fwd", dtypes=("fp32",), choices={"BLOCK_N": (16, 32, 64)},
                           fixed={"BLOCK_M": 32, "BLOCK_D": 32}, num_warps=8, num_stages=1, mma="fma"),
    "short_bwd": dict(kernel="short_bwd", dtypes=_LOWP, choices={"BLOCK_N": (16, 32), "BLOCK_D": (32, 64)},
                      fixed={"BLOCK_M": 64}, num_warps=4, num_stages=2, mma="wgmma"),
    # 33-64 keys: the 4-warp tile spills under triton 3.6's ptxas (not 3.8's), so 8 warps, 1 stage.
    "short_bwd_n64": dict(kernel="short_bwd", dtypes=_LOWP, choices={"BLOCK_D": (32, 64)},
                          fixed={"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=1, mma="wgmma"),
    "short_bwd_fp32": dict(kernel="short_bwd", dtypes=("fp32",), choices={"BLOCK_N": (16, 32, 64)},
                           fixed={"BLOCK_M": 32, "BLOCK_D": 32}, num_warps=8, num_stages=1, mma="fma"),
    # regime (b) forward split: 16-row tile for the CDec shape (M <= 16), 64-row tile for large M.
    "long_fwd_m16": dict(kernel="long_fwd", dtypes=_LOWP, choices={"BLOCK_D": (32, 64)},
                         fixed={"BLOCK_M": 16, "BLOCK_N": 128}, num_warps=4, num_stages=1, mma="mma"),
    "long_fwd_m64": dict(kernel="long_fwd", dtypes=_LOWP, choices={"BLOCK_D": (32, 64, 128)},
                         fixed={"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=3, mma="wgmma"),
    "long_fwd_fp32": dict(kernel="long_fwd", dtypes=("fp32",), choices={},
                          fixed={"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_D": 32}, num_warps=4, num_stages=2, mma="fma"),
    # log-sum-exp combine of the split partials, and delta = rowsum(dO ⊙ O): no dot.
    "long_combine": dict(kernel="long_combine", dtypes=("fp32",) + _LOWP, choices={},
                         fixed={"BLOCK_M": 16, "BLOCK_D": 64}, num_warps=4, num_stages=1, mma=None),
    "long_bwd_delta": dict(kernel="long_bwd_delta", dtypes=("fp32",) + _LOWP, choices={},
                           fixed={"BLOCK_M": 16, "BLOCK_D": 64}, num_warps=4, num_stages=1, mma=None),
    # regime (b) dK/dV: key-major (S^T = K Q^T), so the MMA M dimension is the 64-key block and all
    # its dots can use wgmma even with a 16-row query tile.
    "long_bwd_dkdv_m16": dict(kernel="long_bwd_dkdv", dtypes=_LOWP, choices={"BLOCK_D": (32, 64)},
                              fixed={"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=4, num_stages=1, mma="wgmma"),
    "long_bwd_dkdv_m64": dict(kernel="long_bwd_dkdv", dtypes=_LOWP, choices={"BLOCK_D": (32, 64)},
                              fixed={"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=1, mma="wgmma"),
    "long_bwd_dkdv_fp32": dict(kernel="long_bwd_dkdv", dtypes=("fp32",), choices={},
                               fixed={"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_D": 32}, num_warps=8, num_stages=1,
                               mma="fma"),
    # regime (b) dQ partials per key split; same tile argument as the forward.
    "long_bwd_dq_m16": dict(kernel="long_bwd_dq", dtypes=_LOWP, choices={"BLOCK_D": (32, 64)},
                            fixed={"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=4, num_stages=2, mma="mma"),
    "long_bwd_dq_m64": dict(kernel="long_bwd_dq", dtypes=_LOWP, choices={"BLOCK_D": (32, 64)},
                            fixed={"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=2, mma="wgmma"),
    "long_bwd_dq_fp32": dict(kernel="long_bwd_dq", dtypes=("fp32",), choices={},
                             fixed={"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_D": 32}, num_warps=4, num_stages=2,
                             mma="fma"),
}
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def shipped_configs(table: dict = KERNEL_TABLE):
    """Yield (entry, kernel name, dtype name, constexprs, num_warps, num_stages, mma) for every
    shipped configuration of ``table`` (this module's, or another kernel module's in this format)."""
    import itertools

    for entry, spec in table.items():
        keys = list(spec["choices"])
        for values in itertools.product(*(spec["choices"][k] for k in keys)):
            cx = dict(spec["fixed"], **dict(zip(keys, values)))
            for dt in spec["dtypes"]:
                yield entry, spec["kernel"], dt, cx, spec["num_warps"], spec["num_stages"], spec["mma"]


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


def _config(entry: str, table: dict = KERNEL_TABLE, **want) -> tuple[dict, dict]:
    """Constexprs + launch options of a ``table`` entry. ``want`` gives preferred tile sizes:
    BLOCK_N takes the smallest shipped value >= want (it must cover all keys in regime (a)),
    others the largest shipped value <= want; fixed constexprs ignore ``want``."""
    spec = table[entry]
    cx = dict(spec["fixed"])
    for key, vals in spec["choices"].items():
        w = want[key]
        if key == "BLOCK_N":
            ok = [x for x in vals if x >= w]
            cx[key] = min(ok) if ok else max(vals)
        else:
            ok = [x for x in vals if x <= w]
            cx[key] = max(ok) if ok else min(vals)
    return cx, {"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]}


# ============================================================================================
# Kernels. Conventions: pid over (batch*head) is the last grid axis; base offsets are int64 (a
# B·H·M·d tensor can exceed 2^31 elements); s2 = scores * scale * log2(e) so softmax uses exp2.
# KEEP is the B×N key mask as uint8 (1 = valid).
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
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    rmask = rows < M
    cmask = cols < N
    q_base = Q + b * s_qb + h * s_qh
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    o_base = O + b * s_ob + h * s_oh
    keep = tl.load(KEEP + b * s_keep_b + cols * s_keep_n, mask=cmask, other=0) != 0

    # Pass 1: S = Q K^T over the full head dim (Q is read exactly once).
    s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dm = (d0 + dd) < D
        q = tl.load(q_base + rows[:, None] * s_qm + (d0 + dd)[None, :] * s_qd,
                    mask=rmask[:, None] & dm[None, :], other=0.0)
        k = tl.load(k_base + cols[:, None] * s_kn + (d0 + dd)[None, :] * s_kd,
                    mask=cmask[:, None] & dm[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), s, input_precision="ieee")

    # Exact softmax over the whole key row. Masked keys -> -inf; a row with no valid key keeps
    # m = 0 and l = 0 and gets P = 0 (output 0) instead of NaN.
    s = tl.where((keep & cmask)[None, :], s * qk_scale, float("-inf"))
    m = tl.max(s, 1)
    m = tl.where(m == float("-inf"), 0.0, m)
    p = tl.exp2(s - m[:, None])
    l = tl.sum(p, 1)
    inv = tl.where(l > 0.0, 1.0 / tl.where(l > 0.0, l, 1.0), 0.0)
    p = (p * inv[:, None]).to(V.dtype.element_ty)

    # Pass 2: O = P V, one head-dim chunk at a time (O is written exactly once).
    for d0 in range(0, D, BLOCK_D):
        dm = (d0 + dd) < D
        v = tl.load(v_base + cols[:, None] * s_vn + (d0 + dd)[None, :] * s_vd,
                    mask=cmask[:, None] & dm[None, :], other=0.0)
        o = tl.dot(p, v, input_precision="ieee")
        tl.store(o_base + rows[:, None] * s_om + (d0 + dd)[None, :] * s_od, o.to(O.dtype.element_ty),
                 mask=rmask[:, None] & dm[None, :])


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
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    cmask = cols < N
    own = pid_c * BLOCK_D + dd
    omask = own < D
    q_base = Q + b * s_qb + h * s_qh
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    do_base = DO + b * s_dob + h * s_doh
    dq_base = DQ + b * s_dqb + h * s_dqh
    keep = tl.load(KEEP + b * s_keep_b + cols * s_keep_n, mask=cmask, other=0) != 0
    valid = keep & cmask
    # This chunk's K slice is reused by every query block of the run.
    k_own = tl.load(k_base + cols[:, None] * s_kn + own[None, :] * s_kd,
                    mask=cmask[:, None] & omask[None, :], other=0.0)

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    mb_start = pid_r * blocks_per_run
    mb_end = tl.minimum(mb_start + blocks_per_run, n_mblocks)
    for mb in range(mb_start, mb_end):
        rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        dp = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dm = (d0 + dd) < D
            rd = rmask[:, None] & dm[None, :]
            cd = cmask[:, None] & dm[None, :]
            q = tl.load(q_base + rows[:, None] * s_qm + (d0 + dd)[None, :] * s_qd, mask=rd, other=0.0)
            k = tl.load(k_base + cols[:, None] * s_kn + (d0 + dd)[None, :] * s_kd, mask=cd, other=0.0)
            s = tl.dot(q, tl.trans(k), s, input_precision="ieee")
            do = tl.load(do_base + rows[:, None] * s_dom + (d0 + dd)[None, :] * s_dod, mask=rd, other=0.0)
            v = tl.load(v_base + cols[:, None] * s_vn + (d0 + dd)[None, :] * s_vd, mask=cd, other=0.0)
            dp = tl.dot(do, tl.trans(v), dp, input_precision="ieee")
        # Recompute the exact softmax (same arithmetic as the forward).
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        m = tl.max(s, 1)
        m = tl.where(m == float("-inf"), 0.0, m)
        p = tl.exp2(s - m[:, None])
        l = tl.sum(p, 1)
        inv = tl.where(l > 0.0, 1.0 / tl.where(l > 0.0, l, 1.0), 0.0)
        p = p * inv[:, None]
        p = tl.where(rmask[:, None], p, 0.0)  # padded rows contribute nothing to dK/dV
        # delta = rowsum(P ⊙ dP) = rowsum(dO ⊙ O): no saved O needed.
        delta = tl.sum(p * dp, 1)
        ds = p * (dp - delta[:, None])  # gradient w.r.t. the scaled logits
        rd_own = rmask[:, None] & omask[None, :]
        dq = tl.dot(ds.to(K.dtype.element_ty), k_own, input_precision="ieee") * sm_scale
        tl.store(dq_base + rows[:, None] * s_dqm + own[None, :] * s_dqd, dq.to(DQ.dtype.element_ty),
                 mask=rd_own)
        q_own = tl.load(q_base + rows[:, None] * s_qm + own[None, :] * s_qd, mask=rd_own, other=0.0)
        do_own = tl.load(do_base + rows[:, None] * s_dom + own[None, :] * s_dod, mask=rd_own, other=0.0)
        dv = tl.dot(tl.trans(p.to(DO.dtype.element_ty)), do_own, dv, input_precision="ieee")
        dk = tl.dot(tl.trans(ds.to(Q.dtype.element_ty)), q_own, dk, input_precision="ieee")

    # Partials are contiguous (n_runs, B*H, N, D) fp32.
    part = (pid_r.to(tl.int64) * tl.num_programs(2) + pid_bh) * N * D
    offs = part + cols[:, None] * D + own[None, :]
    cd_own = cmask[:, None] & omask[None, :]
    tl.store(DKP + offs, dk * sm_scale, mask=cd_own)
    tl.store(DVP + offs, dv, mask=cd_own)


@triton.jit
def online_softmax_step(s, m_i, l_i):
    """One key block of the online softmax (regime b): s2 logits (BLOCK_M × BLOCK_N, masked keys
    -inf), running max m_i and sum l_i -> (P = 2^(s2 - m), rescale factor alpha for the
    accumulator, new m_i, new l_i). A row with no valid key so far keeps m = -inf, P = 0."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


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
    pid_0 = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_bh = tl.program_id(2)
    split = pid_0 // n_dchunks
    pid_c = pid_0 % n_dchunks
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    dd = tl.arange(0, BLOCK_D)
    own = pid_c * BLOCK_D + dd
    omask = own < D
    q_base = Q + b * s_qb + h * s_qh
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    n_start = split * keys_per_split
    n_end = tl.minimum(n_start + keys_per_split, N)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < n_end
        keep = tl.load(KEEP + b * s_keep_b + cols * s_keep_n, mask=cmask, other=0) != 0
        s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dm = (d0 + dd) < D
            q = tl.load(q_base + rows[:, None] * s_qm + (d0 + dd)[None, :] * s_qd,
                        mask=rmask[:, None] & dm[None, :], other=0.0)
            k = tl.load(k_base + cols[:, None] * s_kn + (d0 + dd)[None, :] * s_kd,
                        mask=cmask[:, None] & dm[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k), s, input_precision="ieee")
        s = tl.where((keep & cmask)[None, :], s * qk_scale, float("-inf"))
        p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i)
        v = tl.load(v_base + cols[:, None] * s_vn + own[None, :] * s_vd,
                    mask=cmask[:, None] & omask[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(V.dtype.element_ty), v, acc, input_precision="ieee")

    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(has, m_i + tl.log2(l_safe), float("-inf"))
    bh_split = split.to(tl.int64) * tl.num_programs(2) + pid_bh
    tl.store(OP + (bh_split * M + rows[:, None]) * D + own[None, :], o,
             mask=rmask[:, None] & omask[None, :])
    tl.store(LP + bh_split * M + rows, lse, mask=rmask & (pid_c == 0))


@triton.jit
def _long_combine_kernel(OP, LP, O, LSE, s_ob, s_oh, s_om, s_od, H, M, D, n_splits, n_bh,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merge split partials by log-sum-exp. Grid (cdiv(M, BLOCK_M), B*H).

    O = Σ_s 2^(lse_s - lse) · o_s with lse = log2 Σ_s 2^lse_s; LSE (B*H, M) fp32 saved for the
    backward, +inf where a row has no valid key (so the backward's P = 2^(s - lse) is 0 there).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    dd = tl.arange(0, BLOCK_D)
    mx = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    for sp in range(0, n_splits):
        ls = tl.load(LP + (sp * n_bh + pid_bh).to(tl.int64) * M + rows, mask=rmask, other=float("-inf"))
        mx = tl.maximum(mx, ls)
    m_safe = tl.where(mx == float("-inf"), 0.0, mx)
    den = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for sp in range(0, n_splits):
        ls = tl.load(LP + (sp * n_bh + pid_bh).to(tl.int64) * M + rows, mask=rmask, other=float("-inf"))
        den += tl.exp2(ls - m_safe)
    has = den > 0.0
    den_safe = tl.where(has, den, 1.0)
    inv = tl.where(has, 1.0 / den_safe, 0.0)
    tl.store(LSE + pid_bh.to(tl.int64) * M + rows, tl.where(has, m_safe + tl.log2(den_safe), float("inf")),
             mask=rmask)
    for d0 in range(0, D, BLOCK_D):
        dm = (d0 + dd) < D
        rd = rmask[:, None] & dm[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for sp in range(0, n_splits):
            base = (sp * n_bh + pid_bh).to(tl.int64) * M
            ls = tl.load(LP + base + rows, mask=rmask, other=float("-inf"))
            w = tl.exp2(ls - m_safe) * inv
            op = tl.load(OP + (base + rows[:, None]) * D + (d0 + dd)[None, :], mask=rd, other=0.0)
            acc += w[:, None] * op
        tl.store(O + b * s_ob + h * s_oh + rows[:, None] * s_om + (d0 + dd)[None, :] * s_od,
                 acc.to(O.dtype.element_ty), mask=rd)


@triton.jit
def _long_bwd_delta_kernel(O, DO, DELTA, s_ob, s_oh, s_om, s_od, s_dob, s_doh, s_dom, s_dod, H, M, D,
                           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta = rowsum(dO ⊙ O) in fp32, (B*H, M). Grid (cdiv(M, BLOCK_M), B*H)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    dd = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dm = (d0 + dd) < D
        rd = rmask[:, None] & dm[None, :]
        o = tl.load(O + b * s_ob + h * s_oh + rows[:, None] * s_om + (d0 + dd)[None, :] * s_od, mask=rd, other=0.0)
        do = tl.load(DO + b * s_dob + h * s_doh + rows[:, None] * s_dom + (d0 + dd)[None, :] * s_dod,
                     mask=rd, other=0.0)
        acc += tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * M + rows, acc, mask=rmask)


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
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    dd = tl.arange(0, BLOCK_D)
    own = pid_c * BLOCK_D + dd
    omask = own < D
    q_base = Q + b * s_qb + h * s_qh
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    do_base = DO + b * s_dob + h * s_doh
    keep = tl.load(KEEP + b * s_keep_b + cols * s_keep_n, mask=cmask, other=0) != 0
    valid = keep & cmask
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < M
        st = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        dpt = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dm = (d0 + dd) < D
            rd = rmask[:, None] & dm[None, :]
            cd = cmask[:, None] & dm[None, :]
            k = tl.load(k_base + cols[:, None] * s_kn + (d0 + dd)[None, :] * s_kd, mask=cd, other=0.0)
            q = tl.load(q_base + rows[:, None] * s_qm + (d0 + dd)[None, :] * s_qd, mask=rd, other=0.0)
            st = tl.dot(k, tl.trans(q), st, input_precision="ieee")
            v = tl.load(v_base + cols[:, None] * s_vn + (d0 + dd)[None, :] * s_vd, mask=cd, other=0.0)
            do = tl.load(do_base + rows[:, None] * s_dom + (d0 + dd)[None, :] * s_dod, mask=rd, other=0.0)
            dpt = tl.dot(v, tl.trans(do), dpt, input_precision="ieee")
        # Padded rows load lse = +inf -> P = 0. Fully masked rows have lse = +inf too.
        lse = tl.load(LSE + pid_bh.to(tl.int64) * M + rows, mask=rmask, other=float("inf"))
        delta = tl.load(DELTA + pid_bh.to(tl.int64) * M + rows, mask=rmask, other=0.0)
        st = tl.where(valid[:, None], st * qk_scale, float("-inf"))
        pt = tl.exp2(st - lse[None, :])
        dst = pt * (dpt - delta[None, :])
        rd_own = rmask[:, None] & omask[None, :]
        q_own = tl.load(q_base + rows[:, None] * s_qm + own[None, :] * s_qd, mask=rd_own, other=0.0)
        do_own = tl.load(do_base + rows[:, None] * s_dom + own[None, :] * s_dod, mask=rd_own, other=0.0)
        dv = tl.dot(pt.to(DO.dtype.element_ty), do_own, dv, input_precision="ieee")
        dk = tl.dot(dst.to(Q.dtype.element_ty), q_own, dk, input_precision="ieee")
    cd_own = cmask[:, None] & omask[None, :]
    tl.store(DK + b * s_dkb + h * s_dkh + cols[:, None] * s_dkn + own[None, :] * s_dkd,
             (dk * sm_scale).to(DK.dtype.element_ty), mask=cd_own)
    tl.store(DV + b * s_dvb + h * s_dvh + cols[:, None] * s_dvn + own[None, :] * s_dvd,
             dv.to(DV.dtype.element_ty), mask=cd_own)


@triton.jit
def _long_bwd_dq_kernel(Q, K, V, KEEP, DO, LSE, DELTA, DQP,
                        s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                        s_dob, s_doh, s_dom, s_dod, s_keep_b, s_keep_n,
                        H, M, N, D, qk_scale, sm_scale, keys_per_split, n_dchunks,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Regime (b) dQ partial for one key split. Grid (n_splits * n_dchunks, cdiv(M, BLOCK_M), B*H).

    DQP (n_splits, B*H, M, D) fp32; the launcher sums over splits in a fixed order.
    """
    pid_0 = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_bh = tl.program_id(2)
    split = pid_0 // n_dchunks
    pid_c = pid_0 % n_dchunks
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    dd = tl.arange(0, BLOCK_D)
    own = pid_c * BLOCK_D + dd
    omask = own < D
    q_base = Q + b * s_qb + h * s_qh
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    do_base = DO + b * s_dob + h * s_doh
    lse = tl.load(LSE + pid_bh.to(tl.int64) * M + rows, mask=rmask, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * M + rows, mask=rmask, other=0.0)
    n_start = split * keys_per_split
    n_end = tl.minimum(n_start + keys_per_split, N)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < n_end
        keep = tl.load(KEEP + b * s_keep_b + cols * s_keep_n, mask=cmask, other=0) != 0
        s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        dp = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dm = (d0 + dd) < D
            rd = rmask[:, None] & dm[None, :]
            cd = cmask[:, None] & dm[None, :]
            q = tl.load(q_base + rows[:, None] * s_qm + (d0 + dd)[None, :] * s_qd, mask=rd, other=0.0)
            k = tl.load(k_base + cols[:, None] * s_kn + (d0 + dd)[None, :] * s_kd, mask=cd, other=0.0)
            s = tl.dot(q, tl.trans(k), s, input_precision="ieee")
            do = tl.load(do_base + rows[:, None] * s_dom + (d0 + dd)[None, :] * s_dod, mask=rd, other=0.0)
            v = tl.load(v_base + cols[:, None] * s_vn + (d0 + dd)[None, :] * s_vd, mask=cd, other=0.0)
            dp = tl.dot(do, tl.trans(v), dp, input_precision="ieee")
        s = tl.where((keep & cmask)[None, :], s * qk_scale, float("-inf"))
        p = tl.exp2(s - lse[:, None])
        ds = p * (dp - delta[:, None])
        k_own = tl.load(k_base + cols[:, None] * s_kn + own[None, :] * s_kd,
                        mask=cmask[:, None] & omask[None, :], other=0.0)
        dq = tl.dot(ds.to(K.dtype.element_ty), k_own, dq, input_precision="ieee")
    bh_split = split.to(tl.int64) * tl.num_programs(2) + pid_bh
    tl.store(DQP + (bh_split * M + rows[:, None]) * D + own[None, :], dq * sm_scale,
             mask=rmask[:, None] & omask[None, :])


# Name -> kernel, and the pointer arguments' element types, for ahead-of-time compilation
# (tests/kernels/test_compile_sm90.py). Pointers not listed here carry the q/k/v dtype.
KERNELS = {
    "short_fwd": _short_fwd_kernel,
    "short_bwd": _short_bwd_kernel,
    "long_fwd": _long_fwd_kernel,
    "long_combine": _long_combine_kernel,
    "long_bwd_delta": _long_bwd_delta_kernel,
    "long_bwd_dkdv": _long_bwd_dkdv_kernel,
    "long_bwd_dq": _long_bwd_dq_kernel,
}
POINTER_ARGS = ("Q", "K", "V", "KEEP", "O", "DO", "DQ", "DK", "DV", "OP", "LP", "LSE", "DELTA", "DKP", "DVP", "DQP")
POINTER_TYPES = {"KEEP": "u8", "OP": "fp32", "LP": "fp32", "LSE": "fp32", "DELTA": "fp32", "DKP": "fp32",
                 "DVP": "fp32", "DQP": "fp32"}

# ============================================================================================
# Launchers
# ============================================================================================

def _alloc(shape, dtype, device):
    """Every buffer a kernel must fully write comes from here (tests swap in a NaN-filled version)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    # Interpreter: pretend to be a tiny GPU so that small test shapes still exercise several
    # key splits / query runs.
    return 2


def _strides4(t):
    return tuple(t.stride())


def check_kernel_inputs(q, name: str) -> None:
    """ValueError unless q (whose shape/dtype/device checks the inputs already agree with) has a
    dtype and device these kernels run on."""
    if q.dtype not in _DTYPES:
        raise ValueError(f"{name} needs fp32/fp16/bf16 inputs; got {q.dtype}")
    if q.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"{name} needs CUDA tensors (or TRITON_INTERPRET=1 set before importing "
                         f"{__name__}); got {q.device}")


def _check(q, k, v, keep):
    check_attention_inputs(q, k, v, keep, name="triton_cross_attention")
    check_kernel_inputs(q, "triton_cross_attention")


def _keep_u8(keep, B, N, device):
    if keep is None:
        return torch.ones((B, N), dtype=torch.uint8, device=device)
    return keep.view(torch.uint8)  # zero-copy; strides passed to the kernel


def _long_splits(n_blocks_other: int, N: int, BLOCK_N: int, device) -> tuple[int, int]:
    """(n_splits, keys_per_split): about PROGRAMS_PER_SM programs per SM in total, whole key blocks
    per split."""
    n_kblocks = triton.cdiv(N, BLOCK_N)
    want = max(1, min(n_kblocks, triton.cdiv(PROGRAMS_PER_SM * _num_sms(device), max(1, n_blocks_other))))
    keys_per_split = triton.cdiv(n_kblocks, want) * BLOCK_N
    return triton.cdiv(N, keys_per_split), keys_per_split


def _forward(q, k, v, keep, scale):
    """Returns (o B×H×M×d in q.dtype, lse (B*H, M) fp32 for regime (b) or an empty tensor)."""
    B, H, M, D = q.shape
    N = k.shape[2]
    dev = q.device
    o = _alloc((B, H, M, D), q.dtype, dev)
    if M == 0 or B * H == 0 or N == 0:  # N == 0: no key at all, every row is fully masked
        return o.zero_(), torch.empty(0, dtype=torch.float32, device=dev)
    ku8 = _keep_u8(keep, B, N, dev)
    qk_scale = scale * _LOG2E
    d_pow2 = triton.next_power_of_2(D)
    if N <= SHORT_MAX_N:
        cx, opts = _config(_entry("short_fwd", q.dtype), BLOCK_N=N, BLOCK_D=d_pow2)
        grid = (triton.cdiv(M, cx["BLOCK_M"]), B * H)
        _short_fwd_kernel[grid](q, k, v, ku8, o, *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(o),
                                ku8.stride(0), ku8.stride(1), H, M, N, D, qk_scale, **cx, **opts)
        return o, torch.empty(0, dtype=torch.float32, device=dev)

    cx, opts = _config(_entry("long_fwd", q.dtype, M), BLOCK_D=d_pow2)
    n_m = triton.cdiv(M, cx["BLOCK_M"])
    n_dc = triton.cdiv(D, cx["BLOCK_D"])
    n_splits, kps = _long_splits(n_m * B * H * n_dc, N, cx["BLOCK_N"], dev)
    op = _alloc((n_splits, B * H, M, D), torch.float32, dev)
    lp = _alloc((n_splits, B * H, M), torch.float32, dev)
    _long_fwd_kernel[(n_splits * n_dc, n_m, B * H)](
        q, k, v, ku8, op, lp, *_strides4(q), *_strides4(k), *_strides4(v), ku8.stride(0), ku8.stride(1),
        H, M, N, D, qk_scale, kps, n_dc, **cx, **opts)
    lse = _alloc((B * H, M), torch.float32, dev)
    cx, opts = _config("long_combine")
    _long_combine_kernel[(triton.cdiv(M, cx["BLOCK_M"]), B * H)](
        op, lp, o, lse, *_strides4(o), H, M, D, n_splits, B * H, **cx, **opts)
    return o, lse


def _backward(do, q, k, v, keep, o, lse, scale):
    """Returns (dq, dk, dv) in the inputs' dtype."""
    B, H, M, D = q.shape
    N = k.shape[2]
    dev = q.device
    if M == 0 or N == 0 or B * H == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    ku8 = _keep_u8(keep, B, N, dev)
    qk_scale = scale * _LOG2E
    d_pow2 = triton.next_power_of_2(D)
    if N <= SHORT_MAX_N:
        cx, opts = _config(_entry("short_bwd", q.dtype, N=N), BLOCK_N=N, BLOCK_D=d_pow2)
        n_dc = triton.cdiv(D, cx["BLOCK_D"])
        n_mb = triton.cdiv(M, cx["BLOCK_M"])
        # About PROGRAMS_PER_SM programs per SM over (chunks × runs × B·H); each run is a contiguous
        # range of query blocks, so each program writes exactly one dK/dV partial.
        n_runs = max(1, min(n_mb, triton.cdiv(PROGRAMS_PER_SM * _num_sms(dev), B * H * n_dc)))
        bpr = triton.cdiv(n_mb, n_runs)
        n_runs = triton.cdiv(n_mb, bpr)
        dq = _alloc((B, H, M, D), q.dtype, dev)
        dkp = _alloc((n_runs, B, H, N, D), torch.float32, dev)
        dvp = _alloc((n_runs, B, H, N, D), torch.float32, dev)
        _short_bwd_kernel[(n_dc, n_runs, B * H)](
            q, k, v, ku8, do, dq, dkp, dvp, *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(do),
            *_strides4(dq), ku8.stride(0), ku8.stride(1), H, M, N, D, qk_scale, scale, bpr, n_mb, **cx, **opts)
        # Fixed-order reduction over runs: deterministic.
        return dq, dkp.sum(0).to(k.dtype), dvp.sum(0).to(v.dtype)

    delta = _alloc((B * H, M), torch.float32, dev)
    cx, opts = _config("long_bwd_delta")
    _long_bwd_delta_kernel[(triton.cdiv(M, cx["BLOCK_M"]), B * H)](
        o, do, delta, *_strides4(o), *_strides4(do), H, M, D, **cx, **opts)

    dk = _alloc(k.shape, k.dtype, dev)
    dv = _alloc(v.shape, v.dtype, dev)
    cx, opts = _config(_entry("long_bwd_dkdv", q.dtype, M), BLOCK_D=d_pow2)
    n_dc = triton.cdiv(D, cx["BLOCK_D"])
    _long_bwd_dkdv_kernel[(n_dc, triton.cdiv(N, cx["BLOCK_N"]), B * H)](
        q, k, v, ku8, do, lse, delta, dk, dv, *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(do),
        ku8.stride(0), ku8.stride(1), *_strides4(dk), *_strides4(dv), H, M, N, D, qk_scale, scale, **cx, **opts)

    cx, opts = _config(_entry("long_bwd_dq", q.dtype, M), BLOCK_D=d_pow2)
    n_dc = triton.cdiv(D, cx["BLOCK_D"])
    n_m = triton.cdiv(M, cx["BLOCK_M"])
    n_splits, kps = _long_splits(n_m * B * H * n_dc, N, cx["BLOCK_N"], dev)
    dqp = _alloc((n_splits, B, H, M, D), torch.float32, dev)
    _long_bwd_dq_kernel[(n_splits * n_dc, n_m, B * H)](
        q, k, v, ku8, do, lse, delta, dqp, *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(do),
        ku8.stride(0), ku8.stride(1), H, M, N, D, qk_scale, scale, kps, n_dc, **cx, **opts)
    # Fixed-order reduction over splits: deterministic.
    return dqp.sum(0).to(q.dtype), dk, dv


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
    _check(q, k, v, key_padding_mask)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    o, _ = _fwd_op(q, k, v, key_padding_mask, scale)
    return o
