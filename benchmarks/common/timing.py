"""Timing: median of CUDA events or of ``time.perf_counter`` after warm-up, CUDA-graph replay, peak
memory, and input rotation that keeps graph timings out of L2."""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Optional

import torch

from .device import Device, L2_BYTES


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
