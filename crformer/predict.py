"""Segment the object a sentence refers to in one image.

``python -m crformer.predict --checkpoint C --image IMG --text "the red square" --out overlay.png``
writes the overlay and the raw mask (``overlay_mask.png``, 0/255) at the image's original size
(an image over 4096 px on a side is downscaled on load, and both come at that size).
"""

from __future__ import annotations

from pathlib import Path


from crformer.cli import parser, quiet_libraries
from crformer.errors import UserError
from crformer.files import atomic_write, check_writable
from crformer.process import run


def main(argv=None) -> None:
    p = parser("python -m crformer.predict", __doc__)
    p.add_argument("--checkpoint", required=True, help="a training checkpoint (.pt) or a save_pretrained folder")
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
    from crformer.data.image import INFERENCE_MAX_SIDE, image_size, load_image

    # Before the model: a bad image costs no loading time.
    image = load_image(a.image, max_side=INFERENCE_MAX_SIDE)
    if image.size != image_size(a.image):
        print("note: the image is {}×{}, downscaled to {}×{} on load".format(*image_size(a.image), *image.size))
    seg = Segmenter.load(a.checkpoint, a.device, a.overrides)
    pred = seg(image, a.text)
    from crformer.visualize import mask_picture, overlay

    for picture, path in ((overlay(image, pred), out), (mask_picture(pred), mask_path)):
        with atomic_write(path, "output") as f:
            picture.save(f, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")
    print(f"mask covers {100 * pred.mean():.1f}% of the image; wrote {out} and {mask_path}")


if __name__ == "__main__":
    run(main)
