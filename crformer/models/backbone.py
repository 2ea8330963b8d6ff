"""Swin backbone run stage by stage with a Vision-Language Fusion module after every stage."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn

from crformer.errors import UserError
from crformer.models.layers import LayerNorm, MultiHeadAttention
from crformer.ops import AttentionBackend


class VisionLanguageFusion(nn.Module):
    """VLF: every pixel attends over the words; the result is fused into the visual features.

    ``x`` B×N×C pixel tokens, ``words`` B×L×C_l, ``mask`` B×L bool (True = valid token).
    Returns ``(x_next, multimodal)``, both B×N×C: ``multimodal`` = proj(vis(x) ⊙ attn(x, words))
    is kept for the decoder, and ``x_next = x + tanh-gate(multimodal) ⊙ multimodal`` feeds the
    next stage. The gate's last layer starts at zero so training starts from the plain backbone.
    The last stage has no next stage, so its VLF is built with ``gated=False`` (no unused weights).
    """

    def __init__(self, dim: int, lang_dim: int, num_heads: int = 1, attn_backend: AttentionBackend | str = "reference", gated: bool = True):
        super().__init__()
        self.norm = LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, lang_dim, dim, num_heads, attn_backend=attn_backend)
        self.vis_proj = nn.Sequential(nn.Linear(dim, dim), nn.GELU())
        self.fuse_proj = nn.Sequential(nn.Linear(dim, dim), nn.GELU())
        self.gate = None
        if gated:
            self.gate = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.Tanh())
            nn.init.zeros_(self.gate[2].weight)
            nn.init.zeros_(self.gate[2].bias)

    def forward(self, x: torch.Tensor, words: torch.Tensor, mask: torch.Tensor):
        lang = self.attn(self.norm(x), words, key_padding_mask=mask)
        multimodal = self.fuse_proj(self.vis_proj(x) * lang)
        if self.gate is None:
            return x, multimodal
        return x + self.gate(multimodal) * multimodal, multimodal


def load_backbone_weights(swin: nn.Module, path: str) -> None:
    """Load a Swin checkpoint from a local file; timm's filter maps key names and resizes tables."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    from crformer.checkpoint import load_tensor_file

    p = Path(path).expanduser()
    state = load_tensor_file(p, "backbone weights file")
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"backbone weights file {p} holds no state dict of tensors")
    try:
        state = checkpoint_filter_fn(state, swin)
        missing, unexpected = swin.load_state_dict(state, strict=False)
    except (RuntimeError, KeyError, ValueError) as e:  # shapes of another Swin, or keys timm cannot map
        raise UserError(f"backbone weights {p} do not fit the configured Swin: "
                        f"{str(e).strip().splitlines()[-1].strip()}") from None
    missing = [k for k in missing if not k.startswith(("head", "norm."))]
    if missing:
        raise UserError(f"backbone weights {p} do not fit the configured Swin: {len(missing)} missing keys "
                        f"(e.g. {missing[0]})")


class SwinVLFEncoder(nn.Module):
    """timm Swin + VLF after each stage.

    ``forward(images B×3×S×S, words B×L×C_l, mask B×L bool)`` → list of four multimodal maps
    B×C_i×(S/s_i)×(S/s_i) at strides 4, 8, 16, 32 (for patch size 4); C_i = ``self.dims[i]``.

    Args:
        image_size: S.  lang_dim: C_l, the word features' width.
        name: any timm Swin; ``embed_dim``, ``depths``, ``num_heads`` (per stage), ``window_size``,
            ``patch_size`` and ``drop_path_rate`` override its values (None: the timm model's own).
            These are the keys of the ``model.backbone`` config section.
        weights: a local Swin checkpoint to load (timm's filter maps key names), or None.
        vlf_heads: heads of each VLF's attention.  attn_backend: see :class:`MultiHeadAttention`.
    """

    def __init__(self, *, image_size: int = 64, lang_dim: int = 384, name: str = "swin_tiny_patch4_window7_224",
                 embed_dim: Optional[int] = 48, depths: Optional[Sequence[int]] = (2, 2, 2, 2),
                 num_heads: Optional[Sequence[int]] = (2, 4, 8, 16), window_size: Optional[int] = 4,
                 patch_size: Optional[int] = 4, drop_path_rate: Optional[float] = 0.1, weights: Optional[str] = None,
                 vlf_heads: int = 1, attn_backend: AttentionBackend | str = "reference"):
        super().__init__()
        import timm

        swin_args = {"embed_dim": embed_dim, "depths": depths, "num_heads": num_heads, "window_size": window_size,
                     "patch_size": patch_size, "drop_path_rate": drop_path_rate}
        overrides = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in swin_args.items() if v is not None}
        try:
            self.swin = timm.create_model(name, pretrained=False, img_size=image_size, num_classes=0,
                                          norm_layer=LayerNorm, **overrides)
        except (RuntimeError, ValueError, TypeError) as e:
            raise UserError(f"cannot build backbone {name!r} with {overrides}: {e}") from e
        if weights:
            load_backbone_weights(self.swin, weights)
        # The classification norm/head are unused; dropping them keeps DDP free of unused parameters.
        self.swin.norm = nn.Identity()
        self.swin.head = nn.Identity()
        self.dims = [info["num_chs"] for info in self.swin.feature_info]
        self.strides = [info["reduction"] for info in self.swin.feature_info]
        self.vlf = nn.ModuleList(VisionLanguageFusion(d, lang_dim, vlf_heads, attn_backend=attn_backend,
                                                      gated=i < len(self.dims) - 1)
                                 for i, d in enumerate(self.dims))
        self.out_norms = nn.ModuleList(LayerNorm(d) for d in self.dims)

    def forward(self, images: torch.Tensor, words: torch.Tensor, mask: torch.Tensor) -> list:
        x = self.swin.patch_embed(images)  # B×H×W×C (timm Swin is channels-last)
        maps = []
        for stage, vlf, norm in zip(self.swin.layers, self.vlf, self.out_norms):
            x = stage(x)
            B, H, W, C = x.shape
            fused, multimodal = vlf(x.reshape(B, H * W, C), words, mask)
            x = fused.view(B, H, W, C)
            maps.append(norm(multimodal).view(B, H, W, C).permute(0, 3, 1, 2))
        return maps
