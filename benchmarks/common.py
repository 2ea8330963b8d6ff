"""Shared helpers for the benchmark scripts: device/bandwidth, timing, byte counts, tables, JSON.

Byte counting (DESIGN.md §6): the floor of an op is the bytes it *must* move — each input read once,
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

RESULTS_DIR = Path(__file__).resolve().parent / "results"
L2_BYTES = 50 * 2**20  # H100 and H200 both have 50 MB of L2

# HBM bandwidth used for the floor, by device-name substring: (bytes/s, where the number comes from).
BANDWIDTHS = [
    ("H200", 4.0e12, "H200 ~4.0 TB/s: GUESS of a measured copy (4.8 TB/s spec), not measured here"),
    ("H100", 3.0e12, "H100 3.0 TB/s: measured copy (DESIGN.md §6)"),
]

CPU_NOTE = ("CPU-only run: reference and sdpa paths only (torch.compile / FlexAttention / xformers / triton "
            "need CUDA); fp32; no HBM floor; shared CPU, numbers are noisy")


# ------------------------------------------------------------------------------------- device
class Device:
    """Where the benchmark runs: torch device, name, file slug, HBM bandwidth (None on CPU)."""

    def __init__(self, force_cpu: bool = False):
        self.cuda = torch.cuda.is_available() and not force_cpu
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
        else:
            self.name, self.slug = "cpu", "cpu"
            self.bandwidth, self.bandwidth_note = None, "CPU: no HBM floor"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32

    def header(self, what: str) -> str:
        lines = [f"== {what} on {self.name} (torch {torch.__version__}, dtype "
                 f"{str(self.dtype).replace('torch.', '')}) =="]
        if self.cuda:
            lines.append(f"   timing: triton do_bench median (CUDA events); floor: {self.bandwidth_note}")
        else:
            lines.append(f"   {CPU_NOTE}; {torch.get_num_threads()} thread(s), perf_counter median")
        return "\n".join(lines)

    def meta(self) -> dict:
        import platform

        m = {"device": self.name, "slug": self.slug, "torch": torch.__version__, "dtype": str(self.dtype),
             "bandwidth_Bps": self.bandwidth, "bandwidth_note": self.bandwidth_note,
             "python": platform.python_version(), "threads": torch.get_num_threads()}
        try:
            import triton

            m["triton"] = triton.__version__
        except ImportError:
            pass
        if not self.cuda:
            m["note"] = CPU_NOTE
        return m


# ------------------------------------------------------------------------------------- timing
def time_ms(fn: Callable[[], object], dev: Device, quick: bool = False) -> float:
    """Median wall time of ``fn()`` in ms (GPU: do_bench; CPU: perf_counter after warm-up)."""
    if dev.cuda:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100, return_mode="median"))
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


def time_events_ms(fn: Callable[[], object], dev: Device, warmup: int = 3, reps: int = 10) -> float:
    """Median of per-call times for long calls (a training step): CUDA events or perf_counter."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if dev.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mb(fn: Callable[[], object], dev: Device) -> Optional[float]:
    """Peak CUDA memory allocated during one ``fn()`` above what was allocated before (None on CPU)."""
    if not dev.cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
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


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def skip(rows: list[dict], case: str, backend: str, passname: str, why: str) -> None:
    rows.append({"case": case, "backend": backend, "pass": passname, "bytes": None, "ms": None,
                 "peak_MB": None, "note": f"skipped: {why}"})


# ------------------------------------------------------------------------------------- output
def add_common_args(ap) -> None:
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
    return Device(force_cpu=args.cpu)


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


def attention_backends(dev: Device, compiled: bool = True) -> list[tuple[str, Optional[Callable], str]]:
    """[(name, fn(q, k, v, mask) or None, why skipped)] for every peer of ``cross_attention``.

    FlexAttention's block mask is built from the same key padding mask outside the timed call
    (cached per mask tensor): a model would build it once per batch and reuse it across layers."""
    from crformer.ops import cross_attention, reference_cross_attention

    out: list = []
    for name in ("reference", "sdpa"):
        out.append((name, lambda q, k, v, m, _n=name: cross_attention(q, k, v, m, backend=_n), ""))
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
    try:
        import xformers.ops  # noqa: F401

        out.append(("xformers", lambda q, k, v, m: cross_attention(q, k, v, m, backend="xformers"), ""))
    except ImportError:
        out.append(("xformers", None, "xformers not importable"))
    out.append(("triton", lambda q, k, v, m: cross_attention(q, k, v, m, backend="triton"), ""))
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
    if not dev.cuda:
        print(ATTENTION_CPU_NOTE)
    return dev
