"""Inference and evaluation shared by train, evaluate and predict."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from crformer.data.dataset import Collate, RefDataset, load_sample_image, resize_mask_nearest
from crformer.distributed import all_reduce_sum
from crformer.errors import UserError
from crformer.metrics import RISMetrics


def parse_device(name: str | torch.device | None) -> torch.device:
    """A torch device that exists here, from a name (``cpu``, ``cuda``, ``cuda:1``) or None (cuda when
    available, else cpu); a UserError names what is wrong (the CLIs' ``--device`` and the API's
    ``device=`` arrive here)."""
    if isinstance(name, torch.device):
        return name
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"device {name!r} is not a device name (cpu, cuda, cuda:1...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name}: CUDA is not available on this machine (torch {torch.__version__})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device {name}: only cpu and cuda are supported")
    return device


#: Read once at import, not per step: inside a compiled step the query would break the graph.
CPU_HAS_BF16_KERNELS = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` has bf16 matmul and convolution kernels: CUDA, or a CPU whose oneDNN has them
    (AVX-512 or AMX). An AVX2-only CPU has none: torch's bf16 matmul there is a fallback loop ≈ 100× slower
    than fp32 (0.9 against 89 GFLOP/s on one Zen 3 core, 1024² × 1024²)."""
    return device.type == "cuda" or (device.type == "cpu" and CPU_HAS_BF16_KERNELS)


def uses_bf16(device: torch.device, amp: str, training: bool = False) -> bool:
    """Whether ``amp`` means bf16 autocast on ``device``: ``bf16`` = always, ``none`` = never, ``auto`` = on
    CUDA and, for the training step (``train.amp``, ``training=True``), on a CPU with :func:`native_bf16`
    kernels; inference (``eval.amp``) stays fp32 on every CPU."""
    if amp not in ("auto", "bf16", "none"):
        from crformer.errors import UserError

        raise UserError(f"amp must be auto, bf16 or none; got {amp!r}")
    return amp == "bf16" or (amp == "auto" and (device.type == "cuda" or (training and native_bf16(device))))


def autocast_context(device: torch.device, amp: str, training: bool = False):
    """bf16 autocast where :func:`uses_bf16` says so, else nothing."""
    on = uses_bf16(device, amp, training)
    return torch.autocast(device.type, dtype=torch.bfloat16) if on else contextlib.nullcontext()


def compile_mode(compile: str, cuda_graphs: bool) -> str | None:
    """``torch.compile`` mode for ``train.compile`` × ``train.cuda_graphs`` (None: stay eager).
    CUDA graphs come with inductor's ``reduce-overhead`` (``max-autotune`` includes them)."""
    if cuda_graphs:
        return "max-autotune" if compile == "max-autotune" else "reduce-overhead"
    return {"none": None, "default": "default", "max-autotune": "max-autotune-no-cudagraphs"}[compile]


@torch.no_grad()
def predict_logits(model, images, input_ids, attention_mask, amp: str = "auto") -> torch.Tensor:
    """Mask logits B×(S/s)×(S/s) (s = model.mask_stride) in fp32 for a batch (model in eval mode)."""
    device = images.device
    with autocast_context(device, amp):
        # ids stay where they are: the frozen text cache reads them as keys (no device→host wait on CPU ids)
        return model(images, input_ids, attention_mask.to(device))["pred_masks"].float()


def upsample_mask(logits: torch.Tensor, size: tuple) -> np.ndarray:
    """h×w logits → bool H×W mask (bilinear on logits, then > 0 i.e. probability > 0.5)."""
    up = F.interpolate(logits[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return (up > 0).cpu().numpy()


def _reduce(m: RISMetrics) -> RISMetrics:
    return RISMetrics.from_state_tensor(all_reduce_sum(m.state_tensor()))


def _partners(samples) -> dict:
    """For the language check: each sample → the next sample of the same image about another object."""
    by_image = defaultdict(list)
    for i, s in enumerate(samples):
        by_image[s.image_id].append(i)
    partner = {}
    for idxs in by_image.values():
        for k, i in enumerate(idxs):
            for j in idxs[k + 1:] + idxs[:k]:
                if samples[j].ann_id != samples[i].ann_id:
                    partner[i] = j
                    break
    return partner


class LanguageCheck:
    """The sentence-swap check of one split: each sample that has a partner (another object of the
    same image) is predicted again with the partner's sentence; a model that reads the sentence
    moves its mask to the new target (``new_target_mIoU`` high) and off the old one
    (``old_target_mIoU`` low)."""

    def __init__(self, samples, tokenizer):
        self.samples, self.tokenizer = samples, tokenizer
        self.partner = _partners(samples)
        self.follow, self.leave = RISMetrics(), RISMetrics()

    def update(self, model, refer, images: torch.Tensor, idx: list, gts: list, amp: str) -> None:
        """One batch: ``images`` B×3×S×S of the samples ``idx``, whose ground truths are ``gts``."""
        pairs = [(b, i, self.partner[i]) for b, i in enumerate(idx) if i in self.partner]
        if not pairs:
            return
        ids, am = self.tokenizer([self.samples[j].sentence for _, _, j in pairs])
        swapped = predict_logits(model, images[[b for b, _, _ in pairs]], ids, am, amp)
        for k, (b, i, j) in enumerate(pairs):
            pred = upsample_mask(swapped[k], gts[b].shape)
            self.follow.update(pred, refer.mask(self.samples[j]))
            self.leave.update(pred, gts[b])

    def result(self) -> dict:
        """Summed over ranks: ``{"new_target_mIoU", "old_target_mIoU", "n"}``."""
        f, lv = _reduce(self.follow).compute(), _reduce(self.leave).compute()
        return {"new_target_mIoU": f["mIoU"], "old_target_mIoU": lv["mIoU"], "n": f["n"]}


@torch.no_grad()
def evaluate_split(model, refer, split: str, cfg: dict, tokenizer, device: torch.device,
                   protocol: str = "original", language_check: bool = False, rank: int = 0, world: int = 1,
                   save_vis: int = 0, vis_dir: str | None = None, progress: bool = False) -> dict:
    """Metrics of ``model`` on ``split``; every rank evaluates a strided shard, counts are summed.

    Returns ``{"overall": metrics, "by_kind": {kind: metrics}, "lavt": metrics (protocol lavt),
    "language_check": {...} (when asked)}``; metrics as :meth:`RISMetrics.compute`.
    """
    size = cfg["data"]["image_size"]
    amp = cfg["eval"]["amp"]
    ds = RefDataset(refer, split, size, train=False, preload=cfg["data"]["preload"])
    shard = list(range(rank, len(ds), world))
    loader = DataLoader(Subset(ds, shard), batch_size=cfg["eval"]["batch_size"], shuffle=False,
                        collate_fn=Collate(tokenizer), num_workers=cfg["data"]["num_workers"])
    check = LanguageCheck(ds.samples, tokenizer) if language_check else None
    overall, lavt = RISMetrics(), RISMetrics()
    by_kind = {k: RISMetrics() for k in sorted({s.kind for s in ds.samples if s.kind})}
    was_training = model.training
    model.eval()
    vis_left = save_vis if rank == 0 else 0
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc=f"eval {split}", leave=False)
    for batch in loader:
        images = batch.images.to(device)  # not Batch.to: the metrics read full-size masks, not the S×S target
        logits = predict_logits(model, images, batch.input_ids, batch.attention_mask, amp)
        idx = batch.index.tolist()
        gts = [refer.mask(ds.samples[i]) for i in idx]
        for b, i in enumerate(idx):
            s, gt = ds.samples[i], gts[b]
            pred = upsample_mask(logits[b], gt.shape)
            iou = overall.update(pred, gt)
            if s.kind in by_kind:
                by_kind[s.kind].update(pred, gt)
            if protocol == "lavt":
                # LAVT's test.py: the prediction at S×S, the ground truth resized to S×S by PIL nearest.
                lavt.update(upsample_mask(logits[b], (size, size)), resize_mask_nearest(gt, size))
            if vis_left > 0 and vis_dir:
                from crformer.files import path_part
                from crformer.visualize import save_side_by_side

                Path(vis_dir).mkdir(parents=True, exist_ok=True)
                save_side_by_side(load_sample_image(s), pred, gt, s.sentence,
                                  str(Path(vis_dir) / f"{path_part(split)}_{i:05d}.png"), iou)
                vis_left -= 1
        if check is not None:
            check.update(model, refer, images, idx, gts, amp)
    model.train(was_training)
    out = {"overall": _reduce(overall).compute(), "by_kind": {k: _reduce(m).compute() for k, m in by_kind.items()}}
    if protocol == "lavt":
        out["lavt"] = _reduce(lavt).compute()
    if check is not None:
        out["language_check"] = check.result()
    return out


def report_rows(results: dict) -> dict:
    """Flatten ``{split: evaluate_split(...)}`` into table rows: split, split/kind, split (S×S)."""
    rows = {}
    for split, r in results.items():
        rows[split] = r["overall"]
        for kind, m in r["by_kind"].items():
            if len(r["by_kind"]) > 1:
                rows[f"{split}/{kind}"] = m
        if "lavt" in r:
            rows[f"{split} (S×S)"] = r["lavt"]
    return rows


def language_check_lines(results: dict) -> list:
    lines = []
    for split, r in results.items():
        lc = r.get("language_check")
        if lc:
            lines.append(f"language check {split}: sentence swapped for another object's → IoU with the new "
                         f"target {100 * lc['new_target_mIoU']:.2f}, with the old target {100 * lc['old_target_mIoU']:.2f} "
                         f"(n={lc['n']})")
    return lines
