"""Benchmark one Calibration Decoder layer and, separately, its three attention calls.

    python benchmarks/bench_decoder.py            # paper configuration + sweep (GPU), paper config (CPU)
    python benchmarks/bench_decoder.py --quick    # tiny shapes on CPU (< 30 s); paper configs only on GPU

Paper configuration: B = 8, 480² input → decoder memories 15², 30², 60²; N_q = 16 queries; D = 256;
8 heads (d = 32); FFN 2048; L = 20 words with valid lengths 5–20; bf16 on GPU, fp32 on CPU.
Attention calls of a layer (q B×H×M×d, k/v B×H×N×d):
  cross  — queries over the pixel memory, M = N_q, N = h·w, no key mask (all pixels valid, as in the model);
  cross folded — the same with the K/V projections folded into the queries (fold_decoder_attention):
           q B×1×(H·N_q)×D over the memory passed as both k and v (read once by a perfect kernel);
  memory — the folded call as the model makes it (``crformer.ops.memory_attention``): keys = memory
           + position table (N×D, shared by the batch, needing a gradient like the model's level
           embedding), values = memory. ``triton-memory`` is the fused kernel that reads the memory
           once for both; every other backend (``triton`` included) materialises the keys first;
  self   — queries over queries, M = N = N_q, no mask;
  calib  — queries over the words, M = N_q, N = L = 20, key padding mask (lengths 5–20).
Sweep (cross-attention and layer, GPU): B ∈ {1, 32}, N_q ∈ {64, 256} at 60², memory 120² at B = 8,
and 60² with padded keys (valid lengths N/2..N).
Backends: reference, torch.compile(reference) and FlexAttention (GPU, paper configs only — each
shape recompiles), sdpa, xformers (if importable, CUDA), triton (CUDA). The layer itself runs with
the backends the model accepts (reference, sdpa, xformers, triton), sdpa+fold / triton+fold (the
cross-attention folded, model key fold_decoder_attention) and torch.compile of the layer with the
reference backend. Bytes: see benchmarks/common/counting.py (each input read once, each output
written once). Results: <out-dir>/<device>-<date>.json and .md (section "decoder").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402

L_WORDS = 20


def bench_layer(rows, dev, case, B, Nq, hw, D, H, ffn, quick, compiled):
    from crformer.models.decoder import CalibrationDecoderLayer

    dt, device = dev.dtype, dev.device
    N = hw * hw
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, grad=False):
        return torch.randn(*shape, generator=g, device=device, dtype=dt).requires_grad_(grad)

    q, memory, words = rnd(B, Nq, D, grad=True), rnd(B, N, D, grad=True), rnd(B, L_WORDS, D, grad=True)
    pos, qpos = rnd(N, D), rnd(Nq, D)
    mask = common.padding_mask(B, L_WORDS, 5, device)
    gout = rnd(B, Nq, D)
    # "+fold": the cross-attention with its projections folded into the queries (model key
    # fold_decoder_attention): one H·N_q-query, D-wide call that reads the memory once. Timed for
    # every registered backend with a fused memory_attention, and for sdpa (the materialised form).
    from crformer.ops import BACKENDS

    backends = []
    for name, why in common.registered_backends(dev):
        backends.append((name, why))
        if name == "sdpa" or BACKENDS[name].memory_attention is not None:
            backends.append((name + "+fold", why))
    if dev.cuda and compiled:
        backends.append(("compile(reference)", ""))
    for name, why in backends:
        if why:
            common.skip(rows, case, name, "—", why)
            continue
        torch.manual_seed(0)
        base, _, fold = name.partition("+")
        layer = CalibrationDecoderLayer(D, H, ffn, calibration=True,
                                        attn_backend="reference" if name.startswith("compile") else base,
                                        fold_decoder_attention=fold == "fold")
        layer = layer.to(device=device, dtype=dt)
        fn = torch.compile(layer, dynamic=False) if name.startswith("compile") else layer
        params = [p for p in layer.parameters() if p.requires_grad]
        fwd_b, bwd_b = common.module_bytes([q, memory, pos, words, mask, qpos], [gout], layer, True,
                                           grad_inputs=[q, memory, words])

        def fwd(fn=fn):
            with torch.no_grad():
                return fn(q, memory, pos, words, mask, query_pos=qpos)

        def fwdbwd(fn=fn, params=params):
            out = fn(q, memory, pos, words, mask, query_pos=qpos)
            return torch.autograd.grad(out, [q, memory, words] + params, gout)

        extra = {"B": B, "Nq": Nq, "N": N, "D": D, "H": H}
        common.run_case(rows, dev, case, name, "fwd", fwd, fwd_b, quick, extra)
        common.run_case(rows, dev, case, name, "fwd+bwd", fwdbwd, fwd_b + bwd_b, quick, extra)


def bench_memory_attention(rows, dev, case, B, M, N, D, quick, compiled):
    """``memory_attention(q B×M×D, memory B×N×D, pos N×D)``: the fused kernel against every
    ``cross_attention`` peer given the materialised keys (inside the timed call, as the model would)."""
    from crformer.ops import BACKENDS, memory_attention

    dt, device = dev.dtype, dev.device
    es = torch.finfo(dt).bits // 8
    # Floor: read q, memory, pos once, write o; backward reads q, memory, pos, o, lse, dO and writes
    # dq, dmemory, dpos.
    fwd_b = (2 * B * M * D + B * N * D + N * D) * es
    bwd_b = (3 * B * M * D + B * N * D + N * D) * es + B * M * 4 + (B * M * D + B * N * D + N * D) * es

    def make():
        g = torch.Generator(device=device).manual_seed(0)
        return tuple(torch.randn(*shape, generator=g, device=device, dtype=dt).requires_grad_(grad)
                     for shape, grad in (((B, M, D), True), ((B, N, D), True), ((N, D), True), ((B, M, D), False)))

    nxt = common.rotation(make, fwd_b, dev)
    peers = [(name, None if impl is None else
              (lambda q, f, p, _impl=impl: _impl(q[:, None], (f + p)[:, None], f[:, None], None)[:, 0]), why)
             for name, impl, why in common.attention_backends(dev, compiled)]
    # The fused memory_attention of every registered backend that has one (triton: "triton-memory").
    peers += [(name + "-memory", None if why else (lambda q, f, p, _n=name: memory_attention(q, f, p, backend=_n)), why)
              for name, why in common.registered_backends(dev) if BACKENDS[name].memory_attention is not None]
    for name, impl, why in peers:
        if impl is None:
            common.skip(rows, case, name, "—", why)
            continue

        def fwd(impl=impl):
            q, f, p, _ = nxt()
            with torch.no_grad():
                return impl(q, f, p)

        def fwdbwd(impl=impl):
            q, f, p, g = nxt()
            return torch.autograd.grad(impl(q, f, p), (q, f, p), g)

        extra = {"B": B, "M": M, "N": N, "D": D}
        common.run_case(rows, dev, case, name, "fwd", fwd, fwd_b, quick, extra)
        common.run_case(rows, dev, case, name, "fwd+bwd", fwdbwd, fwd_b + bwd_b, quick, extra)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(ap)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile and FlexAttention peers")
    ap.add_argument("--no-sweep", action="store_true", help="paper configuration only")
    args = ap.parse_args(argv)
    dev = common.start_attention_bench(args, "Calibration Decoder layer + its attention calls")

    if args.quick and not dev.cuda:
        # one memory size in a rehearsal: triton runs interpreted there, 3 s a call at 15²
        B, Nq, D, H, ffn, mems = 2, 16, 64, 4, 128, [8] if dev.rehearse else [8, 15]
        sweep = []
        shape_note = f"--quick on CPU: TINY shapes (B={B}, N_q={Nq}, D={D}, {H} heads, FFN {ffn}), not the paper config"
    else:
        B, Nq, D, H, ffn, mems = 8, 16, 256, 8, 2048, [15, 30, 60]
        shape_note = "paper config: B=8, N_q=16, D=256, 8 heads (d=32), FFN 2048, memories 15²/30²/60², L=20"
        # (case, B, N_q, hw, padded keys)
        sweep = [] if (args.no_sweep or args.quick or not dev.cuda) else [
            ("B=1 60²", 1, 16, 60, False), ("B=32 60²", 32, 16, 60, False), ("Nq=64 60²", 8, 64, 60, False),
            ("Nq=256 60²", 8, 256, 60, False), ("120² (B=8)", 8, 16, 120, False), ("60² padded keys", 8, 16, 60, True)]
    d = D // H
    notes = [shape_note, f"dtype {dev.dtype}", dev.bandwidth_note,
             "bytes: each input (and parameter) read once, each output written once (benchmarks/common/counting.py)",
             "× best peer = fastest other backend's time / this backend's time, same case and pass"]
    if not dev.cuda:
        notes.insert(0, common.CPU_NOTE)
    compiled = not args.no_compile
    rows: list[dict] = []

    def save():
        common.finish_rows(rows, dev)
        common.save(args.out_dir, dev, "decoder", rows, notes)

    print("\n-- attention calls --")
    for hw in mems:
        common.bench_attention(rows, dev, f"cross {hw}² B={B}", B, H, Nq, hw * hw, d, None, args.quick, compiled)
    # The folded form (model key fold_decoder_attention): all H·N_q queries, D wide, over the memory
    # passed as both k and v — the shape whose floor the performance goal is stated against.
    for hw in mems:
        common.bench_attention(rows, dev, f"cross folded {hw}² B={B}", B, 1, H * Nq, hw * hw, D, None,
                               args.quick, compiled, kv_same=True)
    for hw in mems + ([] if args.quick or not dev.cuda else [120]):
        bench_memory_attention(rows, dev, f"memory {hw}² B={B}", B, H * Nq, hw * hw, D, args.quick, compiled)
    common.bench_attention(rows, dev, f"self Nq={Nq} B={B}", B, H, Nq, Nq, d, None, args.quick, compiled)
    common.bench_attention(rows, dev, f"calib L={L_WORDS} B={B}", B, H, Nq, L_WORDS, d, 5, args.quick, compiled)
    save()
    for case, b, nq, hw, padded in sweep:
        common.bench_attention(rows, dev, f"cross {case}", b, H, nq, hw * hw, d,
                               hw * hw // 2 if padded else None, args.quick, compiled=False)
    if sweep:
        save()

    print("\n-- decoder layer (cross → self → FFN → calibration) --")
    for hw in mems:
        bench_layer(rows, dev, f"layer {hw}² B={B}", B, Nq, hw, D, H, ffn, args.quick, compiled)
        save()
    for case, b, nq, hw, padded in sweep:
        if not padded:
            bench_layer(rows, dev, f"layer {case}", b, nq, hw, D, H, ffn, args.quick, compiled=False)
    if sweep:
        save()
    print()
    print(common.table(rows))
    return common.rehearsal_failures(dev, rows)


if __name__ == "__main__":
    sys.exit(main())
