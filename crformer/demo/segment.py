"""What the demo page computes, without the page: the scenes to pick from and one request's masks.

Kept apart from :mod:`crformer.demo.page` so that it runs, and is tested, without gradio.
"""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from crformer.api import ImageLike, Segmenter, as_rgb_image
from crformer.errors import UserError

#: Sentences in one request: each one is its own forward pass, timed on its own.
MAX_SENTENCES = 8
#: Characters in one sentence: a referring expression is a phrase, longer text is a paste gone wrong
#: (the model reads at most ``data.max_tokens`` tokens of it anyway).
MAX_SENTENCE_CHARS = 300


@dataclass(frozen=True)
class Scene:
    """One validation image and the sentences that refer to objects in it."""

    label: str
    image_path: str
    sentences: tuple[str, ...]


@dataclass(frozen=True)
class SentenceMask:
    """One sentence's answer: the bool H×W mask at the image's size, how long the model took, and what
    the tokenizer warned about (a sentence with no word token, a truncated one)."""

    sentence: str
    mask: np.ndarray
    seconds: float
    notes: tuple[str, ...]


def validation_scenes(cfg: dict) -> list[Scene]:
    """The images of the validation splits of the checkpoint's synthetic dataset (the default synthetic
    dataset for a checkpoint trained on other data), each with its sentences, in split order. The dataset
    is generated into ``data.cache_dir`` if it is not there yet."""
    from crformer.config import DEFAULTS
    from crformer.data import open_refer

    data = cfg["data"] if cfg["data"]["dataset"] == "synthetic" else DEFAULTS["data"]
    refer = open_refer({"data": data})
    scenes = []
    for split in data["val_splits"]:
        by_image: dict[str, list[str]] = {}
        for sample in refer.samples(split):
            sentences = by_image.setdefault(sample.image_path, [])
            if sample.sentence not in sentences:
                sentences.append(sample.sentence)
        for path, sentences in by_image.items():
            more = f" (+{len(sentences) - 1})" if len(sentences) > 1 else ""
            scenes.append(Scene(f"{split} {Path(path).stem}: {sentences[0]}{more}", path, tuple(sentences)))
    return scenes


def parse_sentences(text: str | None) -> list[str]:
    """The page's text box → its sentences, one per non-blank line; a UserError when there is none, too
    many or one too long."""
    sentences = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not sentences:
        raise UserError("no sentence: type a referring expression (one per line to compare several)")
    if len(sentences) > MAX_SENTENCES:
        raise UserError(f"{len(sentences)} sentences: at most {MAX_SENTENCES} at once")
    for sentence in sentences:
        if len(sentence) > MAX_SENTENCE_CHARS:
            raise UserError(f"a sentence of {len(sentence)} characters: at most {MAX_SENTENCE_CHARS} "
                            f"(it begins {sentence[:30]!r})")
    return sentences


class SharedSegmenter:
    """A :class:`~crformer.api.Segmenter` that the page's concurrent requests share. The model runs one
    sentence at a time: a call is not re-entrant (the tokenizer and the frozen text encoder's cache change
    on every call), and on a CPU the forward pass uses every core anyway. Decoding the image happens
    outside the lock."""

    def __init__(self, segmenter: Segmenter):
        self.segmenter = segmenter
        self._model_lock = threading.Lock()

    def segment(self, image: ImageLike | None, text: str | None) -> tuple[Image.Image, list[SentenceMask]]:
        """The image (a path, PIL image or array; as the model reads it) and one mask per sentence of
        ``text``. Every bad input is a UserError with a message for the page."""
        if image is None:
            raise UserError("no image: pick a scene or upload an image")
        sentences = parse_sentences(text)
        picture = as_rgb_image(image)  # the project's loader: its pixel limits, one-line errors
        results = []
        for sentence in sentences:
            # catch_warnings is process-wide: it is safe here because the lock keeps other requests out.
            with self._model_lock, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                start = time.perf_counter()
                mask = self.segmenter(picture, sentence)
                seconds = time.perf_counter() - start
            results.append(SentenceMask(sentence, mask, seconds, tuple(str(w.message) for w in caught)))
        return picture, results
