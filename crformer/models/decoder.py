"""Calibration Decoder: Mask2Former-style layers that re-inject the original language after
every layer (docs/DESIGN.md §2). Each sublayer is a small post-norm residual class."""

from __future__ import annotations


import torch
import torch.nn as nn
import torch.utils.checkpoint

from crformer.models.layers import FFN, LayerNorm, MultiHeadAttention, ignore_removed_state
from crformer.ops import AttentionBackend


class CrossAttentionLayer(nn.Module):
    """Queries B×M×D attend to a memory B×N×D (keys get ``key_pos``, queries ``query_pos``) →
    B×M×D. ``fold_decoder_attention``: projections folded into the queries (:class:`MultiHeadAttention`).
    ``value_positions``: the values get ``key_pos`` too, so what a query reads carries where it looked."""

    def __init__(self, dim: int, num_heads: int, attn_backend: AttentionBackend | str = "reference",
                 fold_decoder_attention: bool = False, value_positions: bool = False):
        super().__init__()
        self.attn = MultiHeadAttention(dim, dim, dim, num_heads, attn_backend=attn_backend,
                                       fold_decoder_attention=fold_decoder_attention)
        self.norm = LayerNorm(dim)
        self.value_positions = value_positions

    def forward(self, q, memory, query_pos=None, key_pos=None, key_padding_mask=None):
        query = q if query_pos is None else q + query_pos
        if self.value_positions and key_pos is not None:
            # Keys and values then share one input, memory + positions (MultiHeadAttention's values
            # default to its keys): the same call on every backend, folded or not.
            memory, key_pos = memory + key_pos, None
        return self.norm(q + self.attn(query, memory, key_padding_mask=key_padding_mask, key_pos=key_pos))


class SelfAttentionLayer(nn.Module):
    """Self-attention among the queries, B×M×D → B×M×D."""

    def __init__(self, dim: int, num_heads: int, attn_backend: AttentionBackend | str = "reference"):
        super().__init__()
        self.attn = MultiHeadAttention(dim, dim, dim, num_heads, attn_backend=attn_backend)
        self.norm = LayerNorm(dim)

    def forward(self, q, query_pos=None):
        qk = q if query_pos is None else q + query_pos
        return self.norm(q + self.attn(qk, qk, q))


class FFNLayer(nn.Module):
    """Post-norm residual FFN, B×M×D → B×M×D."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.ffn = FFN(dim, hidden)
        self.norm = LayerNorm(dim)

    def forward(self, q):
        return self.norm(q + self.ffn(q))


class CalibrationLayer(nn.Module):
    """Re-injects the ORIGINAL language: the layer output attends over the word features
    (B×L×D, key padding mask B×L) and is fused back by residual + norm: B×M×D → B×M×D."""

    def __init__(self, dim: int, num_heads: int, attn_backend: AttentionBackend | str = "reference"):
        super().__init__()
        self.attn = MultiHeadAttention(dim, dim, dim, num_heads, attn_backend=attn_backend)
        self.ffn = FFNLayer(dim, 2 * dim)
        self.norm = LayerNorm(dim)

    def forward(self, q, words, mask):
        return self.ffn(self.norm(q + self.attn(q, words, key_padding_mask=mask)))


class CalibrationDecoderLayer(nn.Module):
    """cross-attention (queries → pixels) → self-attention → FFN → calibration (optional).

    ``forward(q B×M×D, memory B×N×D, memory_pos N×D, words B×L×D, mask B×L, query_pos M×D)`` → B×M×D;
    with ``return_pre_calibration=True`` → ``(output, pre)``, ``pre`` the FFN's output before the
    calibration (the output itself without calibration). The two states are also the outputs of the
    submodules ``ffn`` and ``calibration``, which forward hooks can read.
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, calibration: bool = True, attn_backend: AttentionBackend | str = "reference",
                 fold_decoder_attention: bool = False, value_positions: bool = False):
        super().__init__()
        self.cross = CrossAttentionLayer(dim, num_heads, attn_backend=attn_backend,
                                         fold_decoder_attention=fold_decoder_attention, value_positions=value_positions)
        self.self_attn = SelfAttentionLayer(dim, num_heads, attn_backend=attn_backend)
        self.ffn = FFNLayer(dim, ffn_dim)
        self.calibration = CalibrationLayer(dim, num_heads, attn_backend=attn_backend) if calibration else None

    def forward(self, q, memory, memory_pos, words, mask, query_pos=None, return_pre_calibration: bool = False):
        q = self.cross(q, memory, query_pos=query_pos, key_pos=memory_pos)
        q = self.self_attn(q, query_pos=query_pos)
        pre = self.ffn(q)
        out = pre if self.calibration is None else self.calibration(pre, words, mask)
        return (out, pre) if return_pre_calibration else out


class CalibrationDecoder(nn.Module):
    """N_d layers cycling over the memories coarse → fine.

    ``forward(q0 B×N_q×D, memories [B×N_i×D], memory_pos [N_i×D], words B×L×D, mask B×L)``
    → list of the N_d layer outputs, each B×N_q×D; with ``return_pre_calibration=True`` →
    ``(outputs, pre)``, ``pre`` the N_d states before each layer's calibration (the outputs
    themselves for a plain decoder).

    No level embedding: the one this decoder had was added to the key positions, where it shifted
    every score of a query by the same amount; softmax cancels that, so it never learned. Each layer
    reads one fixed level with its own weights, so it knows the level anyway. Older checkpoints'
    ``level_embed`` entry is dropped on load.

    ``grad_checkpointing = True`` keeps only each layer's input in training and recomputes the
    layer in backward (same gradients, less activation memory).

    Args:
        dim: D, the query and memory width.  num_layers: N_d.  num_heads: attention heads.
        ffn_dim: hidden width of each layer's FFN.  num_queries: N_q (the learned query positions).
        calibration: re-inject the language after every layer (False: a plain decoder, ablation).
        attn_backend: see :class:`MultiHeadAttention` (decided by the model).
        fold_decoder_attention: fold the cross-attention's K/V projections into the queries (same
            function, one :func:`crformer.ops.memory_attention` call per layer).
        value_positions: the cross-attention's values get the memory's positions too (keys always do).
    """

    grad_checkpointing: bool = False

    def __init__(self, *, dim: int = 128, num_layers: int = 3, num_heads: int = 4, ffn_dim: int = 512,
                 num_queries: int = 16, calibration: bool = True, attn_backend: AttentionBackend | str = "reference",
                 fold_decoder_attention: bool = False, value_positions: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(
            CalibrationDecoderLayer(dim, num_heads, ffn_dim, calibration=calibration, attn_backend=attn_backend,
                                    fold_decoder_attention=fold_decoder_attention, value_positions=value_positions)
            for _ in range(num_layers))
        self.query_pos = nn.Parameter(torch.zeros(num_queries, dim))
        nn.init.normal_(self.query_pos, std=0.02)
        ignore_removed_state(self, "level_embed")

    def forward(self, q, memories: list, memory_pos: list, words, mask, return_pre_calibration: bool = False):
        outs, pres = [], []
        for j, layer in enumerate(self.layers):
            lvl = j % len(memories)
            args = (q, memories[lvl], memory_pos[lvl], words, mask, self.query_pos, True)
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                q, pre = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                q, pre = layer(*args)
            outs.append(q)
            pres.append(pre)
        return (outs, pres) if return_pre_calibration else outs
