"""Sweep the Triton cross-attention kernels' tiles, warps and stages on the benchmark shapes (GPU only).

    python benchmarks/tune_kernels.py                      # every family, time every candidate
    python benchmarks/tune_kernels.py --warm-only --shard 3/8   # compile one eighth of them, no timing

For each kernel family the shipped ``KERNEL_TABLE`` entry is replaced, one candidate at a time, by a
single fixed configuration, and the public call is timed from a CUDA graph (GPU time only: the
question here is the kernels, not Python's launch cost) — the forward for ``*_fwd`` families, forward
+ backward for ``*_bwd`` (the forward then keeps its shipped config). ``PROGRAMS_PER_SM`` (key splits /
query runs) is swept at the shipped tiles. Every candidate's output is compared with the shipped
config's output on the same inputs, so a faster but wrong configuration is flagged, never picked.

Compilation dominates a sweep, so a GPU session first runs ``--warm-only`` shards in parallel
processes (they fill Triton's on-disk cache) and then one timing process, which finds every binary
cached (about 4 minutes on an H200; a call of its own: benchmarks/run_gpu_suite.sh no longer fits it), e.g.
``for i in 0 1 2 3 4 5; do python benchmarks/tune_kernels.py --warm-only --shard $i/6 & done; wait;
python benchmarks/tune_kernels.py``. Results: section "tune" of <device>-<date>.json/.md.
Apply a winner by editing ``KERNEL_TABLE``; tests/kernels/test_compile_sm90.py then checks the new
entries for register spills on the CPU machine.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import triton  # noqa: E402

import common  # noqa: E402

L_WORDS = 20
# (name, B, H, M, N, d, key mask lengths from, k is v)
VLF_SHAPES = [("vlf stage1 120² C=128", 8, 1, 120 * 120, L_WORDS, 128, 5, False),
              ("vlf stage2 60² C=256", 8, 1, 60 * 60, L_WORDS, 256, 5, False),
              ("vlf stage3 30² C=512", 8, 1, 30 * 30, L_WORDS, 512, 5, False),
              ("vlf stage4 15² C=1024", 8, 1, 15 * 15, L_WORDS, 1024, 5, False)]
CDEC_SHAPES = [("cdec cross 60² 8×32", 8, 8, 16, 60 * 60, 32, None, False),
               ("cdec cross 30² 8×32", 8, 8, 16, 30 * 30, 32, None, False)]
FOLDED_SHAPES = [("cdec folded 120² D=256", 8, 1, 128, 120 * 120, 256, None, True),
                 ("cdec folded 60² D=256", 8, 1, 128, 60 * 60, 256, None, True)]


def _grid(**axes):
    keys = list(axes)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(axes[k] for k in keys))]


# family -> (KERNEL_TABLE entry, timed pass, shapes, candidates: constexprs + num_warps/num_stages)
FAMILIES = {
    "short_fwd": ("short_fwd", "fwd", VLF_SHAPES,
                  _grid(BLOCK_M=(64, 128), BLOCK_D=(32, 64, 128), num_warps=(4, 8), num_stages=(1, 2))),
    "short_bwd": ("short_bwd", "fwd+bwd", VLF_SHAPES,
                  _grid(BLOCK_M=(32, 64, 128), BLOCK_D=(32, 64), num_warps=(4, 8), num_stages=(1, 2))),
    "long_fwd_m16": ("long_fwd_m16", "fwd", CDEC_SHAPES,
                     _grid(BLOCK_N=(32, 64, 128, 256), BLOCK_D=(32,), num_warps=(4, 8), num_stages=(1, 2, 3))),
    "long_fwd_m64": ("long_fwd_m64", "fwd", FOLDED_SHAPES,
                     _grid(BLOCK_M=(64, 128), BLOCK_N=(64, 128), BLOCK_D=(64, 128, 256), num_warps=(8,),
                           num_stages=(2, 3))),
}
PROGRAMS_PER_SM = (1, 2, 4, 8)


def make_inputs(shape, device, dtype, seed=0):
    _, B, H, M, N, d, mask_lo, kv_same = shape
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, d, generator=g, device=device, dtype=dtype).requires_grad_()
               for n in (M, N, N))
    if kv_same:
        v = k
    do = torch.randn(B, H, M, d, generator=g, device=device, dtype=dtype)
    mask = None if mask_lo is None else common.padding_mask(B, N, mask_lo, device, seed)
    return q, k, v, do, mask


class Candidate:
    """Context manager: KERNEL_TABLE[entry] holds exactly one configuration (and PROGRAMS_PER_SM)."""

    def __init__(self, ca, entry, cfg, per_sm=None):
        self.ca, self.entry, self.cfg, self.per_sm = ca, entry, cfg, per_sm

    def __enter__(self):
        ca, spec = self.ca, self.ca.KERNEL_TABLE[self.entry]
        self.saved = (spec, ca.PROGRAMS_PER_SM)
        if self.cfg is not None:
            cx = {k: v for k, v in self.cfg.items() if k.startswith("BLOCK_")}
            choices = {k: v for k, v in spec["choices"].items() if k not in cx}
            ca.KERNEL_TABLE[self.entry] = dict(spec, fixed=dict(spec["fixed"], **cx), choices=choices,
                                               num_warps=self.cfg["num_warps"], num_stages=self.cfg["num_stages"])
        if self.per_sm is not None:
            ca.PROGRAMS_PER_SM = self.per_sm
        return self

    def __exit__(self, *exc):
        self.ca.KERNEL_TABLE[self.entry], self.ca.PROGRAMS_PER_SM = self.saved


def shipped_label(ca, entry, shape) -> str:
    """The tiles the launcher picks from the shipped table for this shape."""
    N, d = shape[4], shape[5]
    cx, opts = ca._config(entry, BLOCK_N=N, BLOCK_D=triton.next_power_of_2(d))
    return label(dict(cx, **opts))


def label(cfg) -> str:
    short = {"BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_D": "D", "num_warps": "w", "num_stages": "s"}
    return " ".join(f"{short[k]}{cfg[k]}" for k in short if k in cfg)


def runner(ca, shape, passname, inputs):
    q, k, v, do, mask = inputs
    if passname == "fwd":
        def fn():
            with torch.no_grad():
                return ca.triton_cross_attention(q, k, v, mask)
    else:
        def fn():
            return torch.autograd.grad(ca.triton_cross_attention(q, k, v, mask), (q, k, v), do)
    return fn


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma list of " + ", ".join(FAMILIES))
    ap.add_argument("--warm-only", action="store_true", help="compile (run once), do not time")
    ap.add_argument("--shard", default="0/1", help="i/n: this process handles every n-th candidate")
    ap.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    args = ap.parse_args(argv)
    dev = common.Device()
    if not dev.cuda:
        sys.exit("tune_kernels.py: needs a CUDA GPU (it times compiled Triton kernels)")
    from crformer.kernels import cross_attention as ca

    shard_i, shard_n = (int(x) for x in args.shard.split("/"))
    rows: list[dict] = []
    notes = [f"dtype {dev.dtype}; GPU time from CUDA-graph replay (no launch cost); {dev.bandwidth_note}",
             "each candidate replaces the family's KERNEL_TABLE entry; 'shipped' marks the config in use",
             "ok = output within 2e-2 of the shipped config's output on the same inputs"]
    work = []  # (family, shape, candidate cfg or None, programs-per-SM or None)
    for fam in args.families.split(","):
        entry, passname, shapes, cands = FAMILIES[fam]
        for shape in shapes:
            d_pow2 = triton.next_power_of_2(shape[5])
            for cfg in cands:
                if cfg.get("BLOCK_D", 0) <= max(32, d_pow2):
                    work.append((fam, shape, cfg, None))
            for per_sm in PROGRAMS_PER_SM:
                work.append((fam, shape, None, per_sm))
    work = work[shard_i::shard_n]
    print(f"{dev.name}: {len(work)} candidates ({'compile only' if args.warm_only else 'timed'})", flush=True)

    cache: dict = {}
    for fam, shape, cfg, per_sm in work:
        entry, passname, _, _ = FAMILIES[fam]
        if (shape[0], passname) not in cache:
            inputs = make_inputs(shape, dev.device, dev.dtype)
            cache[shape[0], passname] = inputs, runner(ca, shape, passname, inputs)()
        inputs, base = cache[shape[0], passname]
        _, B, H, M, N, d, mask_lo, kv_same = shape
        name = label(cfg) if cfg else f"shipped ({shipped_label(ca, entry, shape)}), {per_sm} programs/SM"
        row = {"case": shape[0], "family": fam, "config": name, "pass": passname, "ms": None, "ok": None,
               "shipped": cfg is None and per_sm == ca.PROGRAMS_PER_SM,
               "bytes": sum(common.attention_bytes(B, H, M, N, d, 2, mask_lo is not None, True,
                                                   kv_same=kv_same)[:1 if passname == "fwd" else 2])}
        try:
            with Candidate(ca, entry, cfg, per_sm):
                fn = runner(ca, shape, passname, inputs)
                out = fn()
                outs = out if isinstance(out, tuple) else (out,)
                bases = base if isinstance(base, tuple) else (base,)
                row["ok"] = all(torch.allclose(a.float(), b.float(), atol=2e-2, rtol=2e-2)
                                for a, b in zip(outs, bases))
                if not args.warm_only:
                    row["ms"] = common.time_graph_ms(fn)
        except Exception as e:  # out of shared memory / registers: record and go on
            row["note"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
            torch.cuda.synchronize()
        rows.append(row)
        print(f"  {shape[0]:<26} {fam:<13} {name:<26} {common.fmt(row['ms'], '.4f'):>9} ms ok={row['ok']} "
              f"{row.get('note', '')}", flush=True)
    if args.warm_only:
        return
    common.finish_rows(rows, dev, group_keys=("case", "family"))
    rows.sort(key=lambda r: (r["case"], r["family"], r["ms"] if r["ms"] is not None else float("inf")))
    columns = [("case", "case", "s"), ("family", "family", "s"), ("config", "config", "s"),
               ("ms", "graph ms", ".4f"), ("pct_floor", "% floor", ".1f"), ("ok", "ok", "s"),
               ("shipped", "shipped", "s")]
    common.save(args.out_dir, dev, "tune", rows, notes, columns)
    best = {}
    for r in rows:
        if r["ms"] is not None and r["ok"]:
            best.setdefault((r["case"], r["family"]), r)
    print("\nbest per case:")
    for (case, fam), r in best.items():
        ship = next((x for x in rows if x["case"] == case and x["family"] == fam and x["shipped"]), None)
        ratio = f"{ship['ms'] / r['ms']:.2f}× shipped" if ship and ship["ms"] else ""
        print(f"  {case:<26} {fam:<13} {r['config']:<40} {r['ms']:.4f} ms {common.fmt(r['pct_floor'], '.1f')}% "
              f"{ratio}")


if __name__ == "__main__":
    main()
