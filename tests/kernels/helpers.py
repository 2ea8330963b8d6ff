"""Helpers shared by the kernel parity tests (the flash-attention convention: the kernel's error
against a float64 oracle is at most 2× the plain PyTorch path's in the same dtype, plus a small atol;
fresh seeded inputs per case). The NaN prefill of launcher buffers is an autouse fixture in
conftest.py.

Without a GPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py before anything imports
triton) on CPU tensors, fp32 and fp16 only (the interpreter's bf16 tl.dot is wrong).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import pytest
import torch

NO_GPU = not torch.cuda.is_available()
# conftest.py could not enable the interpreter (triton was imported first): rerun in a subprocess.
RUN_IN_SUBPROCESS = NO_GPU and os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = "cpu" if NO_GPU else "cuda"
DTYPES = [torch.float32, torch.float16] + ([] if NO_GPU else [torch.bfloat16])

inproc = pytest.mark.skipif(RUN_IN_SUBPROCESS, reason="triton was imported before TRITON_INTERPRET could "
                                                      "be set; see test_rerun_in_subprocess")


def seed_of(*parts) -> int:
    """A stable per-case seed."""
    return zlib.crc32(repr(parts).encode())


def random_key_mask(B: int, N: int, kind, g: torch.Generator):
    """B×N bool key mask (True = keep), or None. ``prefix``: valid lengths; ``random``: any pattern
    with at least one kept key column; ``holes``: ``random`` with batch 0 fully masked."""
    if kind is None:
        return None
    if kind == "prefix":
        return torch.arange(N)[None, :] < torch.randint(1, N + 1, (B,), generator=g)[:, None]
    mask = torch.rand(B, N, generator=g) < 0.6
    mask[:, torch.randint(0, N, (1,), generator=g)] = True
    if kind == "holes":
        mask[0] = False
    return mask


def torch_attention(q, k, v, mask, scale):
    """The plain PyTorch path in the inputs' dtype: matmuls in that dtype, softmax in fp32, P
    rounded to the dtype (for fp32 this is the reference itself)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if mask is not None:
        keep = mask[:, None, None, :]
        s = s.masked_fill(~keep, float("-inf"))
        any_keep = keep.any(-1, keepdim=True)
        s = torch.where(any_keep, s, torch.zeros((), device=s.device))
        p = torch.softmax(s, -1) * any_keep
    else:
        p = torch.softmax(s, -1)
    return torch.matmul(p.to(q.dtype), v)


def _tol(dtype):
    return {torch.float32: 1e-6, torch.float16: 5e-4, torch.bfloat16: 4e-3}[dtype]


def assert_parity(name, got, ref64, base, dtype):
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten NaN-filled elements?)"
    err = (got.double() - ref64).abs().max().item()
    base_err = (base.double() - ref64).abs().max().item()
    atol = _tol(dtype) * max(1.0, ref64.abs().max().item())
    assert err <= 2 * base_err + atol, f"{name}: kernel err {err:.3e} > 2 × torch err {base_err:.3e} + {atol:.1e}"


def set_sms(monkeypatch, sms: int) -> None:
    """Pretend the device has ``sms`` SMs (steers how many key splits / query runs the launchers
    make); on a GPU keep the real count."""
    if NO_GPU:
        from crformer.kernels import host

        monkeypatch.setattr(host, "num_sms", lambda device: sms)


def rerun_interpreted(path: str) -> None:
    """Run the kernel test file ``path`` in a fresh interpreter-mode process when triton was imported
    (without the interpreter) before conftest.py ran; skip when the kernels run in this process."""
    if not RUN_IN_SUBPROCESS:
        pytest.skip("kernels run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path],
                       capture_output=True, text=True, env=env, timeout=1800)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
