"""Pictures: mask overlays and side-by-side (image | prediction | ground truth) panels."""

from __future__ import annotations

import numpy as np
from PIL import Image

from crformer.files import atomic_write


def overlay(image: Image.Image, mask: np.ndarray, color=(255, 40, 40), alpha: float = 0.5) -> Image.Image:
    """Blend ``color`` over the pixels of ``mask`` (bool H×W at the image's size)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    m = mask.astype(bool)[..., None]
    out = np.where(m, (1 - alpha) * arr + alpha * np.array(color, dtype=np.float32), arr)
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def mask_picture(mask: np.ndarray) -> Image.Image:
    """A bool H×W mask as a greyscale picture: 255 inside, 0 outside."""
    return Image.fromarray(mask.astype(np.uint8) * 255)


def save_side_by_side(image: Image.Image, pred: np.ndarray, gt: np.ndarray, sentence: str, path: str,
                      iou: float | None = None) -> None:
    """Write a PNG with image, prediction overlay and ground-truth overlay, titled by the sentence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4))
    panels = [(image, "image"), (overlay(image, pred), "prediction" + (f" (IoU {iou:.2f})" if iou is not None else "")),
              (overlay(image, gt, color=(40, 220, 40)), "ground truth")]
    for ax, (img, title) in zip(axes, panels):
        ax.imshow(img)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(f'"{sentence}"', fontsize=10)
    fig.tight_layout()
    try:
        with atomic_write(path, "picture") as f:
            fig.savefig(f, dpi=100, format="png")
    finally:
        plt.close(fig)
