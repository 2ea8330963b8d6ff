"""Attention benchmarks shared by ``bench_decoder.py`` and ``bench_vlf.py``: padding masks, the
registered backends a device can run, and one case timed over them."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .counting import attention_bytes
from .device import Device
from .report import run_case, setup, skip
from .timing import rotation


def padding_mask(B: int, N: int, lo: int, device, seed: int = 0) -> torch.Tensor:
    """B×N bool (True = keep) with valid prefix lengths drawn uniformly in [lo, N] (lo = N: all valid)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, N + 1, (B,), generator=g)
    return (torch.arange(N)[None, :] < lengths[:, None]).to(device)


def registered_backends(dev: Device) -> list[tuple[str, str]]:
    """[(name, why it cannot run here, or "")] for every backend of the registry
    ``crformer.ops.BACKENDS`` that runs natively on the device's type; a rehearsal also lists those that run
    interpreted on CPU (triton: the GPU suite times it, so its rehearsal must run it)."""
    from crformer.ops import BACKENDS

    def listed(b) -> bool:
        return dev.device.type in b.devices or (dev.rehearse and b.interpreted_on_cpu and not dev.cuda)

    return [(name, b.unavailable(dev.device) or "") for name, b in BACKENDS.items() if listed(b)]


def attention_backends(dev: Device, compiled: bool = True) -> list[tuple[str, Optional[Callable], str]]:
    """[(name, fn(q, k, v, mask) or None, why skipped)] for every registered backend of
    ``cross_attention`` (:func:`registered_backends`) and, on CUDA, the peers torch.compile and flex.

    FlexAttention's block mask is built from the same key padding mask outside the timed call
    (cached per mask tensor): a model would build it once per batch and reuse it across layers."""
    from crformer.ops import cross_attention, reference_cross_attention

    out: list = [(name, None if why else (lambda q, k, v, m, _n=name: cross_attention(q, k, v, m, backend=_n)), why)
                 for name, why in registered_backends(dev)]
    if not dev.cuda:  # the GPU-only peers are named once in the notes (CPU_NOTE), not per row
        return out
    if compiled:
        ref_c = torch.compile(reference_cross_attention, dynamic=False)
        out.append(("compile(reference)", lambda q, k, v, m: ref_c(q, k, v, m), ""))
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            flex_c = torch.compile(flex_attention, dynamic=False)
            cache: dict = {}

            def flex(q, k, v, m):
                if m is None:
                    return flex_c(q, k, v)
                key = (id(m), q.shape[2])
                if key not in cache:
                    def mask_mod(b, h, q_idx, kv_idx):
                        return m[b, kv_idx]
                    cache[key] = create_block_mask(mask_mod, q.shape[0], None, q.shape[2], k.shape[2],
                                                   device=q.device)
                return flex_c(q, k, v, block_mask=cache[key])

            out.append(("flex", flex, ""))
        except ImportError as e:
            out.append(("flex", None, f"unavailable: {e}"))
    else:
        out += [("compile(reference)", None, "not run for this case (compile time)"),
                ("flex", None, "not run for this case (compile time)")]
    return out


def bench_attention(rows: list[dict], dev: Device, case: str, B: int, H: int, M: int, N: int, d: int,
                    mask_lo: Optional[int], quick: bool, compiled: bool = True, seed: int = 0,
                    kv_same: bool = False) -> None:
    """Forward and forward+backward of every backend on q B×H×M×d, k/v B×H×N×d; key padding mask
    with valid lengths in [mask_lo, N], or no mask at all when ``mask_lo`` is None; ``kv_same``
    passes one tensor as both k and v (the folded decoder cross-attention)."""
    dt, device = dev.dtype, dev.device
    mask = None if mask_lo is None else padding_mask(B, N, mask_lo, device, seed)
    fwd_b, bwd_b = attention_bytes(B, H, M, N, d, torch.finfo(dt).bits // 8, mask is not None, True,
                                   kv_same=kv_same)

    def make():
        g = torch.Generator(device=device).manual_seed(seed)
        q, k, v = (torch.randn(B, H, n, d, generator=g, device=device, dtype=dt).requires_grad_()
                   for n in (M, N, N))
        if kv_same:
            v = k
        return q, k, v, torch.randn(B, H, M, d, generator=g, device=device, dtype=dt)

    nxt = rotation(make, fwd_b, dev)
    for name, impl, why in attention_backends(dev, compiled):
        if impl is None:
            skip(rows, case, name, "—", why)
            continue

        def fwd(impl=impl):
            q, k, v, _ = nxt()
            with torch.no_grad():
                return impl(q, k, v, mask)

        def fwdbwd(impl=impl):
            q, k, v, g = nxt()
            return torch.autograd.grad(impl(q, k, v, mask), (q, k, v), g)

        extra = {"B": B, "H": H, "M": M, "N": N, "d": d}
        r = run_case(rows, dev, case, name, "fwd", fwd, fwd_b, quick, extra)
        if r.get("note", "").startswith("error") and "compile" in name:
            skip(rows, case, name, "fwd+bwd", "forward failed")
            continue
        run_case(rows, dev, case, name, "fwd+bwd", fwdbwd, fwd_b + bwd_b, quick, extra)


ATTENTION_CPU_NOTE = ("CPU-only: reference and sdpa backends; torch.compile / FlexAttention / xformers / triton "
                      "are GPU only")


def start_attention_bench(args, title: str) -> Device:
    """Shared start of the attention benchmarks: set up the device, print the header and, on CPU,
    say which backends run."""
    dev = setup(args)
    print(dev.header(title))
    if not dev.cuda and not dev.rehearse:  # a rehearsal runs triton too (its header says so)
        print(ATTENTION_CPU_NOTE)
    return dev
