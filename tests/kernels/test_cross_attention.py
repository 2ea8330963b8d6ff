"""Parity tests for the fused Triton cross-attention (crformer.kernels.cross_attention).

flash-attention convention: the kernel's error against a float64 oracle must be at most 2× the error
of the plain PyTorch path in the same dtype, plus a small atol. Fresh random inputs per case (seeded
per case); every buffer the launcher allocates is pre-filled with NaN so unwritten elements fail.

Without a GPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py) on CPU tensors, fp32
and fp16 only (the interpreter's bf16 tl.dot is wrong); on a GPU the same tests run natively and
add bf16. Shapes stay small (<= ~300 rows) because the interpreter is slow.
"""

from __future__ import annotations


import pytest
import torch

from tests.kernels.helpers import (DEVICE, DTYPES, NO_GPU, RUN_IN_SUBPROCESS, assert_parity, inproc, random_key_mask,
                                   rerun_interpreted, seed_of, set_sms, torch_attention)

if not RUN_IN_SUBPROCESS:
    from crformer.kernels import cross_attention as ca
    from crformer.kernels.cross_attention import SHORT_MAX_N, triton_cross_attention
from crformer.ops.attention import reference_cross_attention

# (B, H, M, N, d, mask kind, pretend SM count) — sms steers how many key splits / query runs the
# launchers make (about 2 programs per SM), so small shapes still cover the partial sums.
CASES = [
    # --- regime (a): N <= 64 keys in registers -----------------------------------------------
    (2, 2, 100, 20, 48, "random", 2),      # VLF-like: words, non-prefix mask, d = 48
    (2, 1, 65, 7, 16, "holes", 4),         # batch 0 fully masked; M = block + 1
    (2, 2, 130, 33, 32, "prefix", 4),      # N just above a power of two
    (1, 1, 64, 64, 64, None, 2),           # exact blocks, no mask
    (2, 1, 50, 1, 96, "random", 2),        # single key, d = 96 (two head-dim chunks, masked tail)
    (2, 1, 129, 17, 128, "holes", 8),      # d = 128, several query runs
    (1, 1, 40, 20, 192, "random", 2),      # wide head: three 64-chunks
    (1, 1, 30, 40, 320, "prefix", 2),      # wider head: five 64-chunks
    (2, 1, 3, 64, 64, "random", 2),        # tiny M
    (1, 3, 200, 31, 32, "prefix", 16),     # many runs
    (2, 2, 37, 16, 48, "holes", 2),
    (1, 1, 1, 5, 16, None, 2),             # single query
    (1, 2, 90, 64, 96, "random", 4),
    # --- regime (b): split keys, LSE combine ------------------------------------------------
    (1, 1, 16, 300, 32, "random", 2),      # CDec-like: 16 queries, 300 keys, several splits
    (2, 2, 16, 200, 32, "holes", 8),
    (2, 1, 5, 65, 48, "holes", 4),         # N = 65 boundary
    (2, 1, 16, 200, 64, "prefix", 4),
    (1, 1, 70, 150, 96, "random", 2),      # M > 16: 64-row tile (fp16) / 16-row (fp32)
    (1, 2, 13, 129, 128, None, 4),
    (2, 1, 1, 100, 16, "holes", 2),        # one query per head
    (1, 1, 20, 260, 32, "random", 16),     # many splits, d=32
    (1, 1, 33, 97, 192, "prefix", 2),      # wide head in the long regime
]


def _case_id(c):
    B, H, M, N, D, mk, sms = c
    return f"B{B}H{H}M{M}N{N}d{D}-{mk}-sm{sms}"


def make_inputs(B, H, M, N, D, dtype, mask_kind, seed):
    """Fresh random q/k/v/dO (B×H×M×d, B×H×N×d) and a B×N bool mask of the given kind."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, M, D, generator=g)
    k = torch.randn(B, H, N, D, generator=g)
    v = torch.randn(B, H, N, D, generator=g)
    do = torch.randn(B, H, M, D, generator=g)
    mask = random_key_mask(B, N, mask_kind, g)
    to = lambda t: t.to(device=DEVICE, dtype=dtype)  # noqa: E731
    mask = None if mask is None else mask.to(DEVICE)
    return to(q), to(k), to(v), mask, to(do)


def _fwd_bwd(fn, q, k, v, mask, do, scale):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, mask, scale)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do.to(out.dtype))
    return out.detach(), dq, dk, dv


@inproc
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_parity(case, dtype, monkeypatch):
    B, H, M, N, D, mask_kind, sms = case
    set_sms(monkeypatch, sms)
    q, k, v, mask, do = make_inputs(B, H, M, N, D, dtype, mask_kind, seed_of(case, str(dtype)))
    scale = None if D != 48 else 0.3  # a non-default scale too
    got = _fwd_bwd(triton_cross_attention, q, k, v, mask, do, scale)
    ref = _fwd_bwd(reference_cross_attention, q.double(), k.double(), v.double(), mask, do.double(), scale)
    base = _fwd_bwd(torch_attention, q, k, v, mask, do, scale)
    for name, g, r, b in zip(("out", "dq", "dk", "dv"), got, ref, base):
        assert g.dtype == dtype and g.shape == r.shape
        assert_parity(name, g, r, b, dtype)
    out, dq, dk, dv = got
    if mask is not None:
        # Masked keys get exactly zero gradient; rows with no valid key give 0 and zero grads.
        dead_keys = ~mask[:, None, :, None].expand_as(dk)
        assert (dk[dead_keys] == 0).all() and (dv[dead_keys] == 0).all()
        dead_rows = ~mask.any(1)
        assert (out[dead_rows] == 0).all() and (dq[dead_rows] == 0).all()


@inproc
def test_both_regimes_and_partials_are_covered():
    """The case table must exercise both regimes and multi-program partial sums."""
    assert any(c[3] <= SHORT_MAX_N for c in CASES) and any(c[3] > SHORT_MAX_N for c in CASES)
    assert any(c[5] == "holes" and c[3] <= SHORT_MAX_N for c in CASES)
    assert any(c[5] == "holes" and c[3] > SHORT_MAX_N for c in CASES)
    assert all(c[0] >= 2 for c in CASES if c[5] == "holes")  # batch 1 keeps valid keys: not all-zero


@inproc
@pytest.mark.parametrize("shape", [(1, 2, 150, 24, 96, 8), (1, 1, 16, 300, 48, 8)], ids=["short", "long"])
def test_deterministic(shape, monkeypatch):
    """Same inputs twice -> bit-identical output and gradients (partials summed in fixed order)."""
    B, H, M, N, D, sms = shape
    set_sms(monkeypatch, sms)
    q, k, v, mask, do = make_inputs(B, H, M, N, D, torch.float16, "random", seed_of("det", shape))
    a = _fwd_bwd(triton_cross_attention, q, k, v, mask, do, None)
    b = _fwd_bwd(triton_cross_attention, q, k, v, mask, do, None)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@inproc
@pytest.mark.parametrize("N", [24, 150], ids=["short", "long"])
def test_non_contiguous(N, monkeypatch):
    """Strided q/k/v/mask/dO (head-interleaved q, every other element of k/v's head dim, strided
    mask) give the same result as contiguous copies."""
    set_sms(monkeypatch, 4)
    B, H, M, D = 2, 2, 40, 32
    dtype = torch.float16
    g = torch.Generator().manual_seed(seed_of("strided", N))
    q = torch.randn(B, M, H, D, generator=g).to(DEVICE, dtype).transpose(1, 2)  # B×H×M×d view
    k = torch.randn(B, H, N, 2 * D, generator=g).to(DEVICE, dtype)[..., ::2]    # d stride 2
    v = torch.randn(B, N, H, D, generator=g).to(DEVICE, dtype).permute(0, 2, 1, 3)
    mask = (torch.rand(B, 2 * N, generator=g) < 0.7).to(DEVICE)[:, ::2]
    mask[:, 0] = True
    do = torch.randn(B, H, D, M, generator=g).to(DEVICE, dtype).transpose(-1, -2)
    assert not any(t.is_contiguous() for t in (q, k, v, mask, do))
    got = _fwd_bwd(triton_cross_attention, q, k, v, mask, do, None)
    want = _fwd_bwd(triton_cross_attention, q.contiguous(), k.contiguous(), v.contiguous(), mask.contiguous(),
                    do.contiguous(), None)
    ref = _fwd_bwd(reference_cross_attention, q.double(), k.double(), v.double(), mask, do.double(), None)
    base = _fwd_bwd(torch_attention, q, k, v, mask, do, None)
    for name, x, y, r, b in zip(("out", "dq", "dk", "dv"), got, want, ref, base):
        assert_parity(name, x, r, b, dtype)
        if NO_GPU:  # interpreted, strides change nothing but the addresses: bitwise equal
            assert torch.equal(x, y), name
        else:  # compiled, unit and non-unit strides are different specialisations (vectorised
            # loads, other MMA operand layouts) that may round differently (seen on an H200)
            torch.testing.assert_close(x, y, rtol=2e-3, atol=2e-3, msg=name)


class _DropLastProgram:
    """Wraps a kernel so its launch grid loses the last program along axis 0."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return self.kernel[(grid[0] - 1,) + tuple(grid[1:])]


@inproc
def test_nan_prefill_catches_unwritten_outputs(monkeypatch):
    """Canary: a launch that skips a block must fail the finiteness check (the NaN fill works)."""
    q, k, v, mask, do = make_inputs(1, 1, 100, 10, 32, torch.float32, "random", 1)
    monkeypatch.setattr(ca, "_short_fwd_kernel", _DropLastProgram(ca._short_fwd_kernel))
    out = triton_cross_attention(q, k, v, mask)
    assert torch.isnan(out).any()


@inproc
@pytest.mark.parametrize("N", [12, 90], ids=["short", "long"])
def test_torch_compile_fullgraph(N, monkeypatch):
    """The custom ops trace under torch.compile(fullgraph=True) (fake impls + registered autograd)
    and give the eager results. aot_eager: inductor cannot compile interpreted kernels."""
    set_sms(monkeypatch, 4)
    q, k, v, mask, do = make_inputs(2, 2, 24, N, 32, torch.float32, "holes", seed_of("compile", N))

    def f(q, k, v, mask):
        return (triton_cross_attention(q, k, v, mask) * 2.0).sum()

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=False)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    loss = cf(qs, ks, vs, mask)
    grads = torch.autograd.grad(loss, (qs, ks, vs))
    qe, ke, ve = (t.clone().requires_grad_() for t in (q, k, v))
    loss_e = f(qe, ke, ve, mask)
    grads_e = torch.autograd.grad(loss_e, (qe, ke, ve))
    torch.testing.assert_close(loss, loss_e)
    for a, b in zip(grads, grads_e):
        torch.testing.assert_close(a, b)


@inproc
@pytest.mark.parametrize("N", [12, 90], ids=["short", "long"])
def test_opcheck(N):
    """torch.library.opcheck: schema, fake tensor and autograd registration of the custom op."""
    q, k, v, mask, _ = make_inputs(1, 2, 8, N, 16, torch.float32, "random", seed_of("opcheck", N))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.crformer.triton_cross_attention_fwd.default, (q, k, v, mask, 0.25),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@inproc
def test_rejects_bad_inputs():
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    k = torch.randn(1, 2, 5, 16, device=DEVICE)
    with pytest.raises(ValueError):
        triton_cross_attention(q, k[..., :8], k[..., :8])  # head dim mismatch
    with pytest.raises(ValueError):
        triton_cross_attention(q, k, k.half())  # dtype mismatch
    with pytest.raises(ValueError):
        triton_cross_attention(q, k, k, torch.ones(1, 5, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError):
        triton_cross_attention(q[0], k[0], k[0])  # not 4-D
    with pytest.raises(ValueError):
        triton_cross_attention(q.double(), k.double(), k.double())


def test_rerun_in_subprocess():
    """triton was imported (without the interpreter) before conftest.py ran: run this file again in
    a fresh interpreter-mode process so the kernel tests still run."""
    rerun_interpreted(__file__)
