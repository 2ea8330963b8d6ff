"""No dead parameters: one training step of the tiny model gives every trainable parameter a
gradient that is not negligible against its own scale.

A parameter whose effect softmax cancels (a bias or embedding added equally to every score of a
softmax row) receives a gradient of 0 in theory, rounding in practice (~1e-9 of its scale in fp32,
~1e-17 in float64): it costs memory and optimizer state and learns nothing. The threshold below sits between
those and the smallest gradient of a parameter that acts (see ``MIN_RATIO``).
"""

import pytest
import torch

from crformer.config import load_config
from crformer.models import build_model
from crformer.models.losses import crformer_loss
from tests.helpers import TINY_MODEL

# ‖grad‖ / max(‖p‖, 1) measured in float64 over seeds 0-3 and both decoder forms: the 15 dead
# parameters of the model before they were removed (every attention's k_proj.bias — the folded
# decoder had frozen its two cross-attention ones —, the decoder's level_embed, qgm.spatial.bias,
# mask_head.confidence.2.bias) got 2e-19 – 1.1e-17, rounding of
# softmax's cancellation; the smallest live ratio, before and after, was 5.4e-8
# (lrm.attn.attn.q_proj.weight: its inputs are the LRM slots, initialised at 0.02). 1e-12 is ×1e5
# above the one and ×5e4 below the other. (In fp32 the two ranges come within ×11 of each other:
# dead up to 5e-9, live down to 5.7e-8.)
MIN_RATIO = 1e-12

# 64², not the CLI tests' 32²: at 32² Swin's last stage is a single 1×1 window, a softmax over one
# key, so that stage's relative-position table would be dead for a reason of size alone.
SIZE = 64


def _one_step(*overrides: str, seed: int = 0) -> dict:
    """‖grad‖ / max(‖p‖, 1) of every trainable parameter after one forward/backward (train mode)."""
    torch.manual_seed(seed)
    cfg = load_config(None, TINY_MODEL + [f"data.image_size={SIZE}", *overrides])
    # float64: softmax's cancellation then leaves ~1e-16 of rounding instead of fp32's ~1e-9, far
    # below the smallest live gradient (the frozen encoder's feature cache is fp32: bypassed).
    model = build_model(cfg).double().train()
    model.text_encoder.use_cache = False
    with torch.no_grad():
        # Zero-initialised parameters (the VLF gates' and the mask refinement's last layers, norm
        # biases) would make every parameter upstream of them get an exactly-zero gradient at step
        # 0 — dead only at the initial point, not by construction. Moving them off zero shows
        # whether the parameters behind them can learn once training has moved them.
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.normal_(std=0.02)
    B, L = 3, cfg["data"]["max_tokens"]
    vocab = model.text_encoder.bert.config.vocab_size
    lengths = torch.tensor([L, 5, 2])
    mask = torch.arange(L)[None] < lengths[:, None]
    ids = torch.randint(1000, vocab, (B, L)) * mask  # padding id 0 where the mask is False
    images = torch.randn(B, 3, SIZE, SIZE, dtype=torch.float64)
    target = (torch.rand(B, SIZE, SIZE) > 0.5).double()
    out = model(images, ids, mask)
    crformer_loss(out, target, cfg["loss"])["total"].backward()
    ratios = {}
    for name, p in model.named_parameters():
        if p.requires_grad:  # the frozen text encoder drops out here
            g = 0.0 if p.grad is None else p.grad.norm().item()
            ratios[name] = g / max(p.detach().norm().item(), 1.0)
    return ratios


@pytest.mark.parametrize("fold", [False, True], ids=["plain", "folded"])
def test_every_trainable_parameter_gets_a_gradient(fold):
    ratios = _one_step(f"model.fold_decoder_attention={fold}")
    assert len(ratios) > 100
    smallest = sorted(ratios.items(), key=lambda kv: kv[1])[:5]
    print("smallest gradient ratios:", ", ".join(f"{n} {r:.2e}" for n, r in smallest))
    dead = {n: f"{r:.1e}" for n, r in ratios.items() if r <= MIN_RATIO}
    assert not dead, f"parameters that cannot learn (‖grad‖/max(‖p‖,1) ≤ {MIN_RATIO}): {dead}"


def test_checkpoints_with_the_removed_parameters_still_load():
    """A state dict of the model as it was (with every k_proj.bias, decoder.level_embed,
    qgm.spatial.bias, mask_head.confidence.2.bias) loads, strictly and through the checkpoint
    loader; only exactly those entries are dropped, and the caller's dict is left as it was."""
    from crformer.checkpoint import load_model_state
    from crformer.errors import UserError
    from crformer.models.layers import MultiHeadAttention

    cfg = load_config(None, TINY_MODEL)
    model = build_model(cfg)
    D, nq = cfg["model"]["d_model"], cfg["model"]["num_queries"]
    old = {k: v.clone() for k, v in model.state_dict().items()}
    removed = {f"{n}.k_proj.bias": torch.randn(m.k_proj.out_features) for n, m in model.named_modules()
               if isinstance(m, MultiHeadAttention)}
    removed.update({"decoder.level_embed": torch.randn(3, D), "qgm.spatial.bias": torch.randn(nq),
                    "mask_head.confidence.2.bias": torch.randn(1)})
    assert len(removed) == 15 and not set(removed) & set(old)
    old.update(removed)
    model.load_state_dict(old)  # strict
    load_model_state(model, old)
    assert set(removed) <= set(old)
    with pytest.raises(UserError):  # any other stray key still fails
        load_model_state(model, {**old, "qgm.spatial.weight_extra": torch.zeros(1)})


def test_a_key_bias_changes_no_attention_output():
    """Why k_proj has no bias: one added to the keys shifts every score of a query row equally."""
    from crformer.models.layers import MultiHeadAttention

    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 24, 32, 4).double()
    q, kv = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 9, 24, dtype=torch.float64)
    mask = torch.rand(2, 9) > 0.3
    mask[:, 0] = True
    plain = mha(q, kv, key_padding_mask=mask)
    biased = torch.nn.Linear(24, 32).double()
    with torch.no_grad():
        biased.weight.copy_(mha.k_proj.weight)
        biased.bias.normal_()
    mha.k_proj = biased
    torch.testing.assert_close(mha(q, kv, key_padding_mask=mask), plain, rtol=1e-12, atol=1e-12)
