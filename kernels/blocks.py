"""Building blocks of the Triton attention kernels (``cross_attention.py``, ``memory_attention.py``,
``key_splits.py``).

Every step of the attention algorithm that more than one kernel takes is written once here, as an
inlined ``@triton.jit`` helper, so that each kernel reads as its algorithm:

- Grid and tiles: ``batch_head`` / ``split_and_chunk`` decode a program index, ``span`` is a block
  of indices with its bounds mask, ``load_tile`` / ``store_tile`` move a 2-D tile of a strided
  tensor, ``part_ptrs`` addresses the contiguous fp32 partials of split kernels, ``load_keep``
  reads the uint8 key mask.
- Scores: ``chunked_dot_t`` is A Bᵀ over the whole head dim in BLOCK_D-wide chunks (the generic
  kernels cover any d with power-of-two tiles that way, reading each operand row once);
  ``chunked_dot_t_pair`` runs two such products in one pass (a backward's S = Q Kᵀ and dP = dO Vᵀ
  share their row and column indices). ``scaled_logits``: s2 = s · scale · log2(e), -inf at masked
  keys, so the softmax uses exp2.
- Softmax, forward: ``exact_softmax`` when all keys of a row sit in one tile (no running max, no
  rescaling); otherwise ``online_softmax_start`` / ``_step`` / ``_finish`` over the key blocks of
  a flash-decoding split (``key_range``), ending in the normaliser and the log2-sum-exp2 of the row.
- Softmax, backward from the saved log-sum-exp: ``load_lse_and_delta``, ``softmax_grad``
  (P = 2^(s2 - lse), dS = P ⊙ (dP - delta)) and ``accumulate_dkdv`` (dV += Pᵀ dO, dK += dSᵀ Q for
  one head-dim chunk).

The host side (configs, allocation, grids) is ``host.py``.

Operation order is part of a helper's contract. ptxas (sm_90) allocates registers differently when
the same operations come in another order, so each helper emits its operations in the order of the
hand-written kernels it replaced (masks before addresses, as ``tl.load(ptr, mask=...)`` evaluates
them; ``store_tile`` casts after the address), and tests/kernels/test_compile_sm90.py holds every
shipped configuration to its register budget.

Fully masked rows: the exact softmax clamps the row max to 0 and guards 1/l, so P = 0; the online
softmax keeps m = -inf and P = 0 and reports lse = -inf; the combine saves +inf for such rows, so the
backward's 2^(s2 - lse) is 0 there. Padded rows/keys/dims are masked in every load and store (under
TRITON_INTERPRET=1 an out-of-bounds access is a segfault, not an error).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


# ============================================================================================
# Tiles. Index vectors are int32 within one (batch, head) slice; the slice's base pointer carries
# the int64 part (a B·H·M·d tensor can exceed 2^31 elements).
# ============================================================================================


@triton.jit
def batch_head(pid_bh, H):
    """(batch, head) of grid index pid_bh over B*H, as int64 for the base offsets."""
    return (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)


@triton.jit
def split_and_chunk(pid, n_dchunks):
    """(key split, head-dim chunk) of a grid axis over n_splits * n_dchunks, chunks of a split
    adjacent (their repeated reads of the same rows are mostly L2 hits)."""
    return pid // n_dchunks, pid % n_dchunks


@triton.jit
def span(start, BLOCK: tl.constexpr, end):
    """(start + [0, BLOCK), mask of the indices below ``end``)."""
    idx = start + tl.arange(0, BLOCK)
    return idx, idx < end


@triton.jit
def load_tile(base, rows, s_row, cols, s_col, mask):
    """base[rows, cols] as a len(rows) × len(cols) tile, 0 where ``mask`` is False."""
    return tl.load(base + rows[:, None] * s_row + cols[None, :] * s_col, mask=mask, other=0.0)


@triton.jit
def store_tile(base, rows, s_row, cols, s_col, value, mask):
    """base[rows, cols] = value in base's dtype, where ``mask``."""
    tl.store(base + rows[:, None] * s_row + cols[None, :] * s_col, value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def part_ptrs(base, part, n_rows, rows, cols, D):
    """Pointers to [rows, cols] of slice ``part`` (int64) of a contiguous (…, n_rows, D) buffer of
    partials."""
    return base + (part * n_rows + rows[:, None]) * D + cols[None, :]


@triton.jit
def load_keep(keep_base, cols, cmask, s_keep_n):
    """The uint8 key mask of one key block as bool; padded keys read as dropped."""
    return tl.load(keep_base + cols * s_keep_n, mask=cmask, other=0) != 0


@triton.jit
def chunked_dot_t(a_base, s_a, s_ad, b_base, s_b, s_bd, a_rows, a_mask, b_rows, b_mask, acc, D,
                  BLOCK_D: tl.constexpr):
    """acc + A Bᵀ with A = a[a_rows, :D], B = b[b_rows, :D] (S = Q Kᵀ): each operand row is read
    once, one head-dim chunk at a time."""
    dd = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dm = (d0 + dd) < D
        a = load_tile(a_base, a_rows, s_a, d0 + dd, s_ad, a_mask[:, None] & dm[None, :])
        b = load_tile(b_base, b_rows, s_b, d0 + dd, s_bd, b_mask[:, None] & dm[None, :])
        acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
    return acc


@triton.jit
def chunked_dot_t_pair(a_base, s_a, s_ad, b_base, s_b, s_bd, c_base, s_c, s_cd, e_base, s_e, s_ed,
                       x_rows, x_mask, y_rows, y_mask, ab, ce, D, BLOCK_D: tl.constexpr):
    """(ab + A Bᵀ, ce + C Eᵀ) in one pass over the head dim, A and C on rows x_rows, B and E on rows
    y_rows: a backward's S = Q Kᵀ with dP = dO Vᵀ (or, key-major, Sᵀ = K Qᵀ with dPᵀ = V dOᵀ)."""
    dd = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dm = (d0 + dd) < D
        xd = x_mask[:, None] & dm[None, :]
        yd = y_mask[:, None] & dm[None, :]
        a = load_tile(a_base, x_rows, s_a, d0 + dd, s_ad, xd)
        b = load_tile(b_base, y_rows, s_b, d0 + dd, s_bd, yd)
        ab = tl.dot(a, tl.trans(b), ab, input_precision="ieee")
        c = load_tile(c_base, x_rows, s_c, d0 + dd, s_cd, xd)
        e = load_tile(e_base, y_rows, s_e, d0 + dd, s_ed, yd)
        ce = tl.dot(c, tl.trans(e), ce, input_precision="ieee")
    return ab, ce


@triton.jit
def scaled_logits(s, valid, qk_scale):
    """s2 = s · scale · log2(e) (qk_scale holds both), -inf where ``valid`` (broadcast to s) is False."""
    return tl.where(valid, s * qk_scale, float("-inf"))


@triton.jit
def exact_softmax(s2):
    """P = softmax of the s2 logits over the whole key row (BLOCK_M × BLOCK_N, every key of the row in
    this one tile, masked keys -inf), fp32: no running max, no rescaling. A row with no valid key
    keeps m = 0 and l = 0 and gets P = 0 (output 0) instead of NaN."""
    m = tl.max(s2, 1)
    m = tl.where(m == float("-inf"), 0.0, m)
    p = tl.exp2(s2 - m[:, None])
    l = tl.sum(p, 1)
    inv = tl.where(l > 0.0, 1.0 / tl.where(l > 0.0, l, 1.0), 0.0)
    return p * inv[:, None]


@triton.jit
def key_range(split, keys_per_split, N):
    """[n_start, n_end): the keys of flash-decoding split ``split``."""
    n_start = split * keys_per_split
    return n_start, tl.minimum(n_start + keys_per_split, N)


@triton.jit
def online_softmax_start(BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """(running max m_i = -inf, running sum l_i = 0, output accumulator 0) for BLOCK_M rows."""
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    return m_i, l_i, tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)


@triton.jit
def online_softmax_step(s, m_i, l_i):
    """One key block of the online softmax: s2 logits (BLOCK_M × BLOCK_N, masked keys -inf), running
    max m_i and sum l_i -> (P = 2^(s2 - m), rescale factor alpha for the accumulator, new m_i, new
    l_i). A row with no valid key so far keeps m = -inf, P = 0."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def online_softmax_finish(m_i, l_i):
    """(l, log2-sum-exp2 of the row's logits) after the last key block: the output is acc / l[:, None].
    A row that saw no valid key gets l = 1 (its accumulator is 0) and lse -inf."""
    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    return l_safe, tl.where(has, m_i + tl.log2(l_safe), float("-inf"))


@triton.jit
def load_lse_and_delta(LSE, DELTA, row0, rows, rmask):
    """The forward's saved log-sum-exp and delta = rowsum(dO ⊙ O) of rows (LSE/DELTA rows start at
    row0). Padded rows load lse = +inf, so their P = 0; fully masked rows were saved as +inf too."""
    lse = tl.load(LSE + row0 + rows, mask=rmask, other=float("inf"))
    delta = tl.load(DELTA + row0 + rows, mask=rmask, other=0.0)
    return lse, delta


@triton.jit
def softmax_grad(s2, dp, lse, delta, KEY_MAJOR: tl.constexpr):
    """(P = 2^(s2 - lse), dS = P ⊙ (dP - delta)): the softmax recomputed from the forward's saved
    log-sum-exp, and the gradient w.r.t. the scaled logits. s2/dp are BLOCK_M × BLOCK_N, or
    BLOCK_N × BLOCK_M if KEY_MAJOR; lse and delta are per query row."""
    if KEY_MAJOR:
        p = tl.exp2(s2 - lse[None, :])
        ds = p * (dp - delta[None, :])
    else:
        p = tl.exp2(s2 - lse[:, None])
        ds = p * (dp - delta[:, None])
    return p, ds


@triton.jit
def accumulate_dkdv(p, ds, q_base, s_qm, s_qd, do_base, s_dom, s_dod, rows, own, rd_own, dk, dv,
                    KEY_MAJOR: tl.constexpr):
    """(dk + dSᵀ Q[rows, own], dv + Pᵀ dO[rows, own]): one query block's share of the key and value
    gradients in head-dim chunk ``own`` (rd_own masks the [rows, own] tiles). p/ds are P and dS
    (BLOCK_M × BLOCK_N), or already Pᵀ and dSᵀ if KEY_MAJOR. dk still lacks the softmax scale."""
    q_own = load_tile(q_base, rows, s_qm, own, s_qd, rd_own)
    do_own = load_tile(do_base, rows, s_dom, own, s_dod, rd_own)
    if KEY_MAJOR:
        dv = tl.dot(p.to(do_own.dtype), do_own, dv, input_precision="ieee")
        dk = tl.dot(ds.to(q_own.dtype), q_own, dk, input_precision="ieee")
    else:
        dv = tl.dot(tl.trans(p.to(do_own.dtype)), do_own, dv, input_precision="ieee")
        dk = tl.dot(tl.trans(ds.to(q_own.dtype)), q_own, dk, input_precision="ieee")
    return dk, dv
