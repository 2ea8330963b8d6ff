"""What the attention entry points accept, shared by ``crformer.ops.attention`` and the kernels.

The checks raise ``ValueError`` naming the problem; ``memory_as_cross_attention`` is the one place
where the decoder's folded memory attention is rewritten as a plain one-head cross-attention (keys
materialised as memory + pos), which the oracle, the non-Triton backends and the Triton fallback
for shapes the fused kernel does not cover all compute.

This module needs torch only: ``crformer.ops`` imports it at import time, and importing the ops must
not import triton (tests/kernels/conftest.py has to set TRITON_INTERPRET before triton is imported).
"""

from __future__ import annotations

import torch

__all__ = ["check_attention_inputs", "check_memory_attention_inputs", "memory_as_cross_attention"]


def check_attention_inputs(q, k, v, key_padding_mask, name: str = "cross_attention") -> None:
    """ValueError naming the problem unless q B×H×M×d, k/v B×H×N×d and the B×N bool mask agree in
    shape, dtype and device."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{name} expects 4-D q/k/v (B×H×M×d, B×H×N×d); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, M, d = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != d or v.shape != k.shape:
        raise ValueError(f"{name} shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{name} dtype mismatch: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{name} device mismatch: q {q.device}, k {k.device}, v {v.device}")
    if key_padding_mask is not None:
        if key_padding_mask.shape != (B, k.shape[2]) or key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be bool B×N = {(B, k.shape[2])}; got "
                             f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, q on {q.device}")


def check_memory_attention_inputs(q, memory, pos, key_padding_mask, name: str = "memory_attention") -> None:
    """ValueError naming the problem unless q B×M×D, memory B×N×D, pos (N×D, B×N×D or None) and
    the B×N bool mask agree in shape, dtype and device."""
    if q.dim() != 3 or memory.dim() != 3:
        raise ValueError(f"{name} expects 3-D q (B×M×D) and memory (B×N×D); got {tuple(q.shape)}, "
                         f"{tuple(memory.shape)}")
    if memory.shape[0] != q.shape[0] or memory.shape[2] != q.shape[2]:
        raise ValueError(f"{name} shape mismatch: q {tuple(q.shape)}, memory {tuple(memory.shape)}")
    if pos is not None:
        if pos.shape not in (memory.shape[1:], memory.shape):
            raise ValueError(f"{name}: pos must be N×D or B×N×D = {tuple(memory.shape)}; got {tuple(pos.shape)}")
        if pos.dtype != memory.dtype or pos.device != memory.device:
            raise ValueError(f"{name}: pos is {pos.dtype} on {pos.device}, memory {memory.dtype} on {memory.device}")
    check_attention_inputs(q[:, None], memory[:, None], memory[:, None], key_padding_mask, name)


def memory_as_cross_attention(q, memory, pos):
    """The q, k, v (B×1×M×D, B×1×N×D, B×1×N×D) of a cross-attention that computes the memory
    attention of q over memory with positions pos: the keys materialised as memory + pos, one head."""
    keys = memory if pos is None else memory + pos
    return q[:, None], keys[:, None], memory[:, None]
