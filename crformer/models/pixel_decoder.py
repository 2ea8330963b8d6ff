"""Light FPN over the four multimodal maps → decoder memories and the per-pixel embedding."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from crformer.errors import UserError
from crformer.models.layers import GroupNorm


def conv_gn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    # Up to 32 groups but at least 2 channels each, so a 1×1 map of one image still normalises.
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if cout % g == 0 and cout // g >= 2 or g == 1)
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), GroupNorm(groups, cout),
                         nn.ReLU(inplace=True))


def coordinate_channels(frequencies: int) -> int:
    """How many channels :func:`with_coordinates` appends: x, y and a sine and cosine per axis per frequency."""
    return 2 + 4 * frequencies


def with_coordinates(x: torch.Tensor, frequencies: int = 0) -> torch.Tensor:
    """Append x/y coordinate channels in [-1, 1] and, per axis, sin/cos(2^k·π·coordinate) for k < ``frequencies``
    (2^k periods over the image): B×C×H×W → B×(C + :func:`coordinate_channels`)×H×W."""
    B, _, H, W = x.shape
    ys = torch.linspace(-1, 1, H, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1, 1, W, device=x.device, dtype=x.dtype)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=0)  # 2×H×W: x, y
    waves = [f(grid * (math.pi * 2 ** k)) for k in range(frequencies) for f in (torch.sin, torch.cos)]
    return torch.cat([x, torch.cat([grid, *waves])[None].expand(B, -1, -1, -1)], dim=1)


class PixelDecoder(nn.Module):
    """``forward(maps, images)`` with maps at ``strides`` (4, 8, 16, 32; channels ``in_dims``) and
    the B×3×S×S images → ``(memories, pixel_embedding, detail)``: memories = one B×D×(S/s)² map per
    stride s of ``memory_strides`` (paper: 32, 16, 8 — coarse first, the order the decoder layers
    cycle through; pass only the ones used, so a shallow decoder leaves no unused weights),
    pixel_embedding B×D×(S/4)×(S/4), and detail B×C_d×(S/s)×(S/s) or None.

    ``mask_stride`` s = 4 is the paper's design (masks at the finest backbone level; detail None).
    s = 2 or 1 adds a light two-conv stem over the image at that stride (``detail_dim`` channels)
    that the mask head uses to refine the upsampled mask's outline: at small inputs (64² on a CPU,
    objects ~10 px wide) a stride-4 mask cannot trace a star. The detail features never enter the
    query-pixel product, so which object is chosen stays the language-driven decoder's decision.

    Args:
        in_dims: channels C_i of the four maps (default: the default Swin's, embed_dim 48).
        dim: D, the width of the memories and the pixel embedding.
        memory_strides: strides of the decoder memories, coarse first.  mask_stride: 4, 2 or 1.
        strides: the maps' strides (the backbone's).
        position_frequencies: F, the sine/cosine coordinate channels beside x and y
            (:func:`with_coordinates`; 0: x and y only).
    """

    detail_dim = 32

    def __init__(self, *, in_dims: Sequence[int] = (48, 96, 192, 384), dim: int = 128,
                 memory_strides: Sequence[int] = (32, 16, 8), mask_stride: int = 4,
                 strides: Sequence[int] = (4, 8, 16, 32), position_frequencies: int = 0):
        super().__init__()
        if mask_stride not in (1, 2, 4):
            raise UserError(f"model.mask_stride must be 1, 2 or 4, got {mask_stride!r}")
        bad = [s for s in memory_strides if s not in strides]
        if bad or not memory_strides:
            raise UserError(f"model.memory_strides must be backbone strides {list(strides)}; got {list(memory_strides)}")
        self.mask_stride, self.position_frequencies = mask_stride, position_frequencies
        # Coordinate channels: Swin features carry no absolute position, and "the leftmost ..." /
        # "... above the ..." need it in the memories and the pixel embedding. The sines and cosines
        # make a bump at any position linear in the features, so a query can match one object's place.
        extra = coordinate_channels(position_frequencies)
        self.lateral = nn.ModuleList(conv_gn_relu(c + extra, dim, 1) for c in in_dims)
        self.memory_levels = [list(strides).index(s) for s in memory_strides]
        self.output = nn.ModuleDict({str(i): conv_gn_relu(dim, dim, 3) for i in [0] + self.memory_levels})
        self.pixel_proj = nn.Conv2d(dim, dim, 1)
        self.detail = None
        if mask_stride < 4:
            w = self.detail_dim
            self.detail = nn.Sequential(nn.Conv2d(3, w, 3, stride=mask_stride, padding=1, bias=False),
                                        GroupNorm(8, w), nn.ReLU(inplace=True), conv_gn_relu(w, w, 3))

    def forward(self, maps: list, images: torch.Tensor):
        lats = [None] * len(maps)
        top = None
        for i in reversed(range(len(maps))):
            lat = self.lateral[i](with_coordinates(maps[i], self.position_frequencies))
            if top is not None:
                lat = lat + F.interpolate(top, size=lat.shape[-2:], mode="bilinear", align_corners=False)
            lats[i] = top = lat
        # A stride-4 memory is the pixel embedding's input: computed once, shared.
        outputs = {i: self.output[str(i)](lats[i]) for i in dict.fromkeys([0] + self.memory_levels)}
        detail = self.detail(images) if self.detail is not None else None
        return [outputs[i] for i in self.memory_levels], self.pixel_proj(outputs[0]), detail
