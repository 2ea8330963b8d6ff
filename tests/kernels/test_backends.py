"""Every registered attention backend (``crformer.ops.BACKENDS``) against the float64 oracle.

The tests are parametrised by the registry itself, so a backend is tested by registering it. One that
cannot run here (xformers without CUDA or the package; triton without CUDA or TRITON_INTERPRET=1,
which tests/kernels/conftest.py sets on CPU) is skipped with the registry's reason. Shapes are small:
triton runs interpreted on CPU. Forward and the gradients of every input are compared with
``reference_cross_attention`` / ``reference_memory_attention`` in float64.
"""

from __future__ import annotations

import pytest
import torch

from crformer.ops import BACKENDS, cross_attention, memory_attention, reference_cross_attention, reference_memory_attention
from tests.helpers import skip_unless_backend_runs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# fp16 on CUDA only: the interpreter's fp16 path is covered by the kernel tests, and a CPU peer need not have one.
DTYPES = [torch.float32] + ([torch.float16] if DEVICE.type == "cuda" else [])
TOL = {torch.float32: 1e-4, torch.float16: 4e-3}  # of the largest reference value

# (B, H, M, N, d, mask): "random" masks every key of batch 0 (its rows must give 0 and zero gradients)
CROSS_CASES = [(2, 2, 9, 13, 16, "random"), (1, 1, 5, 70, 32, "prefix"), (2, 1, 3, 8, 16, None)]
# (B, M, N, D, pos, mask)
MEMORY_CASES = [(2, 6, 40, 32, "shared", "random"), (2, 3, 17, 16, "batch", "prefix"), (1, 4, 9, 16, None, None)]


def _mask(B: int, N: int, kind, g: torch.Generator):
    if kind is None:
        return None
    if kind == "prefix":
        return torch.arange(N)[None, :] < torch.randint(1, N + 1, (B,), generator=g)[:, None]
    mask = torch.rand(B, N, generator=g) < 0.6
    mask[:, 0] = True
    mask[0] = False
    return mask


def _compare(fn, oracle, inputs: list, mask, dtype) -> None:
    """fn and the float64 oracle on the same inputs: output and every input's gradient."""
    g = torch.Generator().manual_seed(1)
    leaves = [t.to(DEVICE, dtype).requires_grad_() for t in inputs]
    leaves64 = [t.double().requires_grad_() for t in inputs]
    mask_dev = None if mask is None else mask.to(DEVICE)
    out = fn(*leaves, mask_dev)
    ref = oracle(*leaves64, mask)
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    got = [out] + list(torch.autograd.grad(out, leaves, grad.to(DEVICE, dtype)))
    want = [ref] + list(torch.autograd.grad(ref, leaves64, grad))
    for what, a, b in zip(["out"] + [f"grad {i}" for i in range(len(inputs))], got, want):
        assert a.dtype == dtype and a.shape == b.shape, what
        atol = TOL[dtype] * max(b.abs().max().item(), 1e-3)
        torch.testing.assert_close(a.cpu().double(), b, rtol=0, atol=atol, msg=what)
    if mask is not None:
        dead = ~mask.any(dim=1)
        assert (got[0].cpu()[dead] == 0).all() and (got[1].cpu()[dead] == 0).all(), "fully masked rows must give 0"


def every_backend_and_dtype(test):
    """Parametrise a parity test by every registered backend (skipped with the reason when it cannot
    run here) and every dtype of this device."""
    test = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])(test)
    return pytest.mark.parametrize("backend", list(BACKENDS))(test)


@pytest.mark.parametrize("case", CROSS_CASES, ids=lambda c: f"B{c[0]}H{c[1]}M{c[2]}N{c[3]}d{c[4]}-{c[5]}")
@every_backend_and_dtype
def test_cross_attention_matches_the_float64_reference(backend, case, dtype):
    skip_unless_backend_runs(backend, DEVICE)
    B, H, M, N, d, kind = case
    g = torch.Generator().manual_seed(B * 100 + N)
    q, k, v = (torch.randn(B, H, n, d, generator=g) for n in (M, N, N))
    scale = 0.3 if kind == "prefix" else None
    _compare(lambda q_, k_, v_, m: cross_attention(q_, k_, v_, m, scale, backend=backend),
             lambda q_, k_, v_, m: reference_cross_attention(q_, k_, v_, m, scale), [q, k, v], _mask(B, N, kind, g), dtype)


@pytest.mark.parametrize("case", MEMORY_CASES, ids=lambda c: f"B{c[0]}M{c[1]}N{c[2]}D{c[3]}-{c[4]}-{c[5]}")
@every_backend_and_dtype
def test_memory_attention_matches_the_float64_reference(backend, case, dtype):
    """The decoder's folded form: the backend's fused kernel where it has one, else keys materialised."""
    skip_unless_backend_runs(backend, DEVICE)
    B, M, N, D, pos_kind, kind = case
    g = torch.Generator().manual_seed(B * 100 + N + 1)
    q, memory = torch.randn(B, M, D, generator=g), torch.randn(B, N, D, generator=g)
    inputs = [q, memory]
    if pos_kind is not None:
        inputs.append(torch.randn(*((N, D) if pos_kind == "shared" else (B, N, D)), generator=g))
    mask = _mask(B, N, kind, g)

    def call(fn):
        return lambda *t: fn(t[0], t[1], t[2] if pos_kind else None, t[-1])

    _compare(call(lambda q_, m_, p, k: memory_attention(q_, m_, p, k, backend=backend)),
             call(reference_memory_attention), inputs, mask, dtype)


def test_registry_names_what_the_config_accepts():
    """model.attn_backend accepts exactly 'auto' and the registered names."""
    from crformer.config import RULES

    _, ok = RULES["model.attn_backend"]
    assert all(ok(name) for name in BACKENDS) and ok("auto") and not ok("flash")
