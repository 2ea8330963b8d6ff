"""``--protocol lavt`` as LAVT's test.py: the prediction at S×S against the ground truth resized to
S×S by PIL nearest neighbour (torchvision ``Resize(interpolation=NEAREST)`` on the PIL mask), not
by an area-weighted resize and a threshold, which drops or thickens thin parts."""

import numpy as np
import pytest
import torch
from PIL import Image

from crformer.data.refer import RefSample
from crformer.engine import evaluate_split
from crformer.metrics import RISMetrics

H, W = 427, 640  # a typical COCO image, H×W


def thin_mask(seed: int, h: int = H, w: int = W) -> np.ndarray:
    """Random blobs plus 1-pixel lines (horizontal, vertical, diagonal) and single pixels: the parts
    an S×S resize treats differently by method."""
    rng = np.random.default_rng(seed)
    m = np.zeros((h, w), dtype=bool)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(4):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(5, 60)
        m |= (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
    for _ in range(6):
        m[rng.integers(0, h), rng.integers(0, w // 2):] = True
        m[rng.integers(0, h // 2):, rng.integers(0, w)] = True
    d = np.arange(min(h, w))
    m[d, (d * 3 + 7) % w] = True
    m[rng.integers(0, h, 300), rng.integers(0, w, 300)] = True
    return m


def pil_nearest(mask: np.ndarray, size: int) -> np.ndarray:
    """The independent reference: what LAVT's transform does to its (uint8, mode L/P) target."""
    return np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((size, size), Image.NEAREST)) > 0


def _lavt_target(mask: np.ndarray, size: int) -> np.ndarray:
    from crformer.data.dataset import resize_mask_nearest

    return resize_mask_nearest(mask, size)


@pytest.mark.parametrize("size", [480, 416, 384, 320, 64, 1000])
def test_lavt_ground_truth_is_pil_nearest(size):
    mask = thin_mask(size)
    ours = _lavt_target(mask, size)
    assert ours.dtype == bool and ours.shape == (size, size)
    ref = pil_nearest(mask, size)
    assert (ours != ref).sum() == 0, f"{(ours != ref).sum()} of {size * size} pixels differ from PIL nearest"


@pytest.mark.parametrize("h,w,size", [(H, W, 480), (W, H, 384), (H, W, 256), (500, 375, 480)])
def test_pil_nearest_samples_the_pixel_centres(h, w, size):
    """What PIL's NEAREST does: output pixel i reads input pixel ⌊(i + ½)·n/S⌋ (the source pixel
    under the output pixel's centre). Exactly on a pixel border (where (2i+1)·n is a multiple of 2S,
    e.g. n/S = 4/3) PIL's running floating-point sum decides which side; those rows/columns are left
    out here and covered by the comparison with PIL itself above."""
    mask = thin_mask(h + w, h, w)
    ref = pil_nearest(mask, size)

    def centres(n):
        i = np.arange(size)
        return (2 * i + 1) * n // (2 * size), (2 * i + 1) * n % (2 * size) != 0

    (ys, y_ok), (xs, x_ok) = centres(h), centres(w)
    assert y_ok.sum() > size // 2 and x_ok.sum() > size // 2
    np.testing.assert_array_equal(ref[np.ix_(y_ok, x_ok)], mask[np.ix_(ys[y_ok], xs[x_ok])])


class _Refer:
    """Just what evaluate_split reads: samples(split) and mask(sample)."""

    def __init__(self, samples, masks):
        self._samples, self._masks = samples, masks

    def samples(self, split):
        return [s for s in self._samples if s.split == split]

    def mask(self, sample):
        return self._masks[sample.ann_id]


class _FixedLogits(torch.nn.Module):
    """A 'model' that returns fixed S×S mask logits for the one batch (so the S×S protocol sees them
    as they are)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, images, input_ids, attention_mask):
        assert images.shape[0] == self.logits.shape[0]
        return {"pred_masks": self.logits}


def test_evaluate_split_protocol_lavt_uses_the_nearest_ground_truth(tmp_path):
    S, n = 32, 3
    samples, masks = [], {}
    for k in range(n):
        path = tmp_path / f"{k}.png"
        Image.fromarray(np.full((H, W, 3), 40 * k, dtype=np.uint8)).save(path)
        samples.append(RefSample(image_path=str(path), sentence=f"thing {k}", ref_id=k, ann_id=k, image_id=k,
                                 sent_id=k, split="val", kind=None, height=H, width=W))
        masks[k] = thin_mask(100 + k)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, S, S, generator=g)
    cfg = {"data": {"image_size": S, "preload": False, "num_workers": 0}, "eval": {"batch_size": 8, "amp": "none"}}

    def tokenizer(sentences):
        return torch.ones(len(sentences), 4, dtype=torch.long), torch.ones(len(sentences), 4, dtype=torch.bool)

    out = evaluate_split(_FixedLogits(logits), _Refer(samples, masks), "val", cfg, tokenizer, torch.device("cpu"),
                         protocol="lavt")
    expected = RISMetrics()
    for k in range(n):
        expected.update((logits[k] > 0).numpy(), pil_nearest(masks[k], S))
    assert out["lavt"] == pytest.approx(expected.compute())
