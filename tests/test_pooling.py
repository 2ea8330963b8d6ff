"""Tests for masked language pooling: the compiled op ``crformer::masked_pool`` against the reference."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import pytest
import torch

from crformer.ops import masked_pool, reference_masked_pool
from crformer.ops import pooling

MODES = ("mean", "max")
CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# (B, L, C): L = 1, odd C, C spanning several 256-channel CPU tasks, the paper's shapes.
SHAPES = [(3, 1, 5), (4, 7, 33), (5, 9, 1), (2, 20, 768), (32, 20, 1000), (3, 13, 257)]
LAYOUTS = ("contiguous", "transposed", "channel_stride", "token_stride")

needs_ext = pytest.mark.skipif(not pooling.HAS_EXTENSION, reason="crformer._C not built (test_extension_built fails)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _nvcc_present() -> bool:
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if any(h and (Path(h) / "bin" / "nvcc").exists() for h in homes):
        return True
    return shutil.which("nvcc") is not None


def make_inputs(B, L, C, dtype, device="cpu", layout="contiguous", empty_rows=True, seed=0):
    """x (B×L×C, given layout) and a random mask with some rows fully masked and one fully valid."""
    g = torch.Generator().manual_seed(seed)

    def randn(*size):  # views are taken after the dtype/device move, which would copy them
        return torch.randn(*size, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    if layout == "transposed":  # channel stride L
        x = randn(B, C, L).transpose(1, 2)
    elif layout == "channel_stride":  # channel stride 2
        x = randn(B, L, 2 * C)[..., ::2]
    elif layout == "token_stride":  # token stride 2C, with a non-contiguous mask too
        x = randn(B, 2 * L, C)[:, ::2]
    else:
        x = randn(B, L, C)
    mask = torch.rand(B, L, generator=g) > 0.4
    if B > 1 and empty_rows:
        mask[0] = False
    mask[-1] = True
    if layout == "token_stride":
        mask = torch.repeat_interleave(mask, 2, dim=1)[:, ::2]
    return x, mask.to(device)


def first_argmax_grad(x, mask, grad):
    """Oracle gradient of masked max: all of grad to the lowest-index arg-max of each (row, channel)."""
    filled = x.double().masked_fill(~mask.unsqueeze(-1), float("-inf"))
    idx = filled.argmax(dim=1, keepdim=True)  # first occurrence of the maximum
    gx = torch.zeros_like(filled).scatter_(1, idx, grad.double().unsqueeze(1))
    return gx * mask.any(dim=1)[:, None, None]


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_parity(x, mask, mode):
    """Forward and backward of the op against a float64 oracle, flash-attention style tolerance."""
    dtype = x.dtype
    x = x.detach().requires_grad_(True)
    out = masked_pool(x, mask, mode)
    assert out.dtype == dtype and out.shape == (x.shape[0], x.shape[2]) and out.is_contiguous()
    grad = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, grad)
    assert gx.dtype == dtype and gx.shape == x.shape
    assert not out.isnan().any() and not gx.isnan().any()

    x64 = x.detach().double().requires_grad_(True)
    ref64 = reference_masked_pool(x64, mask, mode)
    ref_lp = reference_masked_pool(x.detach(), mask, mode)
    if mode == "max":
        # Max selects an element: exact in every dtype; the gradient is a copy of grad.
        assert torch.equal(out, ref_lp)
        assert torch.equal(gx.double(), first_argmax_grad(x, mask, grad))
    else:
        tol = 2 * max_err(ref_lp, ref64) + ATOL[dtype]
        assert max_err(out, ref64) <= tol
        (g64,) = torch.autograd.grad(ref64, x64, grad.double())
        xr = x.detach().requires_grad_(True)
        (g_lp,) = torch.autograd.grad(reference_masked_pool(xr, mask, mode), xr, grad)
        assert max_err(gx, g64) <= 2 * max_err(g_lp, g64) + ATOL[dtype]
    # Rows without a valid token: output 0 and gradient 0.
    empty = ~mask.any(dim=1)
    assert (out[empty] == 0).all() and (gx[empty] == 0).all()
    # Masked tokens never get gradient.
    assert (gx.masked_select(~mask.unsqueeze(-1).expand_as(gx)) == 0).all()


# --- build ---------------------------------------------------------------------------------------


def test_extension_built():
    assert pooling.HAS_EXTENSION, (
        f"crformer._C failed to import ({pooling._IMPORT_ERROR}); "
        "build it with `pip install --no-build-isolation -e .[dev]`")
    assert hasattr(torch.ops.crformer, "masked_pool") and hasattr(torch.ops.crformer, "masked_pool_backward")


def test_cuda_sources_compiled_when_toolkit_present():
    if torch.version.cuda is None or not _nvcc_present():
        pytest.skip("no CUDA torch or no nvcc: a CPU-only build is expected")
    if os.environ.get("CRFORMER_BUILD_CUDA", "").strip() == "0":
        pytest.skip("CRFORMER_BUILD_CUDA=0 set: CPU-only build requested")
    assert pooling.HAS_EXTENSION, f"crformer._C not built: {pooling._IMPORT_ERROR}"
    from crformer import _C

    assert _C.cuda_compiled() and _C.CUDA_COMPILED, (
        "nvcc and a CUDA build of torch are present but crformer._C was built without its CUDA kernels")


# --- correctness on CPU --------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_parity_cpu(shape, dtype, mode):
    x, mask = make_inputs(*shape, dtype, seed=zlib.crc32(f"{shape}{dtype}{mode}".encode()))
    check_parity(x, mask, mode)


@needs_ext
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS[1:])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_parity_non_contiguous_cpu(layout, dtype, mode):
    x, mask = make_inputs(4, 11, 37, dtype, layout=layout, seed=7)
    assert not x.is_contiguous()
    check_parity(x, mask, mode)


@needs_ext
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_float64(mode):
    x, mask = make_inputs(3, 5, 4, torch.float64, seed=1)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: masked_pool(t, mask, mode), (x,))


@needs_ext
@pytest.mark.parametrize("mode", MODES)
def test_opcheck(mode):
    x, mask = make_inputs(3, 6, 9, torch.float32, seed=2)
    torch.library.opcheck(torch.ops.crformer.masked_pool.default, (x.requires_grad_(True), mask, mode))
    grad = torch.randn(3, 9)
    torch.library.opcheck(torch.ops.crformer.masked_pool_backward.default,
                          (grad, mask, x.detach() if mode == "max" else None, mode))


@needs_ext
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=str)
def test_max_ties_lowest_index(dtype):
    x = torch.zeros(2, 6, 3, dtype=dtype)
    x[0, :, 0] = torch.tensor([1.0, 5.0, 5.0, 2.0, 5.0, 5.0])  # tie at 1, 2, 4, 5; 1 masked below
    x[0, :, 1] = 3.0  # all equal
    x[0, :, 2] = torch.tensor([-1.0, -1.0, -4.0, -1.0, -1.0, -1.0])
    x[1] = 7.0
    mask = torch.tensor([[True, False, True, True, True, True], [False, False, False, True, True, True]])
    x.requires_grad_(True)
    out = masked_pool(x, mask, "max")
    assert out[0].tolist() == [5.0, 3.0, -1.0] and out[1].tolist() == [7.0] * 3
    out.backward(torch.ones_like(out))
    winners = torch.tensor([[2, 0, 0], [3, 3, 3]])
    expected = torch.zeros(2, 6, 3, dtype=dtype).scatter_(1, winners.unsqueeze(1), 1.0)
    assert torch.equal(x.grad, expected)


@needs_ext
@pytest.mark.parametrize("mode", MODES)
def test_empty_rows_and_tokens(mode):
    x = torch.randn(3, 4, 5, requires_grad=True)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    out = masked_pool(x, mask, mode)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(3, 5)) and torch.equal(x.grad, torch.zeros(3, 4, 5))
    # L = 0 and C = 0 and B = 0 give empty/zero results, never NaN.
    assert torch.equal(masked_pool(torch.randn(2, 0, 3), torch.zeros(2, 0, dtype=torch.bool), mode),
                       torch.zeros(2, 3))
    assert masked_pool(torch.randn(2, 3, 0), torch.ones(2, 3, dtype=torch.bool), mode).shape == (2, 0)
    assert masked_pool(torch.randn(0, 3, 4), torch.ones(0, 3, dtype=torch.bool), mode).shape == (0, 4)


@needs_ext
def test_max_nan_propagates_only_from_valid_tokens():
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[True, True, False, True], [True, True, True, True]])
    x[0, 2, :] = float("nan")  # masked: ignored
    x[1, 1, 0] = float("nan")  # valid: propagates
    out = masked_pool(x, mask, "max")
    assert not out[0].isnan().any()
    assert out[1, 0].isnan() and not out[1, 1:].isnan().any()
    assert torch.equal(out[0], reference_masked_pool(x[:1], mask[:1], "max")[0])


def test_input_validation():
    x, mask = torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="mode"):
        masked_pool(x, mask, "sum")
    with pytest.raises(ValueError, match="B×L×C"):
        masked_pool(x[0], mask, "mean")
    with pytest.raises(ValueError, match="bool"):
        masked_pool(x, mask.float(), "mean")
    with pytest.raises(ValueError, match="must be B×L"):
        masked_pool(x, mask[:, :2], "mean")
    with pytest.raises(ValueError, match="floating"):
        masked_pool(x.long(), mask, "mean")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="device"):
            masked_pool(x.cuda(), mask, "mean")


@needs_ext
def test_op_validation_in_cpp():
    x, mask = torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="mode"):
        torch.ops.crformer.masked_pool(x, mask, "sum")
    with pytest.raises(ValueError, match="mask"):
        torch.ops.crformer.masked_pool(x, mask[:, :2], "mean")
    with pytest.raises(ValueError, match="needs x"):
        torch.ops.crformer.masked_pool_backward(torch.randn(2, 4), mask, None, "max")


def test_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(pooling, "HAS_EXTENSION", False)
    monkeypatch.setattr(pooling, "_warned", False)
    x, mask = make_inputs(3, 5, 6, torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = masked_pool(x, mask, "mean")
        b = masked_pool(x, mask, "max")
    assert len([w for w in caught if "falling back" in str(w.message)]) == 1
    assert torch.equal(a, reference_masked_pool(x, mask, "mean"))
    assert torch.equal(b, reference_masked_pool(x, mask, "max"))


def test_import_without_extension():
    # A fresh interpreter where crformer._C cannot be imported: crformer.ops still works, warns once.
    code = (
        "import sys, warnings, torch\n"
        "sys.modules['crformer._C'] = None\n"
        "from crformer.ops import masked_pool, reference_masked_pool\n"
        "from crformer.ops import pooling\n"
        "assert not pooling.HAS_EXTENSION and not pooling.CUDA_COMPILED\n"
        "x, m = torch.randn(2, 3, 4), torch.tensor([[True, False, True], [False] * 3])\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    for mode in ('mean', 'max', 'mean'):\n"
        "        assert torch.equal(masked_pool(x, m, mode), reference_masked_pool(x, m, mode))\n"
        "assert len(w) == 1 and 'falling back' in str(w[0].message), [str(i.message) for i in w]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@needs_ext
@pytest.mark.parametrize("mode", MODES)
def test_torch_compile_fullgraph(mode):
    # The op alone (no pointwise ops around it) keeps inductor from compiling C++ kernels: fast.
    compiled = torch.compile(lambda x, mask: masked_pool(x, mask, mode), fullgraph=True)
    x, mask = make_inputs(4, 7, 33, torch.float32, seed=3)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    out_c = compiled(x1, mask)
    out_e = masked_pool(x2, mask, mode)
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
    grad = torch.randn_like(out_e)
    out_c.backward(grad)
    out_e.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)


# --- CUDA ----------------------------------------------------------------------------------------


@needs_ext
@needs_cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_parity_cuda(shape, layout, dtype, mode):
    assert pooling.CUDA_COMPILED, "crformer._C has no CUDA kernels"
    x, mask = make_inputs(*shape, dtype, device="cuda", layout=layout, seed=11)
    check_parity(x, mask, mode)


@needs_ext
@needs_cuda
@pytest.mark.parametrize("mode", MODES)
def test_cuda_matches_cpu_and_gradcheck(mode):
    x, mask = make_inputs(3, 5, 4, torch.float64, device="cuda", seed=4)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: masked_pool(t, mask, mode), (x,))
    x, mask = make_inputs(6, 40, 300, torch.float32, seed=5)  # L > 8 token slices per block
    for dtype in GPU_DTYPES:
        xd = x.to(dtype)
        torch.testing.assert_close(masked_pool(xd.cuda(), mask.cuda(), mode).cpu(), masked_pool(xd, mask, mode),
                                   rtol=0, atol=ATOL[dtype] * 4)


@needs_ext
@needs_cuda
def test_max_ties_lowest_index_cuda():
    x = torch.full((3, 37, 70), 2.0, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mask = torch.ones(3, 37, dtype=torch.bool, device="cuda")
    mask[1, :5] = False
    mask[2] = False
    out = masked_pool(x, mask, "max")
    out.backward(torch.ones_like(out))
    expected = torch.zeros(3, 37, 70, dtype=torch.bfloat16, device="cuda")
    expected[0, 0] = 1
    expected[1, 5] = 1
    assert torch.equal(x.grad, expected)
    assert torch.equal(out[2], torch.zeros(70, dtype=torch.bfloat16, device="cuda"))
