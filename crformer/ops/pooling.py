"""Masked language pooling over the token axis: B×L×C features, B×L bool mask → B×C.

``masked_pool(x, mask, mode="mean")`` runs the compiled op ``torch.ops.crformer.masked_pool`` from
the ``crformer._C`` extension (C++ on CPU, CUDA kernels when compiled in) with an autograd formula
(``torch.ops.crformer.masked_pool_backward``) and a fake implementation, so it works under
``torch.compile(fullgraph=True)``. Without the built extension (or without its CUDA kernels for a
CUDA tensor) it falls back to :func:`reference_masked_pool` and warns once.

Semantics (both paths): ``mean`` averages the valid tokens, ``max`` takes their maximum (NaN
propagates); a row with no valid token gives 0 and a zero gradient. The compiled ``max`` backward
sends each (row, channel) gradient to one arg-max token, the lowest index among ties (the reference,
through ``amax``, splits it evenly among ties instead).
"""

from __future__ import annotations

import warnings

import torch

MODES = ("mean", "max")

try:  # loading the library registers torch.ops.crformer.masked_pool{,_backward}
    from crformer import _C  # type: ignore[attr-defined]
except ImportError as e:  # extension not built in this install
    _C = None
    _IMPORT_ERROR: str | None = str(e)
else:
    _IMPORT_ERROR = None

HAS_EXTENSION = _C is not None
CUDA_COMPILED = bool(_C is not None and _C.cuda_compiled())
_warned = False


def reference_masked_pool(x: torch.Tensor, mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """Plain PyTorch masked mean / max over valid tokens; rows with no valid token give 0."""
    if mode not in MODES:
        raise ValueError(f"masked_pool mode must be 'mean' or 'max', got {mode!r}")
    m = mask.to(x.dtype).unsqueeze(-1)
    if mode == "mean":
        count = m.sum(dim=1).clamp_min(1)
        return (x * m).sum(dim=1) / count
    filled = x.masked_fill(~mask.unsqueeze(-1), float("-inf"))
    out = filled.amax(dim=1)
    return torch.where(mask.any(dim=1, keepdim=True), out, torch.zeros_like(out))


def _check_inputs(x: torch.Tensor, mask: torch.Tensor, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"masked_pool mode must be 'mean' or 'max', got {mode!r}")
    if not isinstance(x, torch.Tensor) or not isinstance(mask, torch.Tensor):
        raise ValueError(f"masked_pool expects tensors, got {type(x).__name__} and {type(mask).__name__}")
    if x.dim() != 3:
        raise ValueError(f"masked_pool expects x of shape B×L×C, got {x.dim()}-D {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"masked_pool expects floating-point x, got {x.dtype}")
    if mask.dtype != torch.bool:
        raise ValueError(f"masked_pool expects a bool mask (True = valid token), got {mask.dtype}")
    if mask.dim() != 2 or mask.shape != x.shape[:2]:
        raise ValueError(f"masked_pool mask must be B×L = {tuple(x.shape[:2])} to match x {tuple(x.shape)}, "
                         f"got {tuple(mask.shape)}")
    if mask.device != x.device:
        raise ValueError(f"masked_pool device mismatch: mask is on {mask.device}, x on {x.device}")


def _use_extension(x: torch.Tensor) -> bool:
    """Whether the compiled op serves ``x``'s device; warns once when it falls back."""
    global _warned
    dev = x.device.type
    if HAS_EXTENSION and (dev in ("cpu", "meta") or (dev == "cuda" and CUDA_COMPILED)):
        return True
    if not _warned:
        _warned = True
        if not HAS_EXTENSION:
            why = f"the crformer._C extension is not built ({_IMPORT_ERROR}); rebuild with " \
                  "`pip install --no-build-isolation -e .`"
        else:
            why = f"crformer._C has no kernels for device {dev!r} (CUDA compiled in: {CUDA_COMPILED})"
        warnings.warn(f"masked_pool: falling back to the PyTorch reference: {why}", RuntimeWarning, stacklevel=3)
    return False


def masked_pool(x: torch.Tensor, mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """Masked pooling of ``x`` (B×L×C) over valid tokens ``mask`` (B×L bool, True = valid) → B×C.

    Args:
        x: B×L×C features, fp32/fp16/bf16/fp64, any strides.
        mask: B×L bool on x's device.
        mode: ``"mean"`` or ``"max"``.
    Returns:
        B×C in x's dtype; 0 for rows with no valid token.
    """
    _check_inputs(x, mask, mode)
    if _use_extension(x):
        return torch.ops.crformer.masked_pool(x, mask, mode)
    return reference_masked_pool(x, mask, mode)


if HAS_EXTENSION:

    @torch.library.register_fake("crformer::masked_pool")
    def _masked_pool_fake(x, mask, mode):
        torch._check(x.dim() == 3 and mask.dim() == 2, lambda: "masked_pool: x must be B×L×C, mask B×L")
        return x.new_empty((x.shape[0], x.shape[2]))

    @torch.library.register_fake("crformer::masked_pool_backward")
    def _masked_pool_backward_fake(grad_out, mask, x, mode):
        return grad_out.new_empty((mask.shape[0], mask.shape[1], grad_out.shape[1]))

    def _setup_context(ctx, inputs, output):
        x, mask, mode = inputs
        ctx.mode = mode
        # mean's gradient needs only the mask (and grad_out's shape); max re-finds its arg-max in x.
        ctx.save_for_backward(mask, x if mode == "max" else None)

    def _backward(ctx, grad_out):
        mask, x = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.crformer.masked_pool_backward(grad_out, mask, x, ctx.mode)
        return grad_x, None, None

    torch.library.register_autograd("crformer::masked_pool", _backward, setup_context=_setup_context)
