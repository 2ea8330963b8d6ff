"""The Python API: segment the object a sentence refers to.

    from crformer import Segmenter
    seg = Segmenter.from_checkpoint("runs/default/best.pt")
    mask = seg("scene.jpg", "the red square on the left")   # bool H×W at the image's size
    masks = seg.batch([("a.jpg", "the star"), (pil_image, "the blue circle")])
    seg.save_pretrained("shared/model")   # config.json + model.safetensors: Segmenter.from_pretrained

``predict`` and ``evaluate`` are thin command-line layers over this class.
"""

from __future__ import annotations

import os
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image

from crformer.checkpoint import load_checkpoint, load_model_state
from crformer.config import merge_config
from crformer.data.dataset import image_to_tensor
from crformer.data.image import INFERENCE_MAX_SIDE, load_image, to_rgb
from crformer.data.tokenizer import SentenceTokenizer
from crformer.engine import compile_mode, parse_device, predict_logits, upsample_mask
from crformer.errors import UserError
from crformer.models import CRFormer

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]


def as_rgb_image(image: ImageLike) -> Image.Image:
    """A path, a PIL image or an H×W×3 uint8 array → 8-bit RGB PIL image (EXIF orientation applied
    for files, and a file over ``INFERENCE_MAX_SIDE`` px on a side downscaled on load: its mask comes
    at that size); anything else is a UserError naming what was given."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, max_side=INFERENCE_MAX_SIDE)
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise UserError(f"an image array must be H×W×3 uint8; got shape {image.shape} dtype {image.dtype}")
        return Image.fromarray(image)
    raise UserError(f"an image must be a path, a PIL image or an H×W×3 uint8 array; got {type(image).__name__}")


class Segmenter:
    """A trained CRFormer ready for inference (eval mode, on one device).

    ``seg(image, sentence)`` → bool H×W mask at the image's size; ``seg.batch(pairs)`` runs a list
    of (image, sentence) pairs in batches of ``batch_size``. Images: path, PIL image or H×W×3 uint8.
    """

    def __init__(self, model: torch.nn.Module, cfg: dict, tokenizer: SentenceTokenizer,
                 device: torch.device | None = None, batch_size: int = 16):
        self.device = device or torch.device("cpu")
        self.model = model.to(self.device).eval()
        # eval.compile, not train.compile: a run trained compiled should not make predicting one
        # image pay minutes of compilation unless asked.
        mode = compile_mode(cfg["eval"]["compile"], cuda_graphs=False)
        if mode is not None:
            self.model = torch.compile(self.model, mode=mode)
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device | None = None,
                        overrides: Sequence[str] = ()) -> "Segmenter":
        """Load a checkpoint (its config, text-encoder reference and weights; data-only loading).
        ``device``: default cuda when available, else cpu. ``overrides``: ``key=value`` config changes
        that do not change the model (e.g. ``model.attn_backend=sdpa``)."""
        ckpt = load_checkpoint(path)
        return cls._build(ckpt["config"], ckpt["model"], device, overrides)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str | torch.device | None = None,
                        overrides: Sequence[str] = ()) -> "Segmenter":
        """Load a folder written by :meth:`save_pretrained` (or ``python -m crformer.export``):
        ``config.json`` and ``model.safetensors`` (and ``text_encoder/``), each checked against the
        digests config.json lists; JSON and safetensors only, no pickle. ``device``, ``overrides``: as
        :meth:`from_checkpoint`."""
        from crformer.pretrained import load_pretrained

        cfg, state = load_pretrained(folder)
        return cls._build(cfg, state, device, overrides)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None,
             overrides: Sequence[str] = ()) -> "Segmenter":
        """A training checkpoint file (:meth:`from_checkpoint`) or a folder written by
        :meth:`save_pretrained` (:meth:`from_pretrained`): what ``--checkpoint`` accepts."""
        if os.path.isdir(os.path.expanduser(path)):
            return cls.from_pretrained(path, device, overrides)
        return cls.from_checkpoint(path, device, overrides)

    @classmethod
    def _build(cls, saved_cfg: dict, state: dict, device: str | torch.device | None,
               overrides: Sequence[str]) -> "Segmenter":
        device = parse_device(device)
        cfg = merge_config(saved_cfg, overrides)
        cfg["model"]["backbone"]["weights"] = None  # the saved state holds the trained backbone
        model = CRFormer.from_config(cfg, device)
        load_model_state(model, state)
        tokenizer = SentenceTokenizer(cfg["model"]["text_encoder"], cfg["data"]["max_tokens"])
        return cls(model, cfg, tokenizer, device, batch_size=cfg["eval"]["batch_size"])

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write the model to share: ``folder/config.json`` + ``model.safetensors`` (+ ``text_encoder/``
        unless it is the embedded MiniLM, frozen), each file atomically (docs/DESIGN.md §9). A non-empty
        ``folder`` must be an earlier export, which is replaced."""
        from crformer.pretrained import save_pretrained

        save_pretrained(getattr(self.model, "_orig_mod", self.model), self.cfg, folder)  # compiled: its module

    def __call__(self, image: ImageLike, sentence: str) -> np.ndarray:
        """One image and one sentence → bool H×W mask at the image's size."""
        return self.batch([(image, sentence)])[0]

    def batch(self, pairs: Sequence[tuple[ImageLike, str]]) -> list[np.ndarray]:
        """(image, sentence) pairs → one bool mask per pair, each at its own image's size."""
        masks: list[np.ndarray] = []
        size = self.cfg["data"]["image_size"]
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            images = [as_rgb_image(im) for im, _ in chunk]
            ids, attn = self.tokenizer([sentence for _, sentence in chunk])
            x = torch.stack([image_to_tensor(im, size) for im in images]).to(self.device)
            logits = predict_logits(self.model, x, ids, attn, self.cfg["eval"]["amp"])
            masks += [upsample_mask(lg, (im.height, im.width)) for lg, im in zip(logits, images)]
        return masks
