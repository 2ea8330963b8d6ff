"""Query Generation Module: N_q image-specific language queries from vision and language."""

from __future__ import annotations

import torch
import torch.nn as nn

from crformer.models.layers import LayerNorm, MultiHeadAttention, ignore_removed_state
from crformer.ops import AttentionBackend


class QueryGenerationModule(nn.Module):
    """From the stride-32 multimodal map, N_q spatial attention maps (conditioned on the sentence)
    pool N_q vision vectors; each attends over the words to give a language query, with the vision
    vector as residual.

    ``forward(feat B×D×h×w, words B×L×D, mask B×L, sentence B×D)`` → Q_0 B×N_q×D.

    The spatial maps' 1×1 convolution has no bias: one constant per map, softmax over the map's
    positions cancels it (older checkpoints' ``spatial.bias`` is dropped on load).

    Args:
        dim: D, the width of the map, the words and the queries.  num_queries: N_q.
        num_heads: heads of the word attention.  attn_backend: see :class:`MultiHeadAttention`.
    """

    def __init__(self, *, dim: int = 128, num_queries: int = 16, num_heads: int = 4, attn_backend: AttentionBackend | str = "reference"):
        super().__init__()
        self.context = nn.Linear(dim, dim)
        self.spatial = nn.Conv2d(dim, num_queries, 1, bias=False)
        self.word_attn = MultiHeadAttention(dim, dim, dim, num_heads, attn_backend=attn_backend)
        self.norm = LayerNorm(dim)
        ignore_removed_state(self, "spatial.bias")

    def forward(self, feat: torch.Tensor, words: torch.Tensor, mask: torch.Tensor, sentence: torch.Tensor):
        conditioned = feat * torch.sigmoid(self.context(sentence))[:, :, None, None]
        maps = self.spatial(conditioned).flatten(2).softmax(dim=-1)  # B×N_q×hw
        vision = torch.bmm(maps, feat.flatten(2).transpose(1, 2))  # B×N_q×D
        return self.norm(vision + self.word_attn(vision, words, key_padding_mask=mask))
