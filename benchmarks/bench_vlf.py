"""Benchmark the four VLF (vision-language fusion) attention stages of Swin-B at 480².

    python benchmarks/bench_vlf.py            # paper shapes (GPU bf16; CPU fp32, reference/sdpa)
    python benchmarks/bench_vlf.py --quick    # tiny shapes on CPU (< 30 s); paper shapes on GPU

Stages (B = 8, 480² input, patch 4): N = 120², 60², 30², 15² pixels; C = 128, 256, 512, 1024;
L = 20 words (valid lengths 5–20); 1 head, so the head dim is the full C. Each stage is timed
(a) as the attention call ``crformer.ops.cross_attention`` with q B×1×N×C, k/v B×1×L×C, forward and
forward+backward, across reference, torch.compile(reference), sdpa, FlexAttention, xformers and
triton (the last four on CUDA only), and (b) as the whole VLF module
``VisionLanguageFusion(C, lang_dim=768, 1 head, attn_backend)`` (norm, attention, vis/fuse projections,
gate) with words B×L×768 (BERT-base width). Bytes: see benchmarks/common/counting.py. Results go to
<out-dir>/<device>-<date>.json and .md (section "vlf").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402

L_WORDS = 20
LANG_DIM = 768


def bench_module(rows, dev, case, B, hw, C, lang_dim, quick, compiled):
    from crformer.models.backbone import VisionLanguageFusion

    dt, device = dev.dtype, dev.device
    N = hw * hw
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, N, C, generator=g, device=device, dtype=dt).requires_grad_()
    words = torch.randn(B, L_WORDS, lang_dim, generator=g, device=device, dtype=dt).requires_grad_()
    mask = common.padding_mask(B, L_WORDS, 5, device)
    gx, gm = (torch.randn(B, N, C, generator=g, device=device, dtype=dt) for _ in range(2))
    backends = common.registered_backends(dev)
    if dev.cuda and compiled:
        backends.append(("compile(reference)", ""))
    for name, why in backends:
        if why:
            common.skip(rows, case, name, "—", why)
            continue
        torch.manual_seed(0)
        mod = VisionLanguageFusion(C, lang_dim, 1, attn_backend="reference" if name.startswith("compile") else name)
        mod = mod.to(device=device, dtype=dt)
        fn = torch.compile(mod, dynamic=False) if name.startswith("compile") else mod
        params = [p for p in mod.parameters() if p.requires_grad]
        fwd_b, bwd_b = common.module_bytes([x, words, mask], [gx, gm], mod, True, grad_inputs=[x, words])

        def fwd(fn=fn):
            with torch.no_grad():
                return fn(x, words, mask)

        def fwdbwd(fn=fn, params=params):
            xn, mm = fn(x, words, mask)
            return torch.autograd.grad((xn, mm), [x, words] + params, (gx, gm))

        extra = {"B": B, "N": N, "C": C}
        common.run_case(rows, dev, case, name, "fwd", fwd, fwd_b, quick, extra)
        common.run_case(rows, dev, case, name, "fwd+bwd", fwdbwd, fwd_b + bwd_b, quick, extra)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(ap)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile and FlexAttention peers")
    ap.add_argument("--no-module", action="store_true", help="attention calls only, not the VLF module")
    args = ap.parse_args(argv)
    dev = common.start_attention_bench(args, "VLF attention stages (Swin-B, 480²)")
    if args.quick and not dev.cuda:
        B, stages, lang_dim = 2, [(16, 32), (8, 64)], 64
        shape_note = f"--quick on CPU: TINY shapes (B={B}, stages (hw, C) = {stages}, lang dim {lang_dim}), not Swin-B"
    else:
        B, stages, lang_dim = 8, [(120, 128), (60, 256), (30, 512), (15, 1024)], LANG_DIM
        shape_note = "Swin-B at 480²: B=8, N=120²/60²/30²/15², C=128/256/512/1024, L=20 (lengths 5–20), 1 head"
    notes = [shape_note, f"dtype {dev.dtype}", dev.bandwidth_note,
             "bytes: each input (and parameter) read once, each output written once (benchmarks/common/counting.py)",
             "× best peer = fastest other backend's time / this backend's time, same case and pass"]
    if not dev.cuda:
        notes.insert(0, common.CPU_NOTE)
    compiled = not args.no_compile
    rows: list[dict] = []

    def save():
        common.finish_rows(rows, dev)
        common.save(args.out_dir, dev, "vlf", rows, notes)

    print("\n-- VLF attention (pixels → words) --")
    for i, (hw, C) in enumerate(stages, 1):
        common.bench_attention(rows, dev, f"attn stage{i} {hw}² C={C}", B, 1, hw * hw, L_WORDS, C, 5,
                               args.quick, compiled)
        save()
    if not args.no_module:
        print("\n-- VLF module (norm + attention + projections + gate) --")
        for i, (hw, C) in enumerate(stages, 1):
            # compile(reference) of the module on stages 1–2 only: each shape recompiles (suite time)
            bench_module(rows, dev, f"module stage{i} {hw}² C={C}", B, hw, C, lang_dim, args.quick,
                         compiled and i <= 2)
            save()
    print()
    print(common.table(rows))
    return common.rehearsal_failures(dev, rows)


if __name__ == "__main__":
    sys.exit(main())
