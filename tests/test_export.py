"""Models to share: ``Segmenter.save_pretrained`` / ``from_pretrained`` (config.json + model.safetensors,
loaded with no pickle) and ``python -m crformer.export`` give the checkpoint's masks; damaged folders are
one error line."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from crformer import Segmenter, export
from crformer.checkpoint import load_checkpoint
from crformer.errors import UserError
from crformer.models.text_encoder import TextEncoder
from crformer.process import run
from tests.helpers import mixed_mask_checkpoint

PAIRS = [((np.random.default_rng(i).random((30 + 9 * i, 47 - 5 * i, 3)) * 255).astype(np.uint8), s)
         for i, s in enumerate(["the red square", "the leftmost blue star", "the big circle"])]


def masks(seg: Segmenter) -> list:
    return seg.batch(PAIRS)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_cache):
    return mixed_mask_checkpoint(tmp_path_factory.mktemp("export"), data_cache)


@pytest.fixture(scope="module")
def before(checkpoint):
    out = masks(Segmenter.from_checkpoint(checkpoint, device="cpu"))
    covered = [m.mean() for m in out]
    assert all(0.05 < c < 0.95 for c in covered), covered  # masks that a mistake would change
    return out


def no_pickle(monkeypatch) -> None:
    """Make every way to unpickle fail while the test loads."""
    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was read")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)


def test_round_trip_gives_the_same_masks_with_no_pickle(checkpoint, before, tmp_path, monkeypatch):
    seg = Segmenter.from_checkpoint(checkpoint, device="cpu")
    seg.save_pretrained(tmp_path / "shared")
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((tmp_path / "shared" / "config.json").read_text())
    model_cfg = meta["config"]["model"]
    assert model_cfg["text_encoder"] == "minilm" and model_cfg["backbone"]["weights"] is None
    no_pickle(monkeypatch)
    loaded = Segmenter.from_pretrained(tmp_path / "shared", device="cpu")
    monkeypatch.undo()
    for a, b in zip(masks(loaded), before):
        np.testing.assert_array_equal(a, b)
    want = load_checkpoint(checkpoint)["model"]
    got = {k: v for k, v in loaded.model.state_dict().items() if not k.startswith("text_encoder.")}
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_fine_tuned_text_encoder_travels_in_the_folder(tmp_path, data_cache, monkeypatch):
    ckpt = mixed_mask_checkpoint(tmp_path / "run", data_cache, "model.text_finetune=true")
    seg = Segmenter.from_checkpoint(ckpt, device="cpu")
    seg.save_pretrained(tmp_path / "shared")
    encoder = tmp_path / "shared" / "text_encoder"
    assert (encoder / "model.safetensors").is_file() and (encoder / "config.json").is_file()
    assert not list(encoder.rglob("*.bin")) and not list(encoder.rglob("*.pt"))
    no_pickle(monkeypatch)
    loaded = Segmenter.from_pretrained(tmp_path / "shared", device="cpu")
    monkeypatch.undo()
    for a, b in zip(masks(loaded), masks(seg)):
        np.testing.assert_array_equal(a, b)
    trained = load_checkpoint(ckpt)["model"]
    bert = {f"text_encoder.{k}": v for k, v in loaded.model.text_encoder.state_dict().items()}
    assert all(torch.equal(bert[k], v) for k, v in trained.items() if k.startswith("text_encoder."))
    # the weights came from the folder, not from the embedded package (one step of fine-tuning moved them)
    stock = TextEncoder("minilm").state_dict()
    assert any(not torch.equal(bert[f"text_encoder.{k}"], v) for k, v in stock.items())
    (encoder / "vocab_extra.txt").write_text("planted")
    with pytest.raises(UserError, match="vocab_extra.txt is not listed in"):
        Segmenter.from_pretrained(tmp_path / "shared", device="cpu")
    seg.save_pretrained(tmp_path / "shared")  # a re-export replaces the earlier one and removes what it left
    assert not (encoder / "vocab_extra.txt").exists()
    Segmenter.from_pretrained(tmp_path / "shared", device="cpu")


def test_export_cli_writes_a_folder_that_gives_the_checkpoints_masks(checkpoint, before, tmp_path, capsys):
    out = tmp_path / "exported"
    run(export.main, ["--checkpoint", str(checkpoint), "--out", str(out)])
    assert f"wrote {out}: config.json, model.safetensors;" in capsys.readouterr().out
    for a, b in zip(masks(Segmenter.from_pretrained(out, device="cpu")), before):
        np.testing.assert_array_equal(a, b)
    run(export.main, ["--checkpoint", str(checkpoint), "--out", str(out)])  # replacing an export is fine


def test_predict_takes_an_exported_folder_as_its_checkpoint(checkpoint, tmp_path):
    from PIL import Image

    from crformer import predict

    Segmenter.from_checkpoint(checkpoint, device="cpu").save_pretrained(tmp_path / "shared")
    Image.fromarray(PAIRS[0][0]).save(tmp_path / "scene.png")
    for source, name in ((checkpoint, "a.png"), (tmp_path / "shared", "b.png")):
        run(predict.main, ["--checkpoint", str(source), "--image", str(tmp_path / "scene.png"), "--text", PAIRS[0][1],
                           "--out", str(tmp_path / name), "--device", "cpu"])
    a, b = (np.asarray(Image.open(tmp_path / f"{n}_mask.png")) for n in "ab")
    np.testing.assert_array_equal(a, b)
    assert 0 < (a > 0).mean() < 1


def one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        run(export.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_export_cli_bad_input_is_one_line_and_writes_nothing(checkpoint, tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"\xff\xd8 mine")
    assert "holds no saved CRFormer model" in one_line_error(
        capsys, ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "photos")])
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == ["holiday.jpg"]
    assert "none.pt" in one_line_error(capsys, ["--checkpoint", str(tmp_path / "none.pt"), "--out",
                                                str(tmp_path / "x")])
    assert "--out" in one_line_error(capsys, ["--checkpoint", str(checkpoint)])


def test_damaged_folders_are_one_line_errors(checkpoint, tmp_path):
    seg = Segmenter.from_checkpoint(checkpoint, device="cpu")
    seg.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))  # one flipped bit, or an export interrupted after the weights
    with pytest.raises(UserError, match="model.safetensors does not match .*config.json"):
        Segmenter.from_pretrained(tmp_path / "m", device="cpu")
    weights.unlink()
    with pytest.raises(UserError, match="saved model file not found: .*model.safetensors"):
        Segmenter.from_pretrained(tmp_path / "m", device="cpu")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(UserError, match="is not the config of a saved CRFormer model"):
        Segmenter.from_pretrained(tmp_path / "m", device="cpu")
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(UserError, match="saved model config not found"):
        Segmenter.from_pretrained(tmp_path / "m", device="cpu")
    with pytest.raises(UserError, match="saved model folder not found"):
        Segmenter.from_pretrained(tmp_path / "nothing", device="cpu")
