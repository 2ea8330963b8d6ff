"""The Python API: ``Segmenter.from_checkpoint(path)(image, sentence)`` → bool mask at the image's size."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from crformer import Segmenter, predict, train
from crformer.errors import UserError
from crformer.process import run
from tests.helpers import TINY_MODEL


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("api")
    run(train.main, TINY_MODEL + [f"data.cache_dir={data_cache}", f"train.out_dir={out}", "train.epochs=1",
                                  "eval.language_check=false"])
    return out / "best.pt"


@pytest.fixture(scope="module")
def seg(checkpoint):
    return Segmenter.from_checkpoint(checkpoint, device="cpu")


def scene(h: int, w: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def test_path_pil_and_array_give_the_same_mask_at_the_image_size(seg, tmp_path):
    array = scene(37, 53, 0)
    Image.fromarray(array).save(tmp_path / "s.png")
    masks = [seg(x, "the red square") for x in (tmp_path / "s.png", str(tmp_path / "s.png"),
                                                  Image.fromarray(array), array)]
    for m in masks:
        assert m.dtype == bool and m.shape == (37, 53)
        np.testing.assert_array_equal(m, masks[0])


def test_a_batch_of_pairs_equals_one_at_a_time(seg):
    pairs = [(scene(30 + 7 * i, 41 - 3 * i, i), s) for i, s in
             enumerate(["the red square", "the blue star", "the leftmost circle", "the big green triangle"])]
    seg.batch_size = 3  # two batches, the second one partial
    batched = seg.batch(pairs)
    assert [m.shape for m in batched] == [im.shape[:2] for im, _ in pairs]
    for (image, sentence), m in zip(pairs, batched):
        np.testing.assert_array_equal(m, seg(image, sentence))


def test_same_mask_as_the_predict_cli(seg, checkpoint, tmp_path):
    Image.fromarray(scene(40, 50, 3)).save(tmp_path / "s.png")
    run(predict.main, ["--checkpoint", str(checkpoint), "--image", str(tmp_path / "s.png"), "--text", "the star",
                       "--out", str(tmp_path / "o.png"), "--device", "cpu"])
    cli_mask = np.asarray(Image.open(tmp_path / "o_mask.png")) > 0
    np.testing.assert_array_equal(seg(tmp_path / "s.png", "the star"), cli_mask)


@pytest.mark.parametrize("bad,needle", [(np.zeros((8, 8), np.uint8), "H×W×3 uint8"),
                                        (np.zeros((8, 8, 3), np.float32), "H×W×3 uint8"),
                                        (42, "got int"), ("/no/such/image.png", "image.png")])
def test_bad_images_are_user_errors(seg, bad, needle):
    with pytest.raises(UserError, match=needle):
        seg(bad, "the star")


def test_inference_compiles_on_eval_compile_not_on_train_compile(checkpoint):
    """A run trained compiled must not make predicting one image pay a compilation; eval.compile asks."""
    import torch

    compiled = torch._dynamo.eval_frame.OptimizedModule
    trained_compiled = Segmenter.from_checkpoint(checkpoint, device="cpu", overrides=["train.compile=default"])
    assert not isinstance(trained_compiled.model, compiled)
    asked = Segmenter.from_checkpoint(checkpoint, device="cpu", overrides=["eval.compile=default"])
    assert isinstance(asked.model, compiled)


@pytest.mark.parametrize("train_amp", ["bf16", "none"])
def test_inference_precision_is_eval_amp_not_train_amp(checkpoint, monkeypatch, train_amp):
    """eval.amp decides inference precision (auto: fp32 on CPU) whatever the run trained with."""
    import crformer.api

    seen = []
    real = crformer.api.predict_logits
    monkeypatch.setattr(crformer.api, "predict_logits", lambda *a: seen.append(a[-1]) or real(*a))
    image = scene(20, 24, 3)
    for eval_amp in ("auto", "bf16", "none"):
        seg = Segmenter.from_checkpoint(checkpoint, device="cpu", overrides=[f"train.amp={train_amp}",
                                                                              f"eval.amp={eval_amp}"])
        seg(image, "the red circle")
    assert seen == ["auto", "bf16", "none"]


def test_the_api_imports_no_command_line_code():
    """Library errors must not speak of flags: the API, models and data never load the CLI modules."""
    import subprocess
    import sys

    code = ("import sys, crformer.api, crformer.data, crformer.models\n"
            "print(sorted(m for m in sys.modules if m in ('crformer.cli', 'crformer.process')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
