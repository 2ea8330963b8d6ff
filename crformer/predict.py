"""Segment the object a sentence refers to in one image.

``python -m crformer.predict --checkpoint C --image IMG --text "the red square" --out overlay.png``
writes the overlay and the raw mask (``overlay_mask.png``, 0/255) at the image's original size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from crformer.cli import check_writable, parser, quiet_libraries, run
from crformer.errors import UserError


def main(argv=None) -> None:
    p = parser("python -m crformer.predict", __doc__)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--text", required=True, help="the referring expression")
    p.add_argument("--out", default="overlay.png", help="overlay PNG; the mask goes to <out>_mask.png")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_args(argv)
    quiet_libraries()
    if not a.text.strip():
        raise UserError("empty sentence: --text needs at least one word")
    out = Path(a.out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise UserError(f"--out must end in .png or .jpg: {out}")
    mask_path = out.with_name(out.stem + "_mask.png")
    image_path = Path(a.image).expanduser().resolve()
    for target in (out, mask_path):
        if target.expanduser().resolve() == image_path:
            raise UserError(f"--out would overwrite the input image {a.image} (writes {out} and {mask_path})")
        check_writable(target, "output")
    from crformer.api import Segmenter
    from crformer.data.image import load_image

    image = load_image(a.image)  # before the model: a bad image costs no loading time
    seg = Segmenter.from_checkpoint(a.checkpoint, a.device, a.overrides)
    pred = seg(image, a.text)
    from crformer.visualize import overlay

    out.parent.mkdir(parents=True, exist_ok=True)
    overlay(image, pred).save(out)
    Image.fromarray(pred.astype(np.uint8) * 255).save(mask_path)
    print(f"mask covers {100 * pred.mean():.1f}% of the image; wrote {out} and {mask_path}")


if __name__ == "__main__":
    run(main)
