"""Shared helpers for the benchmark scripts: device/bandwidth, timing, byte counts, tables, JSON.

Byte counting (docs/DESIGN.md §6): the floor of an op is the bytes it *must* move — each input read once,
each output written once — divided by the HBM bandwidth. Caches, recomputation and intermediate
tensors are not counted, so "% of floor" = floor time / measured time says how far an implementation
is from a perfectly fused, bandwidth-bound one (100% = at the floor).

Timing: on CUDA two numbers per row. "median ms" is ``triton.testing.do_bench`` on the eager call
(CUDA events, median, warm-up; it zeroes a 256 MB buffer before every call, which evicts L2): what a
caller sees, including host-side launch cost whenever the GPU finishes before Python has issued the
next kernel, which is the case for most single attention calls here (tens of µs of GPU work against
tens to hundreds of µs of dispatch). "graph ms" replays the same calls from a CUDA graph
(``do_bench_cudagraph``): the GPU time of the kernels alone, what a GPU-bound training step pays.
Input rotation (copies > 2× L2) keeps the graph numbers out of L2 for all but the smallest cases. On
CPU ``time.perf_counter`` median after warm-up; CPU numbers on the shared development machine are noisy.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

RESULTS_DIR = Path(__file__).resolve().parent / "results"
L2_BYTES = 50 * 2**20  # H100 and H200 both have 50 MB of L2

# HBM bandwidth used for the floor, by device-name substring: (bytes/s, where the number comes from).
BANDWIDTHS = [
    ("H200", 4.0e12, "H200 ~4.0 TB/s: GUESS of a measured copy (4.8 TB/s spec), not measured here"),
    ("H100", 3.0e12, "H100 3.0 TB/s: measured copy (docs/DESIGN.md §6)"),
]

# Dense (no 2:4 sparsity) bf16 tensor-core peak in TFLOP/s, by device name (torch.cuda.get_device_name()), for
# the MFU column. NVIDIA's datasheets print the bf16 figure *with sparsity* (marked "*"); dense is half of it:
#   H100 SXM 1,979* -> 989, H100 PCIe 1,513* -> 756 (H100 datasheet table, as reproduced at
#     archive-lib.hpctech.co.jp/gpuproduct/nvidia-h100.html: "Shown with sparsity. 1/2 lower without");
#   H200 (SXM) 1,979* -> 989 (H200 datasheet; same GH100 compute as the H100 SXM; the H200 NVL card is lower
#     and is NOT matched);
#   A100 SXM4 / PCIe, 40 / 80 GB: 312 dense, 624* (A100 datasheet nvidia-a100-datasheet-us-nvidia-1758950-r4,
#     as cited at glennklockwood.com/garden/processors/A100);
#   L40S 362.05 dense, 733* (L40/L40S datasheet table, as reproduced at mullet.se; the L40 is 181 and NOT matched).
# (nvidia.com itself was not reachable from the session that wrote this; the figures above agree across the
# reproductions.) Names are matched strictly; an H100 whose name says neither SXM/HBM3 nor PCIe (H100 NVL), an
# H200 NVL, a GH200, a MIG slice, any other card and the CPU get no peak: MFU is left blank, never guessed.
PEAK_BF16_TFLOPS = [
    (r"\bH100\b.*\bPCIE\b", 756.0, "H100 PCIe: 756 TFLOP/s dense bf16 (datasheet 1,513 with sparsity)"),
    (r"\bH100\b.*\b(SXM\w*|HBM3)\b", 989.0, "H100 SXM: 989 TFLOP/s dense bf16 (datasheet 1,979 with sparsity)"),
    (r"\bH200\b(?!.*\bNVL\b)", 989.0, "H200 SXM: 989 TFLOP/s dense bf16 (datasheet 1,979 with sparsity)"),
    (r"\bA100\b", 312.0, "A100: 312 TFLOP/s dense bf16 (datasheet)"),
    (r"\bL40S\b", 362.0, "L40S: 362 TFLOP/s dense bf16 (datasheet 362.05; 733 with sparsity)"),
]


def peak_bf16_tflops(name: str) -> tuple[Optional[float], str]:
    """(dense bf16 peak in TFLOP/s, note) for a CUDA device name; (None, why) when the card is not in the table."""
    upper = name.upper()
    if re.search(r"\bMIG\b", upper):
        return None, f"{name}: MIG slice, no peak (MFU blank)"
    for pattern, tflops, note in PEAK_BF16_TFLOPS:
        if re.search(pattern, upper):
            return tflops, note
    return None, f"{name}: not in the peak table (MFU blank)"


CPU_NOTE = ("CPU-only run: reference and sdpa paths only (torch.compile / FlexAttention / xformers / triton "
            "need CUDA); fp32; no HBM floor; shared CPU, numbers are noisy")
REHEARSE_NOTE = ("REHEARSAL (--rehearse): toy sizes, one timed repetition, on CPU, backends that can run interpreted "
                 "(triton under TRITON_INTERPRET=1) included: it proves the GPU suite's command lines, its numbers "
                 "mean nothing")


# ------------------------------------------------------------------------------------- device
class Device:
    """Where the benchmark runs: torch device, name, file slug, HBM bandwidth (None on CPU).
    ``rehearse``: a CPU rehearsal of the GPU suite (:data:`REHEARSE_NOTE`)."""

    def __init__(self, force_cpu: bool = False, rehearse: bool = False):
        self.rehearse = rehearse
        self.cuda = torch.cuda.is_available() and not (force_cpu or rehearse)
        self.device = torch.device("cuda" if self.cuda else "cpu")
        if self.cuda:
            self.name = torch.cuda.get_device_name()
            words = re.sub(r"[^a-z0-9 ]+", " ", self.name.lower()).split()
            self.slug = "-".join(words[:2]) or "cuda"
            self.bandwidth, self.bandwidth_note = None, "unknown GPU: no floor"
            for key, bw, note in BANDWIDTHS:
                if key in self.name.upper():
                    self.bandwidth, self.bandwidth_note = bw, note
                    break
            self.peak_tflops, self.peak_note = peak_bf16_tflops(self.name)
        else:
            self.name, self.slug = "cpu", "cpu"
            self.bandwidth, self.bandwidth_note = None, "CPU: no HBM floor"
            self.peak_tflops, self.peak_note = None, "CPU: no peak (MFU blank)"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32

    def header(self, what: str) -> str:
        lines = [f"== {what} on {self.name} (torch {torch.__version__}, dtype "
                 f"{str(self.dtype).replace('torch.', '')}) =="]
        if self.cuda:
            lines.append(f"   timing: triton do_bench median (CUDA events); floor: {self.bandwidth_note}; "
                         f"MFU peak: {self.peak_note}")
        else:
            lines.append(f"   {CPU_NOTE}; {torch.get_num_threads()} thread(s), perf_counter median")
        if self.rehearse:
            lines.append(f"   {REHEARSE_NOTE}")
        return "\n".join(lines)

    def meta(self) -> dict:
        import platform

        m = {"device": self.name, "slug": self.slug, "torch": torch.__version__, "dtype": str(self.dtype),
             "bandwidth_Bps": self.bandwidth, "bandwidth_note": self.bandwidth_note,
             "peak_bf16_tflops": self.peak_tflops, "peak_note": self.peak_note,
             "python": platform.python_version(), "threads": torch.get_num_threads()}
        try:
            import triton

            m["triton"] = triton.__version__
        except ImportError:
            pass
        if not self.cuda:
            m["note"] = CPU_NOTE
        if self.rehearse:
            m["rehearse"] = REHEARSE_NOTE
        return m


# ------------------------------------------------------------------------------------- timing
def time_ms(fn: Callable[[], object], dev: Device, quick: bool = False) -> float:
    """Median wall time of ``fn()`` in ms (GPU: do_bench; CPU: perf_counter after warm-up)."""
    if dev.cuda:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100, return_mode="median"))
    if dev.rehearse:  # one warm-up, one timed call: the rehearsal checks that it runs
        return time_events_ms(fn, dev, warmup=1, reps=1)
    fn()  # warm-up, and an estimate of the cost to pick the repetition count
    t0 = time.perf_counter()
    fn()
    est = time.perf_counter() - t0
    budget = 0.25 if quick else 2.0  # seconds per measurement
    reps = int(max(3, min(50, budget / max(est, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def time_graph_ms(fn: Callable[[], object], quick: bool = False) -> float:
    """Median GPU time per ``fn()`` in ms, replayed from a CUDA graph of unrolled calls (no host cost)."""
    from triton.testing import do_bench_cudagraph

    return float(do_bench_cudagraph(fn, rep=10 if quick else 25, return_mode="median"))


def time_events_ms(fn: Callable[[], object], dev: Device, warmup: int = 3, reps: int = 10,
                   host_ms: Optional[list] = None) -> float:
    """Median of per-call times for long calls (a training step): CUDA events or perf_counter.

    On CUDA, ``host_ms`` (a list, if given) receives every call's host time: ``perf_counter`` around the
    call with no sync, the time Python takes to enqueue it. Host time well below the event time: the GPU
    is the bottleneck; about equal: the GPU waits for Python (or the call syncs with the host)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if dev.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
        t0 = time.perf_counter()
        fn()
        host = (time.perf_counter() - t0) * 1e3
        if dev.cuda:
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
            if host_ms is not None:
                host_ms.append(host)
        else:
            times.append(host)
    return statistics.median(times)


def peak_mb(fn: Callable[[], object], dev: Device, total: bool = False) -> Optional[float]:
    """Peak CUDA memory allocated during one ``fn()`` above what was allocated before, or with ``total`` all
    of it (what the card must hold: weights, optimizer state, activations); None on CPU."""
    if not dev.cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = 0 if total else torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def rotation(make: Callable[[], tuple], nbytes: int, dev: Device, cap: int = 8) -> Callable[[], tuple]:
    """A function returning the next of n input sets (n copies total > 2× L2 on GPU, 1 on CPU)."""
    n = 1 if not dev.cuda else max(1, min(cap, math.ceil(2 * L2_BYTES / max(nbytes, 1))))
    sets = [make() for _ in range(n)]
    state = {"i": 0}

    def nxt():
        s = sets[state["i"] % n]
        state["i"] += 1
        return s

    return nxt


# ------------------------------------------------------------------------------------- bytes
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


# ------------------------------------------------------------------------------------- accounting
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


# ------------------------------------------------------------------------------------- rows
def fmt(v, spec: str, none: str = "—") -> str:
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def finish_rows(rows: list[dict], dev: Device, group_keys=("case", "pass")) -> None:
    """Fill GB/s, % of floor and speed-up over the best peer (best *other* backend, same case/pass),
    for the eager time and, where measured, for the graph time (``graph_`` prefix)."""
    for r in rows:
        r["floor_us"] = r["bytes"] / dev.bandwidth * 1e6 if dev.bandwidth and r.get("bytes") else None
        for pre in ("", "graph_"):
            ms = r.get(pre + "ms")
            r[pre + "GBps"] = r["bytes"] / (ms * 1e-3) / 1e9 if ms and r.get("bytes") else None
            r[pre + "pct_floor"] = 100 * r["floor_us"] / (ms * 1e3) if r["floor_us"] and ms else None
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in group_keys), []).append(r)
    for g in groups.values():
        for r in g:
            for pre in ("", "graph_"):
                peers = [o[pre + "ms"] for o in g if o is not r and o.get(pre + "ms")]
                mine = r.get(pre + "ms")
                r[pre + "speedup_vs_best_peer"] = min(peers) / mine if peers and mine else None


COLUMNS = [("case", "case", "s"), ("backend", "backend", "s"), ("pass", "pass", "s"), ("ms", "median ms", ".4f"),
           ("GBps", "GB/s", ".1f"), ("pct_floor", "% floor", ".1f"), ("speedup_vs_best_peer", "× best peer", ".2f"),
           ("peak_MB", "peak MB", ".1f")]
GRAPH_COLUMNS = [("graph_ms", "graph ms", ".4f"), ("graph_pct_floor", "% floor (graph)", ".1f"),
                 ("graph_speedup_vs_best_peer", "× best peer (graph)", ".2f")]


def columns_for(rows: list[dict], columns=COLUMNS) -> list[tuple]:
    """``columns`` plus the graph-timing columns when any row has a graph time (CUDA runs)."""
    columns = list(columns)
    if any(r.get("graph_ms") for r in rows):
        columns += [c for c in GRAPH_COLUMNS if c not in columns]
    return columns


def table(rows: list[dict], columns=COLUMNS) -> str:
    """Markdown table (also readable on a terminal); a failed or skipped row shows its note."""
    columns = columns_for(rows, columns)
    head = "| " + " | ".join(h for _, h, _ in columns) + " | note |"
    sep = "|" + "|".join("---" for _ in range(len(columns) + 1)) + "|"
    lines = [head, sep]
    for r in rows:
        cells = [fmt(r.get(k), s) if s != "s" else str(r.get(k, "")) for k, _, s in columns]
        lines.append("| " + " | ".join(cells) + f" | {r.get('note', '')} |")
    return "\n".join(lines)


def run_case(rows: list[dict], dev: Device, case: str, backend: str, passname: str, fn: Callable[[], object],
             nbytes_: int, quick: bool, extra: Optional[dict] = None, timer=time_ms) -> dict:
    """Time ``fn`` (errors become a note, never a crash) and append the row."""
    row = {"case": case, "backend": backend, "pass": passname, "bytes": nbytes_, "ms": None, "peak_MB": None,
           "graph_ms": None, **(extra or {})}
    try:
        row["ms"] = timer(fn, dev, quick) if timer is time_ms else timer(fn, dev)
        row["peak_MB"] = peak_mb(fn, dev)
    except Exception as e:  # a peer that cannot run this shape: record why and go on
        row["note"] = f"error: {_first_line(e)}"
        if dev.cuda:
            torch.cuda.synchronize()
    if dev.cuda and timer is time_ms and row["ms"] is not None:
        try:
            row["graph_ms"] = time_graph_ms(fn, quick)
        except Exception as e:  # e.g. a peer that syncs with the host cannot be captured
            row["note"] = f"graph: {_first_line(e)}"
            torch.cuda.synchronize()
    rows.append(row)
    ms, gms = fmt(row["ms"], ".4f"), fmt(row["graph_ms"], ".4f")
    graph = f" (graph {gms} ms)" if dev.cuda else ""
    print(f"  {case:<28} {backend:<18} {passname:<8} {ms:>10} ms{graph} {row.get('note', '')}", flush=True)
    return row


def rehearsal_failures(dev: Device, rows: list[dict]) -> int:
    """Exit status of a benchmark: in a rehearsal every row must run (an error note is a failure: on CPU at toy
    sizes nothing is expected to fail), so 1 if any did not; elsewhere 0 (a peer that cannot run a shape on a
    GPU is a result, recorded in its row)."""
    failed = [r for r in rows if "error" in r.get("note", "")] if dev.rehearse else []
    for r in failed:
        print(f"REHEARSAL FAILED: {r['case']} / {r['backend']} / {r['pass']}: {r['note']}", flush=True)
    return 1 if failed else 0


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def skip(rows: list[dict], case: str, backend: str, passname: str, why: str) -> None:
    """Append a row that says why it was not run, and say so on the console."""
    rows.append({"case": case, "backend": backend, "pass": passname, "bytes": None, "ms": None,
                 "peak_MB": None, "note": f"skipped: {why}"})
    print(f"  {case:<28} {backend:<18} {passname:<8} skipped: {why}", flush=True)


# ------------------------------------------------------------------------------------- output
def add_rehearse_arg(ap) -> None:
    ap.add_argument("--rehearse", action="store_true",
                    help="CPU rehearsal of benchmarks/run_gpu_suite.sh: implies --quick --cpu, one timed repetition, "
                         "triton interpreted where TRITON_INTERPRET=1 is set; proves the command, not a number")


def add_common_args(ap) -> None:
    add_rehearse_arg(ap)
    ap.add_argument("--quick", action="store_true", help="tiny shapes / few repetitions (CPU run < ~30 s)")
    ap.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")
    ap.add_argument("--out-dir", default=str(RESULTS_DIR), help="where <device>-<date>.json/.md go")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def setup(args) -> Device:
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args.quick = args.quick or args.rehearse  # the scripts choose their tiny CPU shapes by --quick
    return Device(force_cpu=args.cpu, rehearse=args.rehearse)


def save(out_dir: str, dev: Device, section: str, rows: list[dict], notes: list[str], columns=COLUMNS) -> Path:
    """Merge ``section`` into ``<out_dir>/<slug>-<date>.json`` (other scripts' sections are kept) and
    rewrite the markdown next to it with every section. Returns the JSON path."""
    columns = columns_for(rows, columns)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{dev.slug}-{_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d')}"
    path = out / f"{stem}.json"
    data = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except ValueError:
            data = {}
    data["meta"] = dev.meta()
    data.setdefault("sections", {})[section] = {
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "notes": notes, "columns": [list(c) for c in columns], "rows": rows}
    path.write_text(json.dumps(data, indent=1, default=str))
    write_markdown(path)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return path


def write_markdown(path: Path) -> None:
    """Render a results JSON (every section) as the markdown file next to it."""
    data = json.loads(Path(path).read_text())
    meta = data["meta"]
    md = [f"# Benchmarks on {meta['device']} ({Path(path).stem})", "", f"torch {meta.get('torch')}, triton "
          f"{meta.get('triton', '—')}, {meta['dtype']}; floor: {meta['bandwidth_note']}", ""]
    for name, sec in data["sections"].items():
        cols = [tuple(c) for c in sec["columns"]]
        md += [f"## {name}", "", f"`{sec['command']}` at {sec['time_utc']}", ""]
        md += [f"- {n}" for n in sec["notes"]] + [""]
        md += [table(sec["rows"], cols), ""]
    Path(path).with_suffix(".md").write_text("\n".join(md))



# ------------------------------------------------------------------------------------- attention
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
