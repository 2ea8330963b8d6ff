"""Segment the object a sentence refers to in one image.

``python -m crformer.predict --checkpoint C --image IMG --text "the red square" --out overlay.png``
writes the overlay and the raw mask (``overlay_mask.png``, 0/255) at the image's original size.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from crformer.cli import quiet_libraries, run
from crformer.data.dataset import image_to_tensor
from crformer.data.image import load_image
from crformer.engine import predict_logits, upsample_mask
from crformer.errors import UserError
from crformer.evaluate import load_for_inference
from crformer.visualize import overlay


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m crformer.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--text", required=True, help="the referring expression")
    p.add_argument("--out", default="overlay.png", help="overlay PNG; the mask goes to <out>_mask.png")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_args(argv)
    quiet_libraries()
    if not a.text.strip():
        raise UserError("empty sentence: --text needs at least one word")
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, cfg, tokenizer = load_for_inference(a.checkpoint, a.overrides, device)
    image = load_image(a.image)
    ids, mask = tokenizer([a.text])
    x = image_to_tensor(image, cfg["data"]["image_size"])[None].to(device)
    logits = predict_logits(model, x, ids, mask, cfg["train"]["amp"])[0]
    pred = upsample_mask(logits, (image.height, image.width))
    out = Path(a.out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise UserError(f"--out must end in .png or .jpg: {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    overlay(image, pred).save(out)
    mask_path = out.with_name(out.stem + "_mask.png")
    Image.fromarray(pred.astype(np.uint8) * 255).save(mask_path)
    print(f"mask covers {100 * pred.mean():.1f}% of the image; wrote {out} and {mask_path}")


if __name__ == "__main__":
    run(main)
