"""Small building blocks shared by the fusion, query and decoder modules."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from crformer.ops import cross_attention


class MultiHeadAttention(nn.Module):
    """Multi-head attention whose core is :func:`crformer.ops.cross_attention`.

    Queries B×M×d_q attend to keys B×N×d_kv (values default to the keys); output B×M×d_out.
    ``key_padding_mask`` is B×N bool with True = valid key. Every attention site of the model
    goes through this class, so the backend switch reaches all of them.
    """

    def __init__(self, d_q: int, d_kv: int, d_attn: int, num_heads: int, d_out: Optional[int] = None,
                 backend: str = "auto"):
        super().__init__()
        if d_attn % num_heads:
            raise ValueError(f"attention width {d_attn} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.backend = backend
        self.q_proj = nn.Linear(d_q, d_attn)
        self.k_proj = nn.Linear(d_kv, d_attn)
        self.v_proj = nn.Linear(d_kv, d_attn)
        self.out_proj = nn.Linear(d_attn, d_out or d_q)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        return x.view(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        value = key if value is None else value
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        out = cross_attention(q, k, v, key_padding_mask, backend=self.backend)
        B, H, M, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(B, M, H * d))


class FFN(nn.Module):
    """Two-layer MLP block: B×N×D → B×N×D."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def sine_position_embedding(h: int, w: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """DETR-style 2-D sine position embedding, (h·w)×dim, normalised coordinates."""
    if dim % 4:
        raise ValueError(f"position embedding width must be a multiple of 4, got {dim}")
    y = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 * math.pi
    x = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 * math.pi
    n = dim // 4
    freq = 10000 ** (-torch.arange(n, device=device, dtype=torch.float32) / n)
    py = y[:, None] * freq[None]
    px = x[:, None] * freq[None]
    py = torch.cat([py.sin(), py.cos()], dim=1)[:, None, :].expand(h, w, 2 * n)
    px = torch.cat([px.sin(), px.cos()], dim=1)[None, :, :].expand(h, w, 2 * n)
    return torch.cat([py, px], dim=-1).reshape(h * w, dim).to(dtype or torch.float32)
