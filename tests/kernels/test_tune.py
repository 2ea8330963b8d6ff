"""benchmarks/tune_kernels.py: a candidate really reaches the launcher, and the table is restored."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs a GPU or TRITON_INTERPRET=1 set before triton was imported", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import tune_kernels  # noqa: E402

from crformer.kernels import cross_attention as ca  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_candidate_is_launched_and_restored(monkeypatch):
    shape = ("tiny", 1, 1, 70, 20, 48, 5, False)
    inputs = tune_kernels.make_inputs(shape, DEV, torch.float16)
    shipped = tune_kernels.runner(ca, shape, "fwd", inputs)()
    before = {k: dict(v) for k, v in ca.KERNEL_TABLE.items()}
    per_sm_before = ca.PROGRAMS_PER_SM
    launched = []
    real = ca._config

    def spy(entry, **want):
        cx, opts = real(entry, **want)
        launched.append((entry, cx, opts))
        return cx, opts

    monkeypatch.setattr(ca, "_config", spy)
    cfg = dict(BLOCK_M=32, BLOCK_D=16, num_warps=4, num_stages=2)
    with tune_kernels.Candidate(ca, "short_fwd", cfg, per_sm=3):
        assert ca.PROGRAMS_PER_SM == 3
        out = tune_kernels.runner(ca, shape, "fwd", inputs)()
    assert launched[-1] == ("short_fwd", {"BLOCK_M": 32, "BLOCK_D": 16, "BLOCK_N": 32},
                            {"num_warps": 4, "num_stages": 2})
    # A different tiling of the same exact softmax: equal up to fp16 rounding of the output.
    torch.testing.assert_close(out, shipped, atol=2e-3, rtol=2e-3)
    assert ca.KERNEL_TABLE == before and ca.PROGRAMS_PER_SM == per_sm_before
