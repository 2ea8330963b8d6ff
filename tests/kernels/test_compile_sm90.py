"""Ahead-of-time sm_90 (Hopper) compilation of every shipped attention kernel configuration.

No GPU needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` produces PTX,
and the ptxas inside the triton wheel reports registers and spills (docs/DESIGN.md §3). The configs come
from the ``KERNEL_TABLE`` of each kernel module (the tables the launchers use), so a new config
cannot ship untested.

The compilation runs in a subprocess because tests/kernels/conftest.py sets TRITON_INTERPRET=1 for
this process, and interpreted kernels cannot be compiled. Run this file as a script to see the
report: ``python tests/kernels/test_compile_sm90.py``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from crformer.kernels import cross_attention, host, key_splits, memory_attention
from crformer.kernels.host import shipped_configs

MODULES = (cross_attention, key_splits, memory_attention)
FLOAT_ARGS = ("qk_scale", "sm_scale")


def _configs():
    """(module, entry, kernel name, dtype, constexprs, num_warps, num_stages, mma) of every module."""
    for mod in MODULES:
        for cfg in shipped_configs(mod.KERNEL_TABLE):
            yield (mod,) + cfg


def _config_id(name, dt, cx, num_warps, num_stages):
    blocks = "-".join(f"{k[6:] if k.startswith('BLOCK_') else k}{v}" for k, v in sorted(cx.items()))
    return f"{name}-{dt}-{blocks}-w{num_warps}s{num_stages}"


def _signature(mod, fn, dt, cx):
    """Mimic the JIT's specialisation for contiguous, 16-byte aligned tensors: pointers and
    non-unit strides divisible by 16, unit strides (last dim, mask column) constant 1."""
    sig, consts, attrs = {}, dict(cx), {}
    for i, n in enumerate(fn.arg_names):
        if n in cx:
            sig[n] = "constexpr"
        elif n in mod.POINTER_ARGS:
            sig[n] = "*" + mod.POINTER_TYPES.get(n, dt)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif n in FLOAT_ARGS:
            sig[n] = "fp32"
        elif n.startswith("s_") and (n.endswith("d") or n == "s_keep_n"):
            sig[n] = "constexpr"
            consts[n] = 1
        else:
            sig[n] = "i32"
            if n.startswith("s_"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def _worker():
    """Compile every shipped config for sm_90, run ptxas -v, print one JSON line per config."""
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    assert not host.INTERPRET, "unset TRITON_INTERPRET for AOT compilation"
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    tmp = tempfile.mkdtemp(prefix="crformer_sm90_")
    for mod, entry, name, dt, cx, nw, ns, mma in _configs():
        cid = _config_id(entry, dt, cx, nw, ns)
        rec = {"id": cid}
        try:
            fn = mod.KERNELS[name]
            sig, consts, attrs = _signature(mod, fn, dt, cx)
            src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": nw, "num_stages": ns})
            ptx = k.asm["ptx"]
            path = os.path.join(tmp, cid + ".ptx")
            with open(path, "w") as f:
                f.write(ptx)
            r = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", path, "-o", path + ".cubin"],
                               capture_output=True, text=True)
            log = r.stdout + r.stderr
            rec.update(
                ptxas_rc=r.returncode,
                registers=int(m.group(1)) if (m := re.search(r"Used (\d+) registers", log)) else None,
                spill_stores=sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", log)),
                spill_loads=sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", log)),
                wgmma="wgmma.mma_async" in ptx,
                mma_sync=bool(re.search(r"\bmma\.sync", ptx)),
                log=log[-600:],
            )
        except Exception as e:  # report, let the test fail with the message
            rec["error"] = f"{type(e).__name__}: {e}"[:2000]
        print(json.dumps(rec), flush=True)


@pytest.fixture(scope="module")
def sm90_report():
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as e:
        pytest.skip(f"triton unavailable: {e}")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("triton wheel ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]
    return {rec["id"]: rec for rec in map(json.loads, r.stdout.splitlines())}


_CONFIGS = [c[1:] for c in _configs()]


@pytest.mark.parametrize("entry,name,dt,cx,num_warps,num_stages,mma", _CONFIGS,
                         ids=[_config_id(c[0], *c[2:6]) for c in _CONFIGS])
def test_sm90_compiles_without_spills(sm90_report, entry, name, dt, cx, num_warps, num_stages, mma):
    rec = sm90_report[_config_id(entry, dt, cx, num_warps, num_stages)]
    assert "error" not in rec, rec["error"]
    assert rec["ptxas_rc"] == 0, rec["log"]
    assert rec["registers"] is not None and rec["registers"] <= 255, rec["log"]
    assert rec["spill_stores"] == 0 and rec["spill_loads"] == 0, rec["log"]
    if mma == "wgmma":
        assert rec["wgmma"], "expected Hopper wgmma in the PTX"
    elif mma == "mma":
        # 16-row query tile: below wgmma's 64-row minimum, so mma.sync (see KERNEL_TABLE).
        assert rec["mma_sync"] and not rec["wgmma"]
    elif mma == "fma":
        # fp32 with input_precision="ieee": exact fp32 FMA, no tensor-core instruction.
        assert not rec["wgmma"] and not rec["mma_sync"]
    else:
        assert not rec["wgmma"] and not rec["mma_sync"]


if __name__ == "__main__":
    _worker()
