"""Evaluate a checkpoint: ``python -m crformer.evaluate --checkpoint C [--split S[,S2]] ...``.

Prints a metrics table (oIoU, mIoU, Prec@0.5–0.9, in %), writes JSON, and optionally saves
side-by-side pictures. The checkpoint carries its config, so no config file is needed; data
location or other settings can still be overridden with ``key=value`` (e.g. ``data.root=/data``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from crformer.checkpoint import load_checkpoint, load_model_state
from crformer.cli import quiet_libraries, run
from crformer.config import merge_config
from crformer.data import open_refer
from crformer.distributed import cleanup, init_distributed, is_main
from crformer.engine import evaluate_split, language_check_lines, report_rows
from crformer.metrics import format_table
from crformer.models import build_model
from crformer.models.text_encoder import SentenceTokenizer
from crformer.ops import set_default_backend


def load_for_inference(checkpoint: str, overrides=(), device: torch.device | None = None):
    """(model in eval mode, config, tokenizer) from a checkpoint alone."""
    ckpt = load_checkpoint(checkpoint)
    cfg = merge_config(ckpt["config"], overrides)
    cfg["model"]["backbone"]["weights"] = None  # the checkpoint holds the trained backbone
    set_default_backend(cfg["model"]["attn_backend"])
    model = build_model(cfg)
    load_model_state(model, ckpt["model"])
    model.to(device or torch.device("cpu")).eval()
    return model, cfg, SentenceTokenizer(cfg["model"]["text_encoder"], cfg["data"]["max_tokens"])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m crformer.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default=None, help="split name(s), comma-separated (default: the config's val splits)")
    p.add_argument("--protocol", choices=("original", "lavt"), default=None,
                   help="original: prediction resized to the image size (default); lavt: also at S×S")
    p.add_argument("--save-vis", type=int, default=0, metavar="N", help="save N image|prediction|truth pictures")
    p.add_argument("--language-check", action="store_true",
                   help="also predict with each sentence swapped for another object's in the same image")
    p.add_argument("--out", default=None, help="JSON output (default: next to the checkpoint)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_args(argv)
    quiet_libraries()
    rank, world, device = init_distributed()
    try:
        model, cfg, tokenizer = load_for_inference(a.checkpoint, a.overrides, device)
        protocol = a.protocol or cfg["eval"]["protocol"]
        refer = open_refer(cfg)
        splits = a.split.split(",") if a.split else cfg["data"]["val_splits"]
        out = Path(a.out) if a.out else Path(a.checkpoint).with_suffix(".eval.json")
        vis_dir = str(out.with_suffix("")) + "_vis"
        results = {s: evaluate_split(model, refer, s, cfg, tokenizer, device, protocol, a.language_check, rank, world,
                                     a.save_vis, vis_dir, progress=is_main())
                   for s in splits}
        if is_main():
            out.write_text(json.dumps({"checkpoint": str(a.checkpoint), "protocol": protocol, "results": results},
                                      indent=1))
            print(f"{cfg['data']['dataset']} ({cfg['data']['split_by']}), protocol {protocol}; values in %")
            print(format_table(report_rows(results)))
            for line in language_check_lines(results):
                print(line)
            print(f"wrote {out}" + (f" and pictures in {vis_dir}/" if a.save_vis else ""))
    finally:
        cleanup()


if __name__ == "__main__":
    run(main)
