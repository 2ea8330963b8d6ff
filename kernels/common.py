"""Building blocks of the Triton attention kernels (``cross_attention.py``, ``memory_attention.py``).

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
- Key splits: the kernel that merges split partials by log-sum-exp and the one for
  delta = rowsum(dO ⊙ O), with their launchers ``combine_splits`` and ``row_delta``.

The host side that both launchers use is here too: the shipped-config table format (``shipped``,
``shipped_configs``, ``config``), the allocator ``alloc`` (tests swap in a NaN-filled one), the
uint8 key mask, how work is spread over the SMs (``split_blocks``, ``split_keys``) and the
dtype/device check of the kernels.

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

import itertools
import os

import torch
import triton
import triton.language as tl

__all__ = [
    "INTERPRET", "LOG2E", "DTYPES", "KERNEL_TABLE", "KERNELS", "POINTER_ARGS", "POINTER_TYPES",
    "shipped", "shipped_configs", "config", "alloc", "num_sms", "keep_u8", "split_blocks", "split_keys",
    "check_kernel_inputs", "combine_splits", "row_delta",
    "batch_head", "split_and_chunk", "span", "load_tile", "store_tile", "part_ptrs", "load_keep",
    "chunked_dot_t", "chunked_dot_t_pair", "scaled_logits", "exact_softmax", "key_range", "online_softmax_start",
    "online_softmax_step", "online_softmax_finish", "load_lse_and_delta", "softmax_grad", "accumulate_dkdv",
]

# Kernels are decorated at import; TRITON_INTERPRET decides then whether they run on CPU tensors
# (and it must already have been set when triton itself was imported: tests/kernels/conftest.py).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
LOG2E = 1.4426950408889634
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# --------------------------------------------------------------------------------------------
# Shipped-config tables. Each kernel module has a KERNEL_TABLE, the single source of truth for its
# launchers AND for tests/kernels/test_compile_sm90.py, which compiles every entry for sm_90 with
# ptxas and fails on any spill or a missing tensor-core instruction. One entry = one kernel with its
# launch options (a dict; ``shipped`` writes one as a table row):
#   kernel:  key into the module's KERNELS      dtypes: q/k/v dtypes it is shipped for
#   choices: constexpr -> values the launcher may pick (the cartesian product is shipped)
#   fixed:   constexprs that never change for this entry
#   mma:     instruction expected on sm_90: "wgmma"; "mma" (mma.sync) where a tile side is below
#            wgmma's 64-row warpgroup minimum; "fma" for fp32, whose dots use
#            input_precision="ieee" (exact fp32 on CUDA cores); None = no tl.dot.
# --------------------------------------------------------------------------------------------


def shipped(kernel: str, dtypes: tuple, num_warps: int, num_stages: int, mma, **constexprs) -> dict:
    """One KERNEL_TABLE entry: a tuple value lists the choices of that constexpr (every one is
    shipped), any other value is fixed."""
    choices = {k: v for k, v in constexprs.items() if isinstance(v, tuple)}
    fixed = {k: v for k, v in constexprs.items() if not isinstance(v, tuple)}
    return dict(kernel=kernel, dtypes=dtypes, choices=choices, fixed=fixed, num_warps=num_warps,
                num_stages=num_stages, mma=mma)


KERNEL_TABLE = {
    # log-sum-exp combine of the split partials, and delta = rowsum(dO ⊙ O): no dot.
    "long_combine": shipped("long_combine", ("fp32", "fp16", "bf16"), 4, 1, None, BLOCK_M=16, BLOCK_D=64),
    "long_bwd_delta": shipped("long_bwd_delta", ("fp32", "fp16", "bf16"), 4, 1, None, BLOCK_M=16, BLOCK_D=64),
}


def shipped_configs(table: dict = KERNEL_TABLE):
    """Yield (entry, kernel name, dtype name, constexprs, num_warps, num_stages, mma) for every
    shipped configuration of ``table`` (this module's, or another kernel module's)."""
    for entry, spec in table.items():
        keys = list(spec["choices"])
        for values in itertools.product(*(spec["choices"][k] for k in keys)):
            constexprs = dict(spec["fixed"], **dict(zip(keys, values)))
            for dt in spec["dtypes"]:
                yield entry, spec["kernel"], dt, constexprs, spec["num_warps"], spec["num_stages"], spec["mma"]


def config(table: dict, entry: str, **want) -> tuple[dict, dict]:
    """Constexprs + launch options of a ``table`` entry. ``want`` gives preferred values: BLOCK_N
    takes the smallest shipped value >= want (it must cover all keys of the short-key regime),
    others the largest shipped value <= want (so False < True for flags); fixed constexprs ignore
    ``want``."""
    spec = table[entry]
    constexprs = dict(spec["fixed"])
    for key, values in spec["choices"].items():
        wanted = want[key]
        if key == "BLOCK_N":
            fits = [x for x in values if x >= wanted]
            constexprs[key] = min(fits) if fits else max(values)
        else:
            fits = [x for x in values if x <= wanted]
            constexprs[key] = max(fits) if fits else min(values)
    return constexprs, {"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]}


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


# ============================================================================================
# Scores over the full head dim, one BLOCK_D chunk at a time (fp16/bf16 on tensor cores with fp32
# accumulation; fp32 operands with input_precision="ieee", exact fp32 products).
# ============================================================================================


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


# ============================================================================================
# Softmax
# ============================================================================================


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


# ============================================================================================
# Key splits: combine and delta kernels, shared by the long-key regime of cross_attention.py and by
# memory_attention.py (which passes its B×M×D tensors as B×1×M×D, H = 1).
# ============================================================================================


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


# ============================================================================================
# Host side
# ============================================================================================


def alloc(shape, dtype, device):
    """Every buffer a kernel must fully write comes from here (tests swap in a NaN-filled version)."""
    return torch.empty(shape, dtype=dtype, device=device)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (the launchers size their grids by it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    # Interpreter: pretend to be a tiny GPU so that small test shapes still exercise several
    # key splits / query runs.
    return 2


def keep_u8(keep, B, N, device):
    """The B×N bool key mask as the uint8 tensor the kernels read (all ones for no mask)."""
    if keep is None:
        return torch.ones((B, N), dtype=torch.uint8, device=device)
    return keep.view(torch.uint8)  # zero-copy; strides passed to the kernel


def split_blocks(n_blocks: int, n_other_programs: int, device, programs_per_sm: int) -> tuple[int, int]:
    """(n_parts, blocks_per_part): n_blocks cut into contiguous parts of whole blocks, about
    ``programs_per_sm`` programs per SM counting the ``n_other_programs`` each part is launched with."""
    wanted_parts = max(1, min(n_blocks, triton.cdiv(programs_per_sm * num_sms(device), max(1, n_other_programs))))
    blocks_per_part = triton.cdiv(n_blocks, wanted_parts)
    return triton.cdiv(n_blocks, blocks_per_part), blocks_per_part


def split_keys(N: int, BLOCK_N: int, n_other_programs: int, device, programs_per_sm: int) -> tuple[int, int]:
    """(n_splits, keys_per_split) of the flash-decoding key split: whole key blocks per split."""
    n_splits, blocks_per_split = split_blocks(triton.cdiv(N, BLOCK_N), n_other_programs, device, programs_per_sm)
    return n_splits, blocks_per_split * BLOCK_N


def check_kernel_inputs(q, name: str) -> None:
    """ValueError unless q (whose shape/dtype/device checks the inputs already agree with) has a
    dtype and device these kernels run on."""
    if q.dtype not in DTYPES:
        raise ValueError(f"{name} needs fp32/fp16/bf16 inputs; got {q.dtype}")
    if q.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"{name} needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
                         f"imported); got {q.device}")


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
