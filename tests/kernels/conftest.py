"""Kernel tests run the Triton kernels on CPU tensors via TRITON_INTERPRET=1 when there is no GPU.

Triton decides interpreted-vs-compiled when a ``@triton.jit`` function is *defined*, and triton's
own library functions (``tl.zeros`` ...) are defined when triton is imported. So the variable must be
set before anything imports triton (``torch._dynamo`` and ``crformer.ops`` do). This conftest is
imported at collection time, before the test modules. If some earlier-collected test already
imported triton without the interpreter, in-process kernel tests are impossible: the variable is
then left unset, and test_cross_attention.py (seeing no GPU and no TRITON_INTERPRET) reruns itself in
a fresh process with it set.
"""

from __future__ import annotations

import os
import sys

_NO_GPU = True
try:  # importing torch does not import triton
    import torch

    _NO_GPU = not torch.cuda.is_available()
except ImportError:  # pragma: no cover
    pass

if _NO_GPU and os.environ.get("TRITON_INTERPRET") != "1" and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"


import pytest  # noqa: E402  (after the interpreter switch above)


@pytest.fixture(autouse=True)
def nan_buffers(monkeypatch):
    """Every launcher-allocated buffer starts as NaN: any element a kernel forgets stays NaN."""
    if _NO_GPU and os.environ.get("TRITON_INTERPRET") != "1":
        return  # kernels cannot run in this process (see test_rerun_in_subprocess)
    from crformer.kernels import host

    monkeypatch.setattr(host, "alloc", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                 device=device))
