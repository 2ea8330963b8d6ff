"""Benchmark masked language pooling: the compiled op (crformer._C) vs the PyTorch reference.

    python benchmarks/bench_pool.py            # CPU always; CUDA too when a GPU is present
    python benchmarks/bench_pool.py --quick    # fewer repetitions/configs, < 30 s

Shapes: B = 32, L = 20, C in {768, 1024} (BERT-base / -large widths), modes mean and max, forward
and forward+backward. CPU: median wall time over repetitions after warm-up, op and reference timed in
the same run, ratio = reference / op. CUDA: triton.testing.do_bench (CUDA events, median) with
inputs rotated through more than L2, plus % of the HBM floor (bytes / the card's bandwidth, common/device.py):
forward bytes = read x + mask, write out; backward bytes = read grad_out + mask (+ x for max),
write grad_x.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402
from common import L2_BYTES  # noqa: E402  rotate inputs through more than this
from crformer.ops import pooling  # noqa: E402
from crformer.ops.pooling import masked_pool, reference_masked_pool  # noqa: E402


def make(B, L, C, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, C, generator=g).to(device=device, dtype=dtype)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    mask = (torch.arange(L)[None, :] < lengths[:, None]).to(device)
    return x, mask


def step(fn, x, mask, mode, backward, grad):
    if not backward:
        with torch.no_grad():
            return fn(x, mask, mode)
    x.grad = None
    out = fn(x, mask, mode)
    out.backward(grad)
    return out


def bytes_moved(B, L, C, es, mode, backward):
    fwd = B * L * C * es + B * L + B * C * es
    if not backward:
        return fwd
    bwd = B * C * es + B * L + B * L * C * es + (B * L * C * es if mode == "max" else 0)
    return fwd + bwd


def time_cpu(fn, args, reps, warmup):
    for _ in range(warmup):
        fn(*args)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_cpu(configs, dtypes, reps, warmup):
    print(f"\n== CPU only (torch {torch.__version__}, {torch.get_num_threads()} threads): "
          f"C++ op vs PyTorch reference, median of {reps} after {warmup} warm-up ==")
    hdr = f"{'dtype':>8} {'C':>5} {'mode':>4} {'pass':>7} | {'op µs':>9} {'ref µs':>9} {'ref/op':>7} | {'op GB/s':>7}"
    print(hdr)
    print("-" * len(hdr))
    rows = []
    for dtype in dtypes:
        for (B, L, C) in configs:
            for mode in ("mean", "max"):
                for backward in (False, True):
                    x, mask = make(B, L, C, dtype, "cpu")
                    x.requires_grad_(backward)
                    grad = torch.randn(B, C, dtype=dtype)
                    t_op = time_cpu(step, (masked_pool, x, mask, mode, backward, grad), reps, warmup)
                    t_ref = time_cpu(step, (reference_masked_pool, x, mask, mode, backward, grad), reps, warmup)
                    gbs = bytes_moved(B, L, C, x.element_size(), mode, backward) / t_op / 1e9
                    name = "fwd+bwd" if backward else "fwd"
                    dt = str(dtype).replace("torch.", "")
                    print(f"{dt:>8} {C:>5} {mode:>4} {name:>7} | {t_op * 1e6:9.1f} {t_ref * 1e6:9.1f} "
                          f"{t_ref / t_op:6.2f}x | {gbs:7.2f}")
                    rows.append((dtype, C, mode, name, t_op, t_ref))
    return rows


def bench_cuda(configs, dtypes, quick):
    from triton.testing import do_bench

    dev = common.Device()
    print(f"\n== CUDA ({dev.name}): do_bench median, inputs rotated through > L2; floor: {dev.bandwidth_note} ==")
    peers = {"reference": reference_masked_pool}
    if not quick:
        peers["compiled ref"] = torch.compile(reference_masked_pool, dynamic=False)
    hdr = (f"{'dtype':>8} {'C':>5} {'mode':>4} {'pass':>7} | {'MB':>6} {'floor µs':>8} {'op µs':>8} {'%floor':>6} | "
           + " ".join(f"{k + ' µs':>15}" for k in peers))
    print(hdr)
    print("-" * len(hdr))
    for dtype in dtypes:
        for (B, L, C) in configs:
            for mode in ("mean", "max"):
                for backward in (False, True):
                    x0, mask = make(B, L, C, dtype, "cuda")
                    es = x0.element_size()
                    nbytes = bytes_moved(B, L, C, es, mode, backward)
                    n_copies = max(1, min(64, -(-2 * L2_BYTES // max(1, B * L * C * es))))
                    xs = [x0.clone().requires_grad_(backward) for _ in range(n_copies)]
                    grad = torch.randn(B, C, dtype=dtype, device="cuda")
                    state = {"i": 0}

                    def run(fn):
                        def call():
                            x = xs[state["i"] % n_copies]
                            state["i"] += 1
                            step(fn, x, mask, mode, backward, grad)
                        return call

                    t_op = do_bench(run(masked_pool), warmup=25 if quick else 100, rep=50 if quick else 200)
                    t_peers = [do_bench(run(fn), warmup=25 if quick else 100, rep=50 if quick else 200)
                               for fn in peers.values()]
                    floor_us = nbytes / dev.bandwidth * 1e6 if dev.bandwidth else None  # unknown card: no floor
                    pct = 100 * floor_us / (t_op * 1e3) if floor_us else None
                    name = "fwd+bwd" if backward else "fwd"
                    dt = str(dtype).replace("torch.", "")
                    print(f"{dt:>8} {C:>5} {mode:>4} {name:>7} | {nbytes / 1e6:6.2f} {common.fmt(floor_us, '8.2f'):>8} "
                          f"{t_op * 1e3:8.2f} {common.fmt(pct, '5.1f'):>5}% | "
                          + " ".join(f"{t * 1e3:8.2f} ({t / t_op:4.1f}x)" for t in t_peers))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and dtypes (< 30 s)")
    ap.add_argument("--cpu-only", action="store_true", help="skip the CUDA section even if a GPU is present")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    common.add_rehearse_arg(ap)
    args = ap.parse_args()
    if args.rehearse:
        args.quick = args.cpu_only = True
        print(common.REHEARSE_NOTE)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"crformer._C built: {pooling.HAS_EXTENSION}, CUDA kernels compiled in: {pooling.CUDA_COMPILED}")
    if not pooling.HAS_EXTENSION:
        print("WARNING: extension missing, 'op' is the reference fallback; numbers are meaningless")
    configs = [(32, 20, 768), (32, 20, 1024)]
    reps, warmup = (1, 1) if args.rehearse else (30, 5) if args.quick else (200, 20)
    cpu_dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    bench_cpu(configs, cpu_dtypes, reps, warmup)

    if args.cpu_only or not torch.cuda.is_available():
        print("\nNo CUDA device: CPU results only (no GPU timings, no HBM-floor percentages).")
        return
    if not pooling.CUDA_COMPILED:
        print("\nWARNING: crformer._C has no CUDA kernels: CUDA 'op' timings are the reference fallback.")
    gpu_dtypes = [torch.bfloat16] if args.quick else [torch.bfloat16, torch.float16, torch.float32]
    bench_cuda(configs, gpu_dtypes, args.quick)


if __name__ == "__main__":
    main()
