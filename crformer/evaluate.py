"""Evaluate a checkpoint: ``python -m crformer.evaluate --checkpoint C [--split S[,S2]] ...``.

Prints a metrics table (oIoU, mIoU, Prec@0.5–0.9, in %), writes JSON, and optionally saves
side-by-side pictures. The checkpoint carries its config, so no config file is needed; data
location or other settings can still be overridden with ``key=value`` (e.g. ``data.root=/data``).
"""

from __future__ import annotations

import json
from pathlib import Path

from crformer.cli import parser, quiet_libraries
from crformer.errors import UserError
from crformer.files import check_writable, write_bytes_atomic
from crformer.process import run


def split_names(text: str) -> list[str]:
    """``--split a,b`` → ``["a", "b"]``; an empty name (``val,``) is a UserError."""
    names = [s.strip() for s in text.split(",")]
    if not all(names):
        raise UserError(f"--split {text!r} has an empty split name")
    return names


def main(argv=None) -> None:
    p = parser("python -m crformer.evaluate", __doc__)
    p.add_argument("--checkpoint", required=True, help="a training checkpoint (.pt) or a save_pretrained folder")
    p.add_argument("--split", default=None, help="split name(s), comma-separated (default: the config's val splits)")
    p.add_argument("--protocol", choices=("original", "lavt"), default=None,
                   help="original: prediction resized to the image size (default); lavt: also at S×S")
    p.add_argument("--save-vis", type=int, default=0, metavar="N", help="save N image|prediction|truth pictures")
    p.add_argument("--language-check", action="store_true",
                   help="also predict with each sentence swapped for another object's in the same image")
    p.add_argument("--out", default=None, help="JSON output (default: next to the checkpoint)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: the process's device)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_args(argv)
    quiet_libraries()
    if a.save_vis < 0:
        raise UserError(f"--save-vis must be ≥ 0; got {a.save_vis}")
    splits = split_names(a.split) if a.split is not None else None
    out = check_writable(Path(a.out) if a.out else Path(a.checkpoint).with_suffix(".eval.json"), "--out")
    vis_dir = str(out.with_suffix("")) + "_vis"
    if a.save_vis:
        check_writable(vis_dir, "picture folder", folder=True)

    from crformer.api import Segmenter
    from crformer.data import open_refer
    from crformer.distributed import cleanup, init_distributed, is_main
    from crformer.engine import evaluate_split, language_check_lines, report_rows
    from crformer.metrics import format_table

    rank, world, device = init_distributed()
    try:
        seg = Segmenter.load(a.checkpoint, a.device or device, a.overrides)
        cfg = seg.cfg
        protocol = a.protocol or cfg["eval"]["protocol"]
        refer = open_refer(cfg)
        splits = splits or cfg["data"]["val_splits"]
        refer.check_splits(splits)
        if is_main():
            refer.check_images(splits, progress=True)
        results = {s: evaluate_split(seg.model, refer, s, cfg, seg.tokenizer, seg.device, protocol, a.language_check,
                                     rank, world, a.save_vis, vis_dir, progress=is_main())
                   for s in splits}
        if is_main():
            report = {"checkpoint": str(a.checkpoint), "protocol": protocol, "results": results}
            write_bytes_atomic(out, json.dumps(report, indent=1).encode(), "--out")
            print(f"{cfg['data']['dataset']} ({cfg['data']['split_by']}), protocol {protocol}; values in %")
            print(format_table(report_rows(results)))
            for line in language_check_lines(results):
                print(line)
            print(f"wrote {out}" + (f" and pictures in {vis_dir}/" if a.save_vis else ""))
    finally:
        cleanup()


if __name__ == "__main__":
    run(main)
