"""What a call costs: the bytes it must move (the floor), model FLOPs from ``FlopCounterMode`` with
formulas for the ops it cannot see into, aten calls per step, kernel launches and MFU."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .device import Device


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def attention_bytes(B, H, M, N, d, es, masked: bool, backward: bool, short_max_n: int = 64,
                    kv_same: bool = False) -> tuple[int, int]:
    """(forward bytes, backward bytes) of ``cross_attention`` that any implementation must move.

    forward: read q (B·H·M·d), k and v (B·H·N·d each), the B×N bool mask; write o (B·H·M·d).
    backward: read q, k, v, dO, mask; for long keys (N > 64, flash regime) also O and the fp32
    log-sum-exp (B·H·M) — the short-key regime recomputes P and saves neither; write dq, dk, dv.
    ``kv_same``: k and v are one tensor (the folded decoder attention reads the memory as both), so
    it is read once and one gradient is written for it.
    """
    q = B * H * M * d * es
    kv = (1 if kv_same else 2) * B * H * N * d * es
    mask = B * N if masked else 0
    fwd = q + kv + mask + q
    if not backward:
        return fwd, 0
    saved = (q + B * H * M * 4) if N > short_max_n else 0
    bwd = q + kv + q + mask + saved + q + kv  # read q,k,v,dO(,O,lse),mask; write dq,dk,dv
    return fwd, bwd


def module_bytes(inputs, outputs, module: torch.nn.Module, backward: bool, grad_inputs=()) -> tuple[int, int]:
    """(forward, backward) bytes of a whole module call: inputs + parameters read once, outputs
    written once; backward reads grad-outputs, inputs and parameters and writes grad-inputs (for
    ``grad_inputs``) and parameter grads. Intermediates are not counted (a perfectly fused layer)."""
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    fwd = nbytes(*inputs) + params + nbytes(*outputs)
    if not backward:
        return fwd, 0
    bwd = nbytes(*outputs) + nbytes(*inputs) + params + nbytes(*grad_inputs) + params
    return fwd, bwd


# FLOPs are *model* FLOPs, counted by ``torch.utils.flop_counter.FlopCounterMode`` on the exact call (shapes of
# the ops that run, not an estimate): matmuls, convolutions and attention, 2 per multiply-add; elementwise ops,
# norms, softmax and reductions count 0. Attention is 4·B·H·M·N·d forward (QKᵀ and PV) and twice that
# backward (dQ, dK, dV and dP) on every backend. What a kernel recomputes is not counted: torch's own formulas
# for its SDPA backwards add the recomputed QKᵀ (a fifth matmul), so :func:`flop_counter` overrides them, and
# the ops FlopCounterMode cannot see into (our torch.library custom ops, SDPA's CPU flash kernel, which torch
# has no formula for) get formulas with the same convention; masked pooling counts B·L·C each way (negligible).


def attention_flops(B: int, H: int, M: int, N: int, d: int, d_v: Optional[int] = None) -> int:
    """Model FLOPs of one attention forward: QKᵀ (2·B·H·M·N·d) + PV (2·B·H·M·N·d_v)."""
    return 2 * B * H * M * N * (d + (d if d_v is None else d_v))


# Formulas take the op's arguments with tensors replaced by their shapes (FlopCounterMode's shape_wrapper).
def _attention_fwd_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:  # q B×H×M×d, k/v B×H×N×d
    return attention_flops(q[0], q[1], q[2], k[2], q[3], v[3])


def _attention_bwd_flops(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return 2 * _attention_fwd_flops(q, k, v)


def _memory_fwd_flops(q, memory, *args, out_shape=None, **kwargs) -> int:  # q B×M×D, memory B×N×D, one head
    return attention_flops(q[0], 1, q[1], memory[1], q[2])


def _memory_bwd_flops(grad_out, q, memory, *args, out_shape=None, **kwargs) -> int:
    return 2 * _memory_fwd_flops(q, memory)


def _pool_flops(x, mask, *args, out_shape=None, **kwargs) -> int:  # x B×L×C
    return math.prod(x)


def _pool_bwd_flops(grad_out, mask, *args, out_shape=None, **kwargs) -> int:  # grad_out B×C, mask B×L
    return mask[0] * mask[1] * grad_out[1]


# (namespace, op) -> formula, registered with register_flop_formula where the op exists and has none.
FLOP_FORMULAS = {
    ("aten", "_scaled_dot_product_flash_attention_for_cpu"): _attention_fwd_flops,
    ("aten", "_scaled_dot_product_flash_attention_for_cpu_backward"): _attention_bwd_flops,
    ("crformer", "triton_cross_attention_fwd"): _attention_fwd_flops,
    ("crformer", "triton_cross_attention_bwd"): _attention_bwd_flops,
    ("crformer", "triton_memory_attention_fwd"): _memory_fwd_flops,
    ("crformer", "triton_memory_attention_bwd"): _memory_bwd_flops,
    ("crformer", "masked_pool"): _pool_flops,
    ("crformer", "masked_pool_backward"): _pool_bwd_flops,
}
# torch's own formulas for these count the recomputed QKᵀ; replaced in every counter by the model-FLOP one.
TORCH_SDPA_BACKWARDS = ("_scaled_dot_product_efficient_attention_backward",
                        "_scaled_dot_product_flash_attention_backward",
                        "_scaled_dot_product_cudnn_attention_backward")


def _op_packet(namespace: str, name: str):
    try:
        return getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return None


def register_flop_formulas() -> list[str]:
    """Register :data:`FLOP_FORMULAS` for every op that exists in this process and has no formula yet
    (idempotent). The Triton ops exist once ``crformer.kernels`` imports (triton installed), masked_pool
    once the ``crformer._C`` extension is built. Returns the ops that have our formula."""
    import importlib

    from torch.utils.flop_counter import flop_registry, register_flop_formula

    for module in ("crformer.ops", "crformer.kernels.cross_attention", "crformer.kernels.memory_attention"):
        try:  # importing defines the custom ops
            importlib.import_module(module)
        except ImportError:  # no triton: the triton ops cannot run here either
            pass
    done = []
    for (namespace, name), formula in FLOP_FORMULAS.items():
        packet = _op_packet(namespace, name)
        if packet is None:
            continue
        if packet not in flop_registry:
            register_flop_formula(packet)(formula)
        if getattr(flop_registry[packet], "__wrapped__", None) is formula:
            done.append(f"{namespace}::{name}")
    return done


def flop_counter():
    """A ``FlopCounterMode`` (no printout) counting model FLOPs, the same for every attention backend."""
    from torch.utils.flop_counter import FlopCounterMode

    register_flop_formulas()
    overrides = {p: _attention_bwd_flops for p in (_op_packet("aten", n) for n in TORCH_SDPA_BACKWARDS) if p}
    return FlopCounterMode(display=False, custom_mapping=overrides)


class OpCounter(TorchDispatchMode):
    """Counts the operator calls of a region, by phase and namespace (``aten``, ``crformer``, …).

    "Top level" here: a ``TorchDispatchMode`` sees each call that enters the dispatcher from above the
    backend kernels — issued by Python (the model, the loss, the optimizer), by a CompositeImplicit op's
    decomposition (``F.linear`` → ``t`` + ``addmm``), by an autograd backward formula or by autocast's
    casts — once, and not the calls a kernel makes inside itself (its outputs' allocation, an op that calls
    another op in C++). That is one dispatcher round trip each, the per-op host cost an eager step pays."""

    def __init__(self):
        super().__init__()
        self.counts: dict = {}
        self.current = ""

    def phase(self, name: str) -> "OpCounter":
        """``with counter.phase("fwd"): ...`` counts the block under ``name``."""
        self.current = name
        return self

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        key = (self.current, getattr(func, "namespace", "other"))
        self.counts[key] = self.counts.get(key, 0) + 1
        return func(*args, **(kwargs or {}))

    def total(self, namespace: str = "aten", phase: Optional[str] = None) -> int:
        return sum(n for (p, ns), n in self.counts.items() if ns == namespace and phase in (None, p))


def account_step(forward_loss: Callable[[], torch.Tensor], backward: Callable[[torch.Tensor], None],
                 optimizer_step: Callable[[], None]) -> dict:
    """Run one training step in its three phases and count it: ``flops`` of forward + loss + backward
    (:func:`flop_counter`), top-level ``aten_calls`` of the whole step (:class:`OpCounter`) and per phase
    (``aten_fwd``: forward + loss, ``aten_bwd``, ``aten_opt``: zero_grad + optimizer), ``custom_ops``
    (calls of non-aten ops, e.g. ``crformer::*``, in the whole step)."""
    ops = OpCounter()
    with flop_counter() as flops:
        with ops.phase("fwd"):
            loss = forward_loss()
        with ops.phase("bwd"):
            backward(loss)
    with ops.phase("opt"):
        optimizer_step()
    # profiler::_record_function_* are the optimizer's record_function markers, not work
    custom = sum(n for (_, ns), n in ops.counts.items() if ns not in ("aten", "prim", "profiler"))
    return {"flops": flops.get_total_flops(), "aten_calls": ops.total(), "aten_fwd": ops.total(phase="fwd"),
            "aten_bwd": ops.total(phase="bwd"), "aten_opt": ops.total(phase="opt"), "custom_ops": custom}


def mfu_pct(flops: Optional[int], ms: Optional[float], dev: Device) -> Optional[float]:
    """Model FLOPs utilisation in % of the card's dense bf16 peak; None without a peak (CPU, unknown card)."""
    if not (flops and ms and dev.peak_tflops):
        return None
    return 100 * flops / (ms * 1e-3) / (dev.peak_tflops * 1e12)


def count_kernels(events) -> tuple[int, float]:
    """(kernel launches, summed kernel time in ms) among ``torch.profiler`` events: device (CUDA) events that
    are kernels — activity type ``kernel`` where the profiler records it (torch ≥ 2.14; older: by name),
    never a Memcpy/Memset or a user annotation projected onto the GPU timeline."""
    from torch.autograd import DeviceType

    n, us = 0, 0.0
    for e in events:
        kind = getattr(e, "activity_type", None)
        if (e.device_type != DeviceType.CUDA or e.name.startswith(("Memcpy", "Memset"))
                or getattr(e, "is_user_annotation", False) or (kind and "kernel" not in kind)):
            continue
        n += 1
        us += e.time_range.elapsed_us()
    return n, us / 1e3


def profile_kernels(fn: Callable[[], object], dev: Device) -> dict:
    """``kernels`` launched and ``kernel_ms`` (summed kernel time: GPU busy time) of one ``fn()``, from
    ``torch.profiler``; {} on CPU. A rehearsal profiles on CPU all the same, so that the profiler and
    :func:`count_kernels` meet real events before a GPU call depends on them (no CUDA event: nothing to report)."""
    if not (dev.cuda or dev.rehearse):
        return {}
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if dev.cuda else (lambda: None)
    sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.cuda else [])) as prof:
        fn()
        sync()
    n, ms = count_kernels(prof.events())
    return {"kernels": n, "kernel_ms": ms} if dev.cuda else {}
