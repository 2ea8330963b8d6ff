"""torch Datasets over REFER samples: images resized to S×S with ImageNet normalisation."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from crformer.data.image import load_image
from crformer.data.refer import REFER, RefSample
from crformer.data.synthetic import ONE_ATTR
from crformer.errors import UserError

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def image_to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """PIL RGB image → normalised 3×S×S float tensor (bilinear resize; no flips: 'left' stays left)."""
    arr = np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.uint8)
    return _normalise(torch.from_numpy(arr.copy()).permute(2, 0, 1))


def _normalise(u8: torch.Tensor) -> torch.Tensor:
    return (u8.float() / 255 - IMAGENET_MEAN) / IMAGENET_STD


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Bool H×W → bool S×S (area-weighted, then ≥ 0.5), for training targets. (The S×S evaluation
    protocol uses :func:`resize_mask_nearest` instead.)"""
    m = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.BILINEAR)
    return np.asarray(m) >= 128


def resize_mask_nearest(mask: np.ndarray, size: int) -> np.ndarray:
    """Bool H×W → bool S×S by PIL nearest neighbour: the ground truth of ``--protocol lavt``, as
    LAVT's test.py makes it (torchvision ``Resize(interpolation=NEAREST)`` on the PIL mask is this
    call). Output pixel (i, j) is input pixel (⌊(i + ½)·H/S⌋, ⌊(j + ½)·W/S⌋), the one under its
    centre; exactly on a pixel border PIL's running floating-point sum picks the side, so PIL itself
    does the resize. Unlike the area-weighted :func:`resize_mask`, it keeps 1-pixel-thin parts
    (where sampled) instead of dropping or thickening them."""
    return np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((size, size), Image.NEAREST)) > 0


def load_sample_image(sample: RefSample) -> Image.Image:
    """The sample's image as 8-bit RGB: its file, or the image embedded in a parquet row
    (``sample.image_row``). Its decoded size (after EXIF orientation) must be the width×height that
    the annotations give (instances.json, raw_image_info): the masks are drawn at that size, so any
    other size would misalign every mask silently. A mismatch is a UserError naming the image."""
    if sample.image_row is None:
        img, name = load_image(sample.image_path), sample.image_path
    else:
        from crformer.data.hf_parquet import load_embedded_image

        img = load_embedded_image(sample.image_path, sample.image_row)
        name = f"{sample.image_path} row {sample.image_row}"
    if (img.width, img.height) != (sample.width, sample.height):
        raise UserError(f"image {name} decodes to {img.width}×{img.height} (after EXIF orientation) "
                        f"but the annotations give {sample.width}×{sample.height}: its masks would not line up")
    return img


class RefDataset(Dataset):
    """Samples of one REFER split.

    ``train=True``: one item per referred object; each epoch picks one of its sentences at random
    (deterministically from ``(seed, epoch, index)``, so ``--resume`` sees the same data).
    ``train=False``: one item per sentence (evaluation uses every sentence).

    Items: ``{"image": 3×S×S float, "target": S×S float {0,1}, "sentence": str, "index": int}``
    where ``target`` is the referred object's mask and ``index`` points into :attr:`samples`;
    :class:`Collate` stacks them into a :class:`Batch`.
    """

    def __init__(self, refer: REFER, split: str, image_size: int, train: bool, seed: int = 0,
                 preload: bool = True):
        self.refer = refer
        self.samples: list[RefSample] = refer.samples(split)
        self.size = image_size
        self.train = train
        self.seed = seed
        self.epoch = 0
        groups: OrderedDict[int, list[int]] = OrderedDict()
        for i, s in enumerate(self.samples):
            groups.setdefault(s.ref_id, []).append(i)
        self.items = list(groups.values()) if train else [[i] for i in range(len(self.samples))]
        # Small datasets (the synthetic default) decode every image once; RefCOCO streams from disk.
        self._images: dict[int, torch.Tensor] | None = {} if preload else None
        self._masks: dict[int, np.ndarray] | None = {} if preload else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def one_attr_items(self) -> list[int]:
        """Items whose sentences are all one-attribute (the synthetic data's easy kind)."""
        return [i for i, group in enumerate(self.items) if all(self.samples[j].kind == ONE_ATTR for j in group)]

    def epoch_size(self, one_attr_fraction: float = 1.0) -> int:
        """How many items one epoch draws (see :meth:`epoch_order`)."""
        easy = len(self.one_attr_items()) if one_attr_fraction < 1 else 0
        return len(self.items) - easy + round(one_attr_fraction * easy)

    def epoch_order(self, epoch: int, one_attr_fraction: float = 1.0, rank: int = 0, world: int = 1) -> list[int]:
        """Rank ``rank``'s items of ``epoch`` in training order: a permutation drawn from ``seed + epoch``
        and split over ``world`` ranks as torch's ``DistributedSampler(shuffle=True, drop_last=True)``
        does, except that only a random ``one_attr_fraction`` of the one-attribute items (drawn anew
        each epoch) stays in it — the easy kind is learned early, and the spatial sentences need the
        updates (benchmarks/NOTES.md, issue 21). Every rank gets the same number of items."""
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.items), generator=g).tolist()
        if one_attr_fraction < 1:
            easy = self.one_attr_items()
            if not easy:
                raise UserError(f"data.one_attr_fraction={one_attr_fraction} needs one-attribute sentences, and "
                                f"split {self.samples[0].split!r} labels none (only the synthetic data does)")
            drop = set(easy[k] for k in torch.randperm(len(easy), generator=g)[round(one_attr_fraction * len(easy)):])
            order = [i for i in order if i not in drop]
        per_rank = len(order) // world
        return order[rank:per_rank * world:world]

    def __len__(self) -> int:
        return len(self.items)

    def sample_index(self, item: int) -> int:
        choices = self.items[item]
        if len(choices) == 1:
            return choices[0]
        rng = np.random.default_rng((self.seed, self.epoch, item))
        return choices[int(rng.integers(len(choices)))]

    def image(self, sample: RefSample) -> torch.Tensor:
        if self._images is None:
            return image_to_tensor(load_sample_image(sample), self.size)
        if sample.image_id not in self._images:
            img = load_sample_image(sample).resize((self.size, self.size), Image.BILINEAR)
            self._images[sample.image_id] = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        return _normalise(self._images[sample.image_id])

    def target(self, sample: RefSample) -> np.ndarray:
        if self._masks is not None and sample.ann_id in self._masks:
            return self._masks[sample.ann_id]
        m = resize_mask(self.refer.mask(sample), self.size)
        if self._masks is not None:
            self._masks[sample.ann_id] = m
        return m

    def __getitem__(self, item: int) -> dict:
        idx = self.sample_index(item)
        s = self.samples[idx]
        return {"image": self.image(s), "target": torch.from_numpy(self.target(s).astype(np.float32)),
                "sentence": s.sentence, "index": idx}


@dataclass(frozen=True)
class Batch:
    """A collated batch, as it goes from :class:`Collate` through the training step and the loss.

    Attributes:
        images: B×3×S×S float, normalised.  input_ids: B×L long.  attention_mask: B×L bool (True =
            a token).  target: B×S×S float {0,1}, the referred object's mask (the ground truth).
        index: B long, each sample's position in the dataset's ``samples``.  sentences: the B sentences.
    """

    images: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target: torch.Tensor
    index: torch.Tensor
    sentences: list

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        """Images, attention mask and target on ``device``. The token ids stay on the host: the text
        encoder reads them as its cache keys, which on a device copy would be a device→host wait."""
        return dataclasses.replace(self, images=self.images.to(device, non_blocking=non_blocking),
                                   attention_mask=self.attention_mask.to(device, non_blocking=non_blocking),
                                   target=self.target.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """Page-locked tensors (the DataLoader's ``pin_memory=True`` calls this)."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).pin_memory()
                                            for f in dataclasses.fields(self) if f.name != "sentences"})

    def split(self, parts: int) -> list["Batch"]:
        """``parts`` consecutive micro-batches of B / ``parts`` samples each (B must divide)."""
        n = len(self) // parts
        return [Batch(self.images[i * n:(i + 1) * n], self.input_ids[i * n:(i + 1) * n],
                      self.attention_mask[i * n:(i + 1) * n], self.target[i * n:(i + 1) * n],
                      self.index[i * n:(i + 1) * n], self.sentences[i * n:(i + 1) * n]) for i in range(parts)]


class Collate:
    """Stacks dataset items into a :class:`Batch`, tokenising their sentences."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items: list) -> Batch:
        sentences = [it["sentence"] for it in items]
        ids, mask = self.tokenizer(sentences)
        return Batch(images=torch.stack([it["image"] for it in items]), input_ids=ids, attention_mask=mask,
                     target=torch.stack([it["target"] for it in items]),
                     index=torch.tensor([it["index"] for it in items]), sentences=sentences)
