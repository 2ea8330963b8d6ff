"""Mask head (per-query masks merged by confidence) and the Language Reconstruction Module."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from crformer.models.decoder import CrossAttentionLayer, FFNLayer
from crformer.models.layers import ignore_removed_state
from crformer.models.pixel_decoder import conv_gn_relu
from crformer.ops import AttentionBackend


def _mlp(din: int, hidden: int, dout: int, layers: int, last_bias: bool = True) -> nn.Sequential:
    mods = []
    for i in range(layers):
        last = i == layers - 1
        mods.append(nn.Linear(din if i == 0 else hidden, dout if last else hidden, bias=last_bias or not last))
        if i < layers - 1:
            mods.append(nn.ReLU(inplace=True))
    return nn.Sequential(*mods)


class MaskHead(nn.Module):
    """Per-query masks Q·F_pix merged into one mask with softmax-over-queries confidences.

    ``forward(q B×N_q×D, pixel B×D×H×W, sentence B×D, detail=None)`` → mask logits B×H×W, or
    B×H'×W' when ``detail`` (B×C_d×H'×W', built with ``detail_dim`` = C_d) is given: the mask is
    then upsampled to the detail grid and a residual from two convolutions over [detail, mask]
    sharpens its outline. The residual's last layer starts at zero (plain upsampling).

    The confidence MLP's last layer has no bias: one constant added to every query's confidence,
    which the softmax over queries cancels (older checkpoints' ``confidence.2.bias`` is dropped on
    load).

    Args:
        dim: D, the query and pixel-embedding width.
        detail_dim: C_d of the detail features (0: no refinement; ``PixelDecoder.detail_dim`` when
            the pixel decoder has ``mask_stride`` < 4).
    """

    def __init__(self, *, dim: int = 128, detail_dim: int = 0):
        super().__init__()
        self.mask_embed = _mlp(dim, dim, dim, 3)
        self.confidence = _mlp(2 * dim, dim, 1, 2, last_bias=False)
        ignore_removed_state(self, "confidence.2.bias")
        self.refine = None
        if detail_dim:
            self.refine = nn.Sequential(conv_gn_relu(detail_dim + 1, detail_dim, 3),
                                        nn.Conv2d(detail_dim, 1, 3, padding=1))
            nn.init.zeros_(self.refine[-1].weight)
            nn.init.zeros_(self.refine[-1].bias)

    def query_masks(self, q: torch.Tensor, pixel: torch.Tensor) -> torch.Tensor:
        """Each query's own mask logits, B×N_q×H×W, before the confidences merge them."""
        return torch.einsum("bqd,bdhw->bqhw", self.mask_embed(q), pixel)

    def forward(self, q: torch.Tensor, pixel: torch.Tensor, sentence: torch.Tensor,
                detail: torch.Tensor | None = None) -> torch.Tensor:
        masks = self.query_masks(q, pixel)
        ctx = sentence[:, None, :].expand_as(q)
        weights = self.confidence(torch.cat([q, ctx], dim=-1)).squeeze(-1).softmax(dim=1)
        logits = torch.einsum("bq,bqhw->bhw", weights, masks)
        if self.refine is None or detail is None:
            return logits
        up = F.interpolate(logits[:, None], size=detail.shape[-2:], mode="bilinear", align_corners=False)
        return (up + self.refine(torch.cat([detail, up.to(detail.dtype)], dim=1)))[:, 0]


class LanguageReconstructionModule(nn.Module):
    """L learnable token slots attend to the final queries (attention + FFN) and are projected
    back to the text encoder's width: ``forward(q B×N_q×D)`` → F̂_l B×L×C_l. Training only.

    Args:
        dim: D, the query width.  lang_dim: C_l, the text encoder's width.  max_tokens: L.
        num_heads: attention heads.  attn_backend: see :class:`~crformer.models.layers.MultiHeadAttention`.
    """

    def __init__(self, *, dim: int = 128, lang_dim: int = 384, max_tokens: int = 20, num_heads: int = 4,
                 attn_backend: AttentionBackend | str = "reference"):
        super().__init__()
        self.slots = nn.Parameter(torch.randn(max_tokens, dim) * 0.02)
        self.attn = CrossAttentionLayer(dim, num_heads, attn_backend=attn_backend)
        self.ffn = FFNLayer(dim, 2 * dim)
        self.out = nn.Linear(dim, lang_dim)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        slots = self.slots[None].expand(q.shape[0], -1, -1)
        return self.out(self.ffn(self.attn(slots, q)))
