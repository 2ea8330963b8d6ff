"""Explicit constructors: every public module builds from keyword arguments alone (no config) and runs
on small shapes; ``CRFormer.from_config`` is the keyword constructor fed from the config; the
attention backend is decided once, when a module is built."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from crformer.config import DEFAULTS, load_config
from crformer.data.tokenizer import SentenceTokenizer
from crformer.models import CRFormer
from crformer.models.backbone import SwinVLFEncoder
from crformer.models.decoder import CalibrationDecoder
from crformer.models.heads import LanguageReconstructionModule, MaskHead
from crformer.models.layers import MultiHeadAttention
from crformer.models.pixel_decoder import PixelDecoder, coordinate_channels, with_coordinates
from crformer.models.qgm import QueryGenerationModule
from crformer.ops import AttentionBackend
from tests.helpers import TINY_MODEL

B, L, D, NQ, C_L = 2, 5, 16, 3, 24
# The tiny model of tests/conftest.py TINY_MODEL, as keyword arguments.
TINY_KWARGS = dict(image_size=32, d_model=32, num_heads=2, ffn_dim=64, num_queries=4, num_decoder_layers=2,
                   position_frequencies=0, backbone=dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=2,
                                 drop_path_rate=0.0))


def _words():
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[True] * L, [True, True, False, False, False]])
    return torch.randn(B, L, D, generator=g), mask


def test_calibration_decoder():
    dec = CalibrationDecoder(dim=D, num_layers=2, num_heads=2, ffn_dim=32, num_queries=NQ)
    words, mask = _words()
    memories = [torch.randn(B, n, D) for n in (1, 4)]
    outs = dec(torch.randn(B, NQ, D), memories, [torch.randn(n, D) for n in (1, 4)], words, mask)
    assert [o.shape for o in outs] == [(B, NQ, D)] * 2


def test_query_generation_module():
    qgm = QueryGenerationModule(dim=D, num_queries=NQ, num_heads=2)
    words, mask = _words()
    assert qgm(torch.randn(B, D, 2, 3), words, mask, torch.randn(B, D)).shape == (B, NQ, D)


def test_pixel_decoder_and_mask_head():
    pix = PixelDecoder(in_dims=(8, 16, 32, 64), dim=D, memory_strides=(32, 16), mask_stride=2)
    maps = [torch.randn(B, c, 32 // s, 32 // s) for c, s in zip((8, 16, 32, 64), (4, 8, 16, 32))]
    memories, pixel, detail = pix(maps, torch.randn(B, 3, 32, 32))
    assert [m.shape for m in memories] == [(B, D, 1, 1), (B, D, 2, 2)]
    assert pixel.shape == (B, D, 8, 8) and detail.shape == (B, PixelDecoder.detail_dim, 16, 16)
    q, sentence = torch.randn(B, NQ, D), torch.randn(B, D)
    assert MaskHead(dim=D)(q, pixel, sentence).shape == (B, 8, 8)
    assert MaskHead(dim=D, detail_dim=PixelDecoder.detail_dim)(q, pixel, sentence, detail).shape == (B, 16, 16)


@pytest.mark.parametrize("frequencies", [0, 1, 3])
def test_coordinate_channels_are_the_positions_and_their_waves(frequencies):
    """Appended after the input's channels: x, y in [-1, 1], then per k sin/cos(2^k·π·x), sin/cos(2^k·π·y);
    checked in float64 on a grid that is neither square nor even."""
    H, W = 3, 5
    x = torch.randn(2, 4, H, W, dtype=torch.float64)
    out = with_coordinates(x, frequencies)
    assert out.shape == (2, 4 + coordinate_channels(frequencies), H, W)
    assert torch.equal(out[:, :4], x)
    for i in range(H):
        for j in range(W):
            px, py = -1 + 2 * j / (W - 1), -1 + 2 * i / (H - 1)
            want = [px, py]
            for k in range(frequencies):
                w = 2 ** k * math.pi
                want += [math.sin(w * px), math.sin(w * py), math.cos(w * px), math.cos(w * py)]
            for b in range(2):
                torch.testing.assert_close(out[b, 4:, i, j], torch.tensor(want, dtype=torch.float64))


def test_pixel_decoder_with_position_frequencies_reads_them():
    """The laterals take the wider input, and the waves change the output (they are not dropped)."""
    maps = [torch.randn(B, c, 32 // s, 32 // s) for c, s in zip((8, 16, 32, 64), (4, 8, 16, 32))]
    torch.manual_seed(0)
    pix = PixelDecoder(in_dims=(8, 16, 32, 64), dim=D, memory_strides=(32, 16), position_frequencies=2)
    assert pix.lateral[0][0].in_channels == 8 + 2 + 8
    _, pixel, _ = pix(maps, torch.randn(B, 3, 32, 32))
    with torch.no_grad():
        for lateral in pix.lateral:  # zero the weights that read the waves: a different pixel embedding
            lateral[0].weight[:, -8:] = 0
    _, flat, _ = pix(maps, torch.randn(B, 3, 32, 32))
    assert pixel.shape == (B, D, 8, 8) and not torch.allclose(pixel, flat)


def test_language_reconstruction_module():
    lrm = LanguageReconstructionModule(dim=D, lang_dim=C_L, max_tokens=L, num_heads=2)
    assert lrm(torch.randn(B, NQ, D)).shape == (B, L, C_L)


def test_swin_vlf_encoder():
    enc = SwinVLFEncoder(image_size=32, lang_dim=C_L, embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
                         window_size=2, drop_path_rate=0.0)
    _, mask = _words()
    maps = enc(torch.randn(B, 3, 32, 32), torch.randn(B, L, C_L), mask)
    assert [m.shape for m in maps] == [(B, 8, 8, 8), (B, 16, 4, 4), (B, 32, 2, 2), (B, 64, 1, 1)]


def test_crformer_from_keywords_is_the_model_from_config():
    """Same seed: the keyword-built tiny model and ``from_config`` of TINY_MODEL have the same
    parameters and give the same masks (B×S/2×S/2 at the default mask_stride 2)."""
    ids, mask = SentenceTokenizer("minilm", 20)(["the red square", "the circle left of the blue star"])
    images = torch.randn(2, 3, 32, 32)
    outs, states = [], []
    for build in (lambda: CRFormer(**TINY_KWARGS), lambda: CRFormer.from_config(load_config(None, TINY_MODEL))):
        torch.manual_seed(0)
        model = build().eval()
        states.append(model.state_dict())
        with torch.no_grad():
            outs.append(model(images, ids, mask)["pred_masks"])
    assert outs[0].shape == (2, 16, 16)
    assert states[0].keys() == states[1].keys() and all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def _defaults(cls) -> dict:
    return {n: p.default for n, p in inspect.signature(cls).parameters.items()}


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def test_constructor_defaults_are_the_config_defaults():
    """CRFormer() is the embedded default model: every argument but ``device`` (where it will run)
    is a config key with its default."""
    got = _defaults(CRFormer)
    assert got.pop("device") is None
    want = {**DEFAULTS["model"], "image_size": DEFAULTS["data"]["image_size"],
            "max_tokens": DEFAULTS["data"]["max_tokens"]}
    assert got.keys() == want.keys()
    backbone = want.pop("backbone")
    assert got.pop("backbone") is None
    assert {k: _plain(v) for k, v in got.items()} == want
    swin = _defaults(SwinVLFEncoder)
    assert {k: _plain(swin[k]) for k in backbone} == backbone


def _backends(model: torch.nn.Module) -> set:
    return {m.attn_backend for m in model.modules() if isinstance(m, MultiHeadAttention)}


def test_backend_is_decided_once_at_build(monkeypatch):
    """auto resolves for the device the model is built for; the env var fills in for auto, never
    for an explicit config value; modules never read it (they get the model's decision)."""
    cfg = load_config(None, TINY_MODEL)
    monkeypatch.delenv("CRFORMER_ATTN_BACKEND", raising=False)
    assert _backends(CRFormer.from_config(cfg, "cpu")) == {"reference"}
    assert _backends(CRFormer.from_config(cfg, "cuda")) == {"triton"}  # built on CPU, resolved for CUDA
    monkeypatch.setenv("CRFORMER_ATTN_BACKEND", "sdpa")
    assert _backends(CRFormer.from_config(cfg, "cuda")) == {"sdpa"}
    assert _backends(CRFormer(**TINY_KWARGS, attn_backend="reference")) == {"reference"}
    assert MultiHeadAttention(8, 8, 8, 2).attn_backend == "reference"


def test_modules_call_their_backend_without_resolving_or_checking_it(monkeypatch):
    """The env var and the availability check (an import per backend) count when the model is
    built, not per call."""
    mha = MultiHeadAttention(8, 8, 8, 2, attn_backend="sdpa")
    monkeypatch.setenv("CRFORMER_ATTN_BACKEND", "xformers")  # would fail on CPU if read per call

    def no_check(self, device):
        raise AssertionError(f"{self.name}: availability checked during a call")

    monkeypatch.setattr(AttentionBackend, "unavailable", no_check)
    x = torch.randn(1, 3, 8)
    assert mha(x, x).shape == (1, 3, 8)


def test_unknown_or_unresolved_backend_is_refused_at_build(monkeypatch):
    from crformer.errors import UserError

    with pytest.raises(UserError, match="unknown attention backend 'flash'"):
        MultiHeadAttention(8, 8, 8, 2, attn_backend="flash")
    with pytest.raises(UserError, match="'auto' is decided by CRFormer"):
        MultiHeadAttention(8, 8, 8, 2, attn_backend="auto")
    monkeypatch.setenv("CRFORMER_ATTN_BACKEND", "flash")
    with pytest.raises(UserError, match="unknown CRFORMER_ATTN_BACKEND 'flash'"):
        CRFormer(**TINY_KWARGS)
    monkeypatch.delenv("CRFORMER_ATTN_BACKEND")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UserError, match="attention backend 'triton' runs on cuda tensors"):
        CRFormer(**TINY_KWARGS, attn_backend="triton", device="cpu")
