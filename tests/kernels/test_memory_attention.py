"""Parity tests for the fused Triton memory attention (crformer.kernels.memory_attention): the
decoder's folded cross-attention, keys = memory + pos, values = memory.

Same conventions as test_cross_attention.py (helpers in tests/kernels/helpers.py): float64 oracle, error
at most 2× the plain PyTorch path's in the same dtype plus a small atol, fresh inputs per case,
launcher buffers pre-filled with NaN. The fused kernel covers fp16/bf16 with D <= 256; fp32 and
wider heads take the generic kernels (checked too, and that fp16 really takes the fused one).
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.helpers import (DEVICE, DTYPES, RUN_IN_SUBPROCESS, assert_parity, inproc, random_key_mask,
                                   rerun_interpreted, seed_of, set_sms, torch_attention)

if not RUN_IN_SUBPROCESS:
    from crformer.kernels import cross_attention as ca
    from crformer.kernels import memory_attention as ma
    from crformer.kernels.memory_attention import triton_memory_attention
from crformer.ops.attention import reference_memory_attention

# (B, M, N, D, pos: None | "shared" (N×D) | "batch" (B×N×D), mask kind, pretend SM count)
CASES = [
    (2, 16, 300, 32, "shared", "random", 2),   # CDec-like: several key splits, non-prefix mask
    (2, 70, 150, 48, "shared", "holes", 4),    # batch 0 fully masked; M over one 64-row block
    (1, 128, 200, 256, "shared", "prefix", 2),  # the paper's folded shape: 8 heads × 16 queries, D = 256
    (2, 5, 65, 96, None, "random", 4),         # no position table, D = 96 (masked head-dim tail)
    (2, 33, 97, 128, "batch", "holes", 8),     # per-batch positions, many splits
    (1, 1, 40, 16, "shared", None, 2),         # one query, no mask, D = 16
    (2, 64, 33, 64, "shared", "prefix", 2),    # exact query block, N just above a 32-key block
    (1, 20, 1, 200, "batch", "random", 2),     # a single key, D = 200 (wide masked tail)
    (2, 7, 260, 32, None, "holes", 16),        # many splits, some with no valid key
    (1, 40, 70, 64, "shared", "random", 2),
]


def _case_id(c):
    B, M, N, D, pos, mk, sms = c
    return f"B{B}M{M}N{N}d{D}-pos{pos}-{mk}-sm{sms}"


def make_inputs(B, M, N, D, pos_kind, dtype, mask_kind, seed):
    """q B×M×D, memory B×N×D, pos (N×D / B×N×D / None), B×N bool mask, dO B×M×D."""
    g = torch.Generator().manual_seed(seed)
    q, memory, do = torch.randn(B, M, D, generator=g), torch.randn(B, N, D, generator=g), torch.randn(B, M, D, generator=g)
    pos = {None: None, "shared": (N, D), "batch": (B, N, D)}[pos_kind]
    pos = None if pos is None else torch.randn(*pos, generator=g)
    mask = random_key_mask(B, N, mask_kind, g)
    to = lambda t: None if t is None else t.to(device=DEVICE, dtype=dtype)  # noqa: E731
    return to(q), to(memory), to(pos), None if mask is None else mask.to(DEVICE), to(do)


def torch_memory_attention(q, memory, pos, mask, scale):
    """The plain PyTorch path in the inputs' dtype (keys materialised)."""
    keys = memory if pos is None else memory + pos
    return torch_attention(q[:, None], keys[:, None], memory[:, None], mask, scale)[:, 0]


def _fwd_bwd(fn, q, memory, pos, mask, do, scale):
    """(out, dq, dmemory[, dpos])."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, memory) + (() if pos is None else (pos,))]
    out = fn(*leaves[:2], leaves[2] if pos is not None else None, mask, scale)
    return (out.detach(),) + torch.autograd.grad(out, leaves, do.to(out.dtype))


@inproc
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_parity(case, dtype, monkeypatch):
    B, M, N, D, pos_kind, mask_kind, sms = case
    set_sms(monkeypatch, sms)
    q, memory, pos, mask, do = make_inputs(B, M, N, D, pos_kind, dtype, mask_kind, seed_of("memory", case, str(dtype)))
    scale = 0.3 if D == 48 else None
    got = _fwd_bwd(triton_memory_attention, q, memory, pos, mask, do, scale)
    ref = _fwd_bwd(reference_memory_attention, q.double(), memory.double(), None if pos is None else pos.double(),
                   mask, do.double(), scale)
    base = _fwd_bwd(torch_memory_attention, q, memory, pos, mask, do, scale)
    names = ("out", "dq", "dmemory", "dpos")
    for name, g, r, b in zip(names, got, ref, base):
        assert g.dtype == dtype and g.shape == r.shape, name
        assert_parity(name, g, r, b, dtype)
    if mask is not None:
        dead_rows = ~mask.any(1)
        assert (got[0][dead_rows] == 0).all() and (got[1][dead_rows] == 0).all()
        assert (got[2][~mask] == 0).all()  # masked keys: no gradient through keys or values


@inproc
def test_cases_cover_the_kernel():
    assert {c[4] for c in CASES} == {None, "shared", "batch"}
    assert any(c[3] == ma.MAX_D for c in CASES) and any(c[3] % 16 for c in CASES)
    assert any(c[5] == "holes" for c in CASES) and all(c[0] >= 2 for c in CASES if c[5] == "holes")


@inproc
def test_fp16_takes_the_fused_kernel_and_fp32_the_generic_one(monkeypatch):
    """The dispatch rule of the module doc: no silent fallback for the shipped dtypes."""
    calls = []
    generic = ca.triton_cross_attention
    monkeypatch.setattr(ca, "triton_cross_attention", lambda *a: calls.append(a[0].dtype) or generic(*a))
    for dtype, D in ((torch.float16, 64), (torch.float32, 64), (torch.float16, 320)):
        q, memory, pos, mask, _ = make_inputs(1, 8, 70, D, "shared", dtype, "random", seed_of("route", D, str(dtype)))
        got = triton_memory_attention(q, memory, pos, mask)
        ref = reference_memory_attention(q.double(), memory.double(), pos.double(), mask)
        assert_parity(f"out {dtype} D={D}", got, ref, torch_memory_attention(q, memory, pos, mask, None), dtype)
    assert calls == [torch.float32, torch.float16]


@inproc
def test_position_gradient_in_the_same_pass(monkeypatch):
    """One dF launch per backward whether or not pos needs a gradient, and the memory's gradient
    does not depend on it (up to the accumulation order of the key path)."""
    set_sms(monkeypatch, 4)
    q, memory, pos, mask, do = make_inputs(2, 16, 100, 32, "shared", torch.float16, "random", seed_of("dpos"))
    launches = []
    kernel = ma._memory_bwd_dmem_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(ma, "_memory_bwd_dmem_kernel", Counting())
    grads = {}
    for need in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, memory)] + [pos.clone().requires_grad_(need)]
        out = triton_memory_attention(*leaves, mask)
        grads[need] = torch.autograd.grad(out, leaves[:2 + need], do)
    assert len(launches) == 2 and len(grads[True]) == 3
    torch.testing.assert_close(grads[True][1], grads[False][1], rtol=0, atol=2e-3)


@inproc
def test_deterministic(monkeypatch):
    set_sms(monkeypatch, 8)
    args = make_inputs(2, 40, 300, 96, "shared", torch.float16, "random", seed_of("det-memory"))
    a = _fwd_bwd(triton_memory_attention, *args, None)
    b = _fwd_bwd(triton_memory_attention, *args, None)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@inproc
def test_non_contiguous(monkeypatch):
    """Strided q / memory / batch-stride-0 pos / mask / dO match contiguous copies."""
    set_sms(monkeypatch, 4)
    B, M, N, D = 2, 24, 90, 32
    dtype = torch.float16
    g = torch.Generator().manual_seed(seed_of("strided-memory"))
    q = torch.randn(B, D, M, generator=g).to(DEVICE, dtype).transpose(1, 2)
    memory = torch.randn(N, B, 2 * D, generator=g).to(DEVICE, dtype).transpose(0, 1)[..., ::2]
    pos = torch.randn(N, D, generator=g).to(DEVICE, dtype).expand(B, N, D)
    mask = (torch.rand(B, 2 * N, generator=g) < 0.7).to(DEVICE)[:, ::2]
    mask[:, 0] = True
    do = torch.randn(B, D, M, generator=g).to(DEVICE, dtype).transpose(1, 2)
    assert not any(t.is_contiguous() for t in (q, memory, pos, mask, do))
    got = _fwd_bwd(triton_memory_attention, q, memory, pos, mask, do, None)
    want = _fwd_bwd(triton_memory_attention, q.contiguous(), memory.contiguous(), pos.contiguous(),
                    mask.contiguous(), do.contiguous(), None)
    for name, x, y in zip(("out", "dq", "dmemory", "dpos"), got, want):
        if DEVICE == "cpu":  # interpreted, strides change nothing but the addresses
            assert torch.equal(x, y), name
        else:
            torch.testing.assert_close(x, y, rtol=2e-3, atol=2e-3, msg=name)


@inproc
def test_torch_compile_fullgraph(monkeypatch):
    """The custom ops trace under torch.compile(fullgraph=True) and give the eager results."""
    set_sms(monkeypatch, 4)
    q, memory, pos, mask, _ = make_inputs(2, 24, 90, 32, "shared", torch.float16, "holes", seed_of("compile-memory"))

    def f(q, memory, pos, mask):
        return (triton_memory_attention(q, memory, pos, mask).float() * 2.0).sum()

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=False)
    results = []
    for fn in (cf, f):
        leaves = [t.clone().requires_grad_() for t in (q, memory, pos)]
        loss = fn(*leaves, mask)
        results.append((loss,) + torch.autograd.grad(loss, leaves))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@inproc
def test_opcheck():
    q, memory, pos, mask, _ = make_inputs(1, 8, 70, 32, "batch", torch.float16, "random", seed_of("opcheck-memory"))
    q, memory, pos = (t.requires_grad_() for t in (q, memory, pos))
    torch.library.opcheck(torch.ops.crformer.triton_memory_attention_fwd.default, (q, memory, pos, mask, 0.25),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@inproc
def test_rejects_bad_inputs():
    q = torch.randn(2, 8, 32, device=DEVICE)
    memory = torch.randn(2, 70, 32, device=DEVICE)
    bad = [
        (q[0], memory, None, None),                             # not 3-D
        (q, memory[..., :16], None, None),                      # width mismatch
        (q, memory[:1], None, None),                            # batch mismatch
        (q, memory, torch.randn(69, 32, device=DEVICE), None),  # pos rows
        (q, memory, torch.randn(70, 32, device=DEVICE).half(), None),  # pos dtype
        (q, memory, None, torch.ones(2, 70, dtype=torch.int64, device=DEVICE)),  # mask dtype
        (q.double(), memory.double(), None, None),               # fp64
    ]
    for args in bad:
        with pytest.raises(ValueError):
            triton_memory_attention(*args)


def test_rerun_in_subprocess():
    """See test_cross_attention.test_rerun_in_subprocess."""
    rerun_interpreted(__file__)


@inproc
def test_folded_decoder_attention_in_fp16_uses_the_fused_kernel(monkeypatch):
    """MultiHeadAttention(fold_decoder_attention=True) in fp16 with backend triton (the fused kernel, position
    gradient included) against the unfolded float64 reference attention, parameters shared."""
    from crformer.models.layers import MultiHeadAttention

    set_sms(monkeypatch, 4)
    monkeypatch.setattr(ca, "triton_cross_attention", lambda *a: pytest.fail("generic kernel called"))
    B, M, N, D, H = 2, 16, 120, 64, 4
    g = torch.Generator().manual_seed(seed_of("folded-layer"))
    mha = MultiHeadAttention(D, D, D, H)
    for p in mha.parameters():
        p.data = torch.randn(p.shape, generator=g) * D ** -0.5
    query, memory, pos, grad = (torch.randn(*s, generator=g) for s in ((B, M, D), (B, N, D), (N, D), (B, M, D)))
    mask = torch.rand(B, N, generator=g) < 0.7
    results = {}
    for name, dtype, backend, fold in (("triton", torch.float16, "triton", True),
                                       ("reference", torch.float64, "reference", False)):
        layer = MultiHeadAttention(D, D, D, H, attn_backend=backend, fold_decoder_attention=fold).to(DEVICE, dtype)
        layer.load_state_dict(mha.state_dict())
        x = [t.to(DEVICE, dtype).requires_grad_() for t in (query, memory, pos)]
        out = layer(x[0], x[1], key_padding_mask=mask.to(DEVICE), key_pos=x[2])
        weights = [layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight]
        results[name] = (out,) + torch.autograd.grad(out, x + weights, grad.to(DEVICE, dtype))
    for what, a, b in zip(("out", "dquery", "dmemory", "dpos", "dWq", "dWk", "dWv"), results["triton"],
                          results["reference"]):
        # fp16 rounding of inputs, weights and the folded queries: 0.6-1.3e-3 of the largest value seen
        torch.testing.assert_close(a.double(), b, rtol=0, atol=4e-3 * b.abs().max().item(), msg=what)
