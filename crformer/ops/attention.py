"""Cross-attention: the one entry point the model uses, with switchable backends.

``cross_attention(q, k, v, key_padding_mask=None, scale=None, backend=None)``

- q: B×H×M×d, k/v: B×H×N×d (same dtype and device), key_padding_mask: B×N bool (True = keep).
- Returns B×H×M×d in q's dtype. Rows whose keys are all masked give 0 (and zero gradients), never NaN.

``memory_attention(q, memory, pos=None, key_padding_mask=None, scale=None, backend=None)`` is the
same function in the decoder's folded form (DESIGN §3): one head, keys = memory + pos, values =
memory. The ``triton`` backend runs a kernel that reads the memory once for both; the others
materialise the keys and call :func:`cross_attention`.

Backends: ``reference`` (explicit matmul/softmax, the oracle), ``sdpa`` (torch native), ``triton``
(fused kernels in ``crformer.kernels``), ``xformers`` (optional peer). Resolution order: the ``backend``
argument, then the process default set by :func:`set_default_backend` (the model's
``model.attn_backend``), then the env var ``CRFORMER_ATTN_BACKEND``, then ``triton`` on CUDA /
``reference`` on CPU. (On CPU, torch's SDPA picks its flash kernel once a key mask is given, and its
backward is slow at our shapes: a whole default training step took 0.49 s with ``sdpa`` and 0.42 s
with ``reference``, 2-core CPU, 2026-11-26.)
"""

from __future__ import annotations

import importlib
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from crformer.errors import UserError
# The input contract lives with the kernels (torch-only module, no triton import): ops -> kernels.
from crformer.kernels.inputs import check_attention_inputs, check_memory_attention_inputs, memory_as_cross_attention

BACKENDS = ("reference", "sdpa", "triton", "xformers")
_default_backend: Optional[str] = None


def set_default_backend(name: Optional[str]) -> None:
    """Set the process-wide backend (``None`` or ``"auto"`` restores env/device resolution)."""
    global _default_backend
    if name in (None, "auto"):
        _default_backend = None
        return
    _check_name(name)
    _default_backend = name


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise UserError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)} or 'auto'")


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """Return the backend name that a call with ``backend`` on ``device`` uses."""
    for name in (backend, _default_backend, os.environ.get("CRFORMER_ATTN_BACKEND")):
        if name not in (None, "", "auto"):
            _check_name(name)
            return name
    return "triton" if device.type == "cuda" else "reference"


def reference_memory_attention(q, memory, pos=None, key_padding_mask=None, scale=None):
    """The oracle of :func:`memory_attention`: keys materialised, :func:`reference_cross_attention`."""
    return reference_cross_attention(*memory_as_cross_attention(q, memory, pos), key_padding_mask, scale)[:, 0]


def reference_cross_attention(q, k, v, key_padding_mask=None, scale=None):
    """Plain PyTorch attention in fp32 (or the input's wider dtype): the oracle for every backend."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, None, :]
        s = s.masked_fill(~keep, float("-inf"))
        # A row with no valid key would be softmax(-inf...) = NaN; send it to 0 instead.
        any_keep = keep.any(dim=-1, keepdim=True)
        s = torch.where(any_keep, s, torch.zeros((), dtype=acc, device=s.device))
        p = torch.softmax(s, dim=-1) * any_keep
    else:
        p = torch.softmax(s, dim=-1)
    return torch.matmul(p, v.to(acc)).to(q.dtype)


def sdpa_cross_attention(q, k, v, key_padding_mask=None, scale=None):
    """torch's scaled_dot_product_attention with the padding mask as a boolean attn_mask."""
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    any_keep = key_padding_mask.any(dim=1)
    # SDPA returns NaN for a fully masked row; open those rows and zero their output afterwards.
    mask = key_padding_mask | ~any_keep[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], scale=scale)
    return out * any_keep[:, None, None, None].to(out.dtype)


def _triton_kernel(module: str, fn: str, device: torch.device) -> Callable:
    """``crformer.kernels.<module>.<fn>``, or a UserError saying why backend 'triton' cannot run."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError("attention backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); "
                        f"got tensors on {device}")
    try:
        return getattr(importlib.import_module(f"crformer.kernels.{module}"), fn)
    except ImportError as e:  # kernels not built in this install
        raise UserError(f"attention backend 'triton' is unavailable: {e}") from e


def _triton(q, k, v, key_padding_mask=None, scale=None):
    return _triton_kernel("cross_attention", "triton_cross_attention", q.device)(q, k, v, key_padding_mask, scale)


def _xformers(q, k, v, key_padding_mask=None, scale=None):
    try:
        import xformers.ops as xops
    except ImportError as e:
        raise UserError("attention backend 'xformers' needs the xformers package (pip install .[benchmarks])") from e
    if q.device.type != "cuda":
        raise UserError("attention backend 'xformers' has no CPU path; use 'sdpa' or 'reference'")
    bias = None
    if key_padding_mask is not None:
        B, H, M, _ = q.shape
        N = k.shape[2]
        any_keep = key_padding_mask.any(dim=1)
        mask = key_padding_mask | ~any_keep[:, None]
        # xformers wants the bias last dim aligned to 8: allocate padded, then slice.
        n_pad = (N + 7) // 8 * 8
        full = torch.zeros(B, H, M, n_pad, dtype=q.dtype, device=q.device)
        bias = full[..., :N]
        bias.masked_fill_(~mask[:, None, None, :], float("-inf"))
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_bias=bias, scale=scale).transpose(1, 2)
    if key_padding_mask is not None:
        out = out * any_keep[:, None, None, None].to(out.dtype)
    return out


_IMPLS: dict[str, Callable] = {
    "reference": reference_cross_attention,
    "sdpa": sdpa_cross_attention,
    "triton": _triton,
    "xformers": _xformers,
}


def cross_attention(q, k, v, key_padding_mask=None, scale=None, backend=None):
    """Multi-head cross-attention ``softmax(q kᵀ·scale + mask) v``.

    Args:
        q: B×H×M×d queries.  k, v: B×H×N×d keys and values.
        key_padding_mask: optional B×N bool, True = key is valid.
        scale: softmax scale, default d^-1/2.
        backend: ``reference`` | ``sdpa`` | ``triton`` | ``xformers`` | ``auto``/None.
    Returns:
        B×H×M×d, q's dtype; 0 for rows with no valid key.
    """
    check_attention_inputs(q, k, v, key_padding_mask)
    return _IMPLS[resolve_backend(backend, q.device)](q, k, v, key_padding_mask, scale)


def memory_attention(q, memory, pos=None, key_padding_mask=None, scale=None, backend=None):
    """Single-head attention over a memory whose keys carry a position table:
    ``softmax((memory + pos) qᵀ·scale + mask) memory`` (the decoder's folded cross-attention).

    Args:
        q: B×M×D queries.  memory: B×N×D keys and values.  pos: N×D (shared by the batch) or
            B×N×D, added to the keys only; or None.
        key_padding_mask: optional B×N bool, True = key is valid.
        scale: softmax scale, default D^-1/2.
        backend: as in :func:`cross_attention`.
    Returns:
        B×M×D, q's dtype; 0 for rows with no valid key.
    """
    check_memory_attention_inputs(q, memory, pos, key_padding_mask)
    name = resolve_backend(backend, q.device)
    if name == "triton":
        kernel = _triton_kernel("memory_attention", "triton_memory_attention", q.device)
        return kernel(q, memory, pos, key_padding_mask, scale)
    return cross_attention(*memory_as_cross_attention(q, memory, pos), key_padding_mask, scale, name)[:, 0]
