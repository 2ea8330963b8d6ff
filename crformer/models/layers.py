"""Small building blocks shared by the fusion, query and decoder modules."""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from crformer.errors import UserError
from crformer.ops import BACKENDS, AttentionBackend, cross_attention, memory_attention


def _fp32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` in at least fp32: bf16/fp16 → fp32, fp32 and fp64 unchanged (a float64 model stays float64).
    (A Python dtype test, not ``torch.promote_types``: that is a dispatcher call, ~230 per training step.)"""
    return t if t is None or t.dtype in (torch.float32, torch.float64) else t.float()


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` that normalises in fp32 and returns fp32 (fp64 in a float64 model), on every
    device: B×…×C → B×…×C.

    CUDA autocast already runs layer_norm in fp32; CPU autocast runs it in bf16, and then the
    weight and bias gradients (sums over every token of the batch) come out 20–70 % off their fp32
    values in the default model, and differently with 1 and 2 threads (``benchmarks/NOTES.md``,
    "bf16 norms on CPU"). Same parameters as ``nn.LayerNorm``, so checkpoints load either way.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(_fp32(x), self.normalized_shape, _fp32(self.weight), _fp32(self.bias), self.eps)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` computed and returned in fp32 (fp64 in a float64 model), B×C×H×W, for the
    reason of :class:`LayerNorm`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(_fp32(x), self.num_groups, _fp32(self.weight), _fp32(self.bias), self.eps)


def use_fp32_norms(module: nn.Module) -> nn.Module:
    """Make every plain ``nn.LayerNorm`` / ``nn.GroupNorm`` inside a third-party ``module`` (the
    Hugging Face text encoder) compute in fp32, in place: the class changes, the parameters stay."""
    for m in module.modules():
        if type(m) is nn.LayerNorm:
            m.__class__ = LayerNorm
        elif type(m) is nn.GroupNorm:
            m.__class__ = GroupNorm
    return module


def ignore_removed_state(module: nn.Module, *names: str) -> None:
    """Make ``module.load_state_dict`` drop the entries ``names`` (relative to ``module``) that older
    checkpoints carry for parameters since removed because softmax cancelled them (their gradient
    was 0, so they held their initial values and acted on no output: dropping them changes nothing).
    Without this, loading such a checkpoint would report them as unexpected keys. (A partial of a
    module-level function, not a closure: the model stays picklable.)"""
    module.register_load_state_dict_pre_hook(functools.partial(_drop_state, names))


def _drop_state(names: tuple, _module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    for name in names:
        state_dict.pop(prefix + name, None)


def registered_backend(attn_backend: AttentionBackend | str) -> AttentionBackend:
    """The registry entry a module keeps: ``attn_backend`` itself, or the entry of that name. ``"auto"``
    is not accepted here: it depends on the device, which the model decides (``CRFormer(device=…)``)."""
    if isinstance(attn_backend, AttentionBackend):
        return attn_backend
    if attn_backend not in BACKENDS:
        raise UserError(f"unknown attention backend {attn_backend!r} for a module; choose one of {', '.join(BACKENDS)} "
                        "('auto' is decided by CRFormer, or crformer.ops.backend_for)")
    return BACKENDS[attn_backend]


class MultiHeadAttention(nn.Module):
    """Multi-head attention whose core is :func:`crformer.ops.cross_attention`.

    ``forward(query B×M×d_q, key B×N×d_kv, value=None, key_padding_mask=None, key_pos=None)`` →
    B×M×d_out: keys get ``key_pos`` (N×d_kv or B×N×d_kv, keys only); values default to the keys
    without ``key_pos``; ``key_padding_mask`` is B×N bool with True = valid key. Every attention
    site of the model goes through this class, so the backend choice reaches all of them.

    ``attn_backend``: an entry of :data:`crformer.ops.BACKENDS` or its name, already decided — by
    :class:`~crformer.models.CRFormer` for a model (``"auto"`` is resolved there, once, for the device
    the model runs on; :func:`crformer.ops.backend_for` does the same for a module built alone). The
    module keeps the entry (``self.backend``; its name is ``self.attn_backend``) and calls it directly.

    The key projection has no bias: it would add a per-query constant to every score, which softmax
    cancels, so it could never learn (its gradient is 0). Checkpoints from before still load: their
    ``k_proj.bias`` entries are dropped (:func:`ignore_removed_state`).

    ``fold_decoder_attention=True`` (set by the model key of that name for the decoder's
    cross-attention) computes the same function with the key and value projections folded into
    the queries (docs/DESIGN.md §3), for few queries over a long memory: head h's scores are
    (W_qh q + b_qh)·(W_kh k) = [W_khᵀ(W_qh q + b_qh)]·k, and its output is W_vh (Σ a·v) + b_vh because
    attention rows sum to 1 (0 for a fully masked row). So all heads become one d_kv-wide
    :func:`crformer.ops.memory_attention` over the raw memory (keys = memory + key_pos, values =
    memory; a separate ``value`` is not supported), with the H·M folded queries stacked on the query
    axis: the memory is read once, never projected. Same parameters, so a checkpoint loads either way.
    """

    def __init__(self, d_q: int, d_kv: int, d_attn: int, num_heads: int, d_out: Optional[int] = None,
                 attn_backend: AttentionBackend | str = "reference", fold_decoder_attention: bool = False):
        super().__init__()
        if d_attn % num_heads:
            raise ValueError(f"attention width {d_attn} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.backend = registered_backend(attn_backend)
        self.fold_decoder_attention = fold_decoder_attention
        self.q_proj = nn.Linear(d_q, d_attn)
        self.k_proj = nn.Linear(d_kv, d_attn, bias=False)
        self.v_proj = nn.Linear(d_kv, d_attn)
        self.out_proj = nn.Linear(d_attn, d_out or d_q)
        ignore_removed_state(self, "k_proj.bias")

    @property
    def attn_backend(self) -> str:
        return self.backend.name

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        return x.view(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None, key_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.fold_decoder_attention:
            if value is not None:
                raise ValueError("folded attention (fold_decoder_attention) takes its values from `key` (the memory); "
                                 "got a separate value")
            return self.out_proj(self._folded_heads(query, key, key_pos, key_padding_mask))
        value = key if value is None else value
        key = key if key_pos is None else key + key_pos
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        out = cross_attention(q, k, v, key_padding_mask, backend=self.backend)
        B, H, M, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(B, M, H * d))

    def _folded_heads(self, query, memory, pos, key_padding_mask) -> torch.Tensor:
        """The concatenated head outputs B×M×d_attn, computed folded (see class doc)."""
        B, M, _ = query.shape
        H, d_kv = self.num_heads, memory.shape[-1]
        dh = self.q_proj.out_features // H
        q = self.q_proj(query).view(B, M, H, dh)
        w_k = self.k_proj.weight.view(H, dh, d_kv).to(q.dtype)
        folded = torch.einsum("bmhd,hdc->bmhc", q, w_k).reshape(B, M * H, d_kv)
        # Under autocast the projections would have cast the memory to q's dtype; the op needs one dtype.
        memory, pos = memory.to(q.dtype), None if pos is None else pos.to(q.dtype)
        ctx = memory_attention(folded, memory, pos, key_padding_mask, scale=dh ** -0.5,
                               backend=self.backend).view(B, M, H, d_kv)
        w_v = self.v_proj.weight.view(H, dh, d_kv).to(ctx.dtype)
        out = torch.einsum("bmhc,hdc->bmhd", ctx, w_v)
        bias = self.v_proj.bias.view(H, dh).to(out.dtype)
        if key_padding_mask is not None:  # a fully masked row has no Σa = 1: its output stays 0
            bias = bias * key_padding_mask.any(dim=1).to(out.dtype)[:, None, None, None]
        return (out + bias).reshape(B, M, H * dh)


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
