"""Cross-attention: the one entry point the model uses, with switchable backends.

``cross_attention(q, k, v, key_padding_mask=None, scale=None, backend=None)``

- q: B×H×M×d, k/v: B×H×N×d (same dtype and device), key_padding_mask: B×N bool (True = keep).
- Returns B×H×M×d in q's dtype. Rows whose keys are all masked give 0 (and zero gradients), never NaN.

``memory_attention(q, memory, pos=None, key_padding_mask=None, scale=None, backend=None)`` is the
same function in the decoder's folded form (docs/DESIGN.md §3): one head, keys = memory + pos, values =
memory. The ``triton`` backend runs a kernel that reads the memory once for both; the others
materialise the keys and call :func:`cross_attention`.

Backends live in one registry, :data:`BACKENDS` (name → :class:`AttentionBackend`): ``reference``
(explicit matmul/softmax, the oracle), ``sdpa`` (torch native), ``triton`` (fused kernels in
``crformer.kernels``), ``xformers`` (optional peer). The config (``model.attn_backend``), the env var
``CRFORMER_ATTN_BACKEND`` and the tests all read it, so a backend registered there is selectable and
tested (tests/kernels/test_backends.py runs every registered backend against the float64 oracle).

The model decides once, in :class:`crformer.models.CRFormer`'s constructor (which
:meth:`~crformer.models.CRFormer.from_config` calls with the device the model will run on):
:func:`resolve_backend` turns ``"auto"`` into a name (the env var if set, else ``triton`` on CUDA /
``reference`` on CPU), :func:`backend_for` checks that it can run there, and every attention module
keeps that registry entry and passes it to these functions, which then call it directly: no
resolution, no import check per call. A direct call with ``backend=None``/``"auto"`` resolves and checks
for its tensors' device; one with a name looks the name up and runs it.
(``reference`` is CPU's default because torch's SDPA picks its flash kernel on CPU once a key mask
is given, and its backward is the slower one at our shapes: benchmarks/NOTES.md, "CPU attention
backend for training".)
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from crformer.errors import UserError
# The input contract lives with the kernels (torch-only module, no triton import): ops -> kernels.
from crformer.kernels.inputs import check_attention_inputs, check_memory_attention_inputs, memory_as_cross_attention

ENV_VAR = "CRFORMER_ATTN_BACKEND"


@dataclass(frozen=True)
class AttentionBackend:
    """One implementation of :func:`cross_attention`, as registered in :data:`BACKENDS`.

    ``cross_attention(q, k, v, key_padding_mask, scale)`` keeps the contract of
    :func:`cross_attention`; ``memory_attention(q, memory, pos, key_padding_mask, scale)`` is a
    fused form of :func:`memory_attention`, or None (keys materialised, then ``cross_attention``).
    ``devices``: the device types it runs on natively; ``interpreted_on_cpu``: it also runs on CPU
    tensors under ``TRITON_INTERPRET=1`` (slow: for tests). ``requires``: a module it imports, with
    ``hint`` saying how to install it.
    """

    name: str
    cross_attention: Callable
    memory_attention: Optional[Callable] = None
    devices: tuple = ("cpu", "cuda")
    interpreted_on_cpu: bool = False
    requires: Optional[str] = None
    hint: str = ""

    def unavailable(self, device: Union[torch.device, str]) -> Optional[str]:
        """Why this backend cannot run on tensors on ``device`` in this process, or None if it can.
        (The device is checked first: on CPU without the interpreter, triton is not imported.)"""
        kind = torch.device(device).type
        interpreted = self.interpreted_on_cpu and kind == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
        if kind not in self.devices and not interpreted:
            also = " (or CPU tensors under TRITON_INTERPRET=1)" if self.interpreted_on_cpu else ""
            return f"runs on {'/'.join(self.devices)} tensors{also}; got tensors on {device}"
        if self.requires is not None:
            try:
                importlib.import_module(self.requires)
            except ImportError as e:
                return f"cannot import {self.requires} ({e}){'; ' + self.hint if self.hint else ''}"
        return None


def reference_memory_attention(q, memory, pos=None, key_padding_mask=None, scale=None):
    """The oracle of :func:`memory_attention`: keys materialised, :func:`reference_cross_attention`."""
    return reference_cross_attention(*memory_as_cross_attention(q, memory, pos), key_padding_mask, scale)[:, 0]


def reference_cross_attention(q, k, v, key_padding_mask=None, scale=None):
    """Plain PyTorch attention in fp32 (or the input's wider dtype): the oracle for every backend."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
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


def _triton(q, k, v, key_padding_mask=None, scale=None):
    from crformer.kernels.cross_attention import triton_cross_attention

    return triton_cross_attention(q, k, v, key_padding_mask, scale)


def _triton_memory(q, memory, pos=None, key_padding_mask=None, scale=None):
    from crformer.kernels.memory_attention import triton_memory_attention

    return triton_memory_attention(q, memory, pos, key_padding_mask, scale)


def _xformers(q, k, v, key_padding_mask=None, scale=None):
    import xformers.ops as xops

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


#: The backend registry: every name the config, the env var, ``backend=`` and the tests accept.
BACKENDS: dict[str, AttentionBackend] = {b.name: b for b in (
    AttentionBackend("reference", reference_cross_attention),
    AttentionBackend("sdpa", sdpa_cross_attention),
    AttentionBackend("triton", _triton, _triton_memory, devices=("cuda",), interpreted_on_cpu=True,
                     requires="crformer.kernels.cross_attention", hint="install triton (CUDA builds of torch ship it)"),
    AttentionBackend("xformers", _xformers, devices=("cuda",), requires="xformers.ops",
                     hint="pip install .[benchmarks]"),
)}


def resolve_backend(name: Optional[str] = None, device: Union[torch.device, str, None] = None) -> str:
    """The registered backend name that ``name`` means for tensors on ``device``: ``name`` itself
    unless it is None/``"auto"``; then ``$CRFORMER_ATTN_BACKEND`` unless unset/``"auto"``; then
    ``triton`` on CUDA, ``reference`` otherwise. ``device`` None: CUDA when available (a model is
    built on CPU and moved). An unknown name is a UserError listing the registry."""
    for candidate, source in ((name, "attention backend"), (os.environ.get(ENV_VAR), ENV_VAR)):
        if candidate not in (None, "", "auto"):
            if candidate not in BACKENDS:
                raise UserError(f"unknown {source} {candidate!r}; choose one of {', '.join(BACKENDS)} or 'auto'")
            return candidate
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "triton" if torch.device(device).type == "cuda" else "reference"


def backend_for(name: Optional[str], device: Union[torch.device, str, None] = None) -> AttentionBackend:
    """The registry entry that ``name`` means on ``device`` (:func:`resolve_backend`), or a UserError
    saying why it cannot run there. Modules keep the entry; the model calls this once, when built."""
    device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    backend = BACKENDS[resolve_backend(name, device)]
    why = backend.unavailable(device)
    if why is not None:
        raise UserError(f"attention backend {backend.name!r} {why}")
    return backend


def _entry(backend: Union[AttentionBackend, str, None], device: torch.device) -> AttentionBackend:
    if isinstance(backend, AttentionBackend):
        return backend
    if backend in (None, "", "auto"):
        return backend_for(backend, device)
    return BACKENDS[resolve_backend(backend)]  # a name: looked up (an unknown one is a UserError)


def cross_attention(q, k, v, key_padding_mask=None, scale=None, backend=None):
    """Multi-head cross-attention ``softmax(q kᵀ·scale + mask) v``.

    Args:
        q: B×H×M×d queries.  k, v: B×H×N×d keys and values.
        key_padding_mask: optional B×N bool, True = key is valid.
        scale: softmax scale, default d^-1/2.
        backend: an entry of :data:`BACKENDS` (what a module keeps) or its name, called as is; or
            ``"auto"``/None: resolved and checked for q's device (:func:`backend_for`).
    Returns:
        B×H×M×d, q's dtype; 0 for rows with no valid key.
    """
    check_attention_inputs(q, k, v, key_padding_mask)
    return _entry(backend, q.device).cross_attention(q, k, v, key_padding_mask, scale)


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
    backend = _entry(backend, q.device)
    if backend.memory_attention is not None:
        return backend.memory_attention(q, memory, pos, key_padding_mask, scale)
    return backend.cross_attention(*memory_as_cross_attention(q, memory, pos), key_padding_mask, scale)[:, 0]
