"""Referring-image-segmentation metrics (docs/DESIGN.md §5).

Per sample (one sentence): ``I = |pred ∧ gt|``, ``U = |pred ∨ gt|``.

* ``oIoU``  = ΣI / ΣU over the split (0 when ΣU = 0) — the headline number;
* ``mIoU``  = mean over samples of I/U, where a sample with U = 0 (empty prediction AND empty
  ground truth) counts as IoU **0**, as docs/DESIGN.md §5 prescribes (some codebases count it as 1; referring
  expressions always name an object, so an empty ground truth means a broken sample);
* ``Prec@X`` = share of samples with I/U ≥ X for X ∈ {0.5, 0.6, 0.7, 0.8, 0.9};
* ``n``     = number of samples.

All metric values are fractions in [0, 1]; :func:`format_table` prints them as percentages.

Distributed use: every rank calls :meth:`RISMetrics.update` on its own samples, then::

    t = m.state_tensor().to(device); dist.all_reduce(t); m.load_state_tensor(t.cpu())

after which :meth:`compute` gives the global numbers.  The per-sample ``ious`` list stays local
(it is not part of the state tensor; :meth:`load_state_tensor` leaves it untouched).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple

import numpy as np
import torch

__all__ = ["RISMetrics", "THRESHOLDS", "METRIC_KEYS", "intersection_union", "format_table"]

THRESHOLDS: Tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
METRIC_KEYS: Tuple[str, ...] = ("oIoU", "mIoU") + tuple(f"Prec@{t}" for t in THRESHOLDS)
_STATE_LEN = 4 + len(THRESHOLDS)


def _check_mask(x: Any, name: str) -> Any:
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bool:
            return x
        if x.is_floating_point() or x.is_complex():
            raise ValueError(f"{name} must be a boolean mask, got float tensor {x.dtype} "
                             f"(threshold the prediction first)")
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise ValueError(f"{name} must be a boolean mask, got integer values outside {{0, 1}}")
        return x != 0
    a = np.asarray(x)
    if a.dtype == np.bool_:
        return a
    if a.dtype.kind in "fc":
        raise ValueError(f"{name} must be a boolean mask, got float array {a.dtype} "
                         f"(threshold the prediction first)")
    if a.dtype.kind not in "iu":
        raise ValueError(f"{name} must be a boolean mask, got dtype {a.dtype}")
    if a.size and (a.min() < 0 or a.max() > 1):
        raise ValueError(f"{name} must be a boolean mask, got integer values outside {{0, 1}}")
    return a != 0


def intersection_union(pred: Any, gt: Any) -> Tuple[int, int]:
    """``(|pred ∧ gt|, |pred ∨ gt|)`` for one sample (bool numpy arrays or torch tensors)."""
    p_shape = tuple(pred.shape) if hasattr(pred, "shape") else np.shape(pred)
    g_shape = tuple(gt.shape) if hasattr(gt, "shape") else np.shape(gt)
    if tuple(p_shape) != tuple(g_shape):
        raise ValueError(f"pred and gt shapes differ: pred {tuple(p_shape)} vs gt {tuple(g_shape)}")
    p, g = _check_mask(pred, "pred"), _check_mask(gt, "gt")
    if isinstance(p, torch.Tensor) or isinstance(g, torch.Tensor):
        if not isinstance(p, torch.Tensor):
            p = torch.from_numpy(np.ascontiguousarray(p))
        if not isinstance(g, torch.Tensor):
            g = torch.from_numpy(np.ascontiguousarray(g))
        if p.device != g.device:
            g = g.to(p.device)
        i = int(torch.count_nonzero(p & g).item())
        u = int(torch.count_nonzero(p | g).item())
        return i, u
    return int(np.count_nonzero(p & g)), int(np.count_nonzero(p | g))


class RISMetrics:
    """Accumulates oIoU / mIoU / Prec@X over samples; see the module docstring."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sum_i = 0  # exact Python ints
        self.sum_u = 0
        self.sum_iou = 0.0
        self.n = 0
        self.hits = [0] * len(THRESHOLDS)
        self.ious: List[float] = []

    def update(self, pred: Any, gt: Any) -> float:
        """Add ONE sample; returns its IoU (0 when the union is empty)."""
        i, u = intersection_union(pred, gt)
        return self.update_counts(i, u)

    def update_counts(self, i: int, u: int) -> float:
        """Add one sample given its intersection and union pixel counts."""
        i, u = int(i), int(u)
        if i < 0 or u < 0 or i > u:
            raise ValueError(f"invalid counts: intersection {i}, union {u}")
        iou = i / u if u > 0 else 0.0
        self.sum_i += i
        self.sum_u += u
        self.sum_iou += iou
        self.n += 1
        for k, t in enumerate(THRESHOLDS):
            if iou >= t:
                self.hits[k] += 1
        self.ious.append(iou)
        return iou

    def __len__(self) -> int:
        return self.n

    def compute(self) -> Dict[str, float]:
        """``{'oIoU', 'mIoU', 'Prec@0.5', ..., 'Prec@0.9'}`` as fractions, plus ``'n'`` (int)."""
        n = self.n
        out: Dict[str, Any] = {
            "oIoU": self.sum_i / self.sum_u if self.sum_u > 0 else 0.0,
            "mIoU": self.sum_iou / n if n > 0 else 0.0,
        }
        for t, h in zip(THRESHOLDS, self.hits):
            out[f"Prec@{t}"] = h / n if n > 0 else 0.0
        out["n"] = n
        return out

    # ---- distributed / merging ---------------------------------------------------------------
    def state_tensor(self) -> torch.Tensor:
        """1-D float64 tensor ``[ΣI, ΣU, Σiou, n, #iou≥0.5, ..., #iou≥0.9]`` (sum-reducible)."""
        return torch.tensor([float(self.sum_i), float(self.sum_u), self.sum_iou, float(self.n)]
                            + [float(h) for h in self.hits], dtype=torch.float64)

    def load_state_tensor(self, t: Any) -> "RISMetrics":
        """Replace the sums with those of a (reduced) state tensor; ``ious`` is left as is."""
        v = torch.as_tensor(t).detach().to("cpu", torch.float64).reshape(-1)
        if v.numel() != _STATE_LEN:
            raise ValueError(f"state tensor must have {_STATE_LEN} elements, got {v.numel()}")
        vals = v.tolist()
        self.sum_i = int(round(vals[0]))
        self.sum_u = int(round(vals[1]))
        self.sum_iou = float(vals[2])
        self.n = int(round(vals[3]))
        self.hits = [int(round(x)) for x in vals[4:]]
        return self

    @classmethod
    def from_state_tensor(cls, t: Any) -> "RISMetrics":
        return cls().load_state_tensor(t)

    def merge(self, other: "RISMetrics") -> "RISMetrics":
        """Add ``other``'s samples to this accumulator (in place; returns self)."""
        self.sum_i += other.sum_i
        self.sum_u += other.sum_u
        self.sum_iou += other.sum_iou
        self.n += other.n
        self.hits = [a + b for a, b in zip(self.hits, other.hits)]
        self.ious.extend(other.ious)
        return self


def format_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """Fixed-width text table, one row per split: oIoU mIoU P@0.5..P@0.9 (percent, 2 decimals) n."""
    heads = ["oIoU", "mIoU"] + [f"P@{t}" for t in THRESHOLDS] + ["n"]
    keys = list(METRIC_KEYS)
    name_w = max([len("split")] + [len(str(k)) for k in rows])
    col_w = 7

    def cell(v: Any) -> str:
        return "-" if v is None else f"{100.0 * float(v):.2f}"

    lines = [f"{'split':<{name_w}}" + "".join(f" {h:>{col_w}}" for h in heads)]
    lines.append("-" * len(lines[0]))
    for name, r in rows.items():
        vals = [cell(r.get(k)) for k in keys]
        n = r.get("n")
        vals.append("-" if n is None else str(int(n)))
        lines.append(f"{str(name):<{name_w}}" + "".join(f" {v:>{col_w}}" for v in vals))
    return "\n".join(lines)
