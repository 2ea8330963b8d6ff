"""Mask loss (BCE + Dice, deep supervision) and the language reconstruction loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from crformer.ops import masked_pool


def dice_loss(logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Soft Dice loss of …×H×W logits vs {0,1} targets, one value per H×W mask: averaged (``"mean"``) or
    as they are (``"none"``, shape …)."""
    p = logits.sigmoid().flatten(-2)
    t = target.flatten(-2)
    per_mask = 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)
    return per_mask.mean() if reduction == "mean" else per_mask


def mask_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0) -> torch.Tensor:
    """BCE-with-logits + Dice; logits B×h×w are upsampled to the target's B×H×W first."""
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits[:, None], size=target.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, target) + dice_weight * dice_loss(logits, target)


def best_query_loss(query_logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0) -> torch.Tensor:
    """BCE + Dice of the best single query: for each sample the :func:`mask_loss` of the one of its N_q
    per-query masks (B×N_q×h×w logits) that fits its B×H×W target best, averaged over the batch. The
    merged mask alone can fit a sentence that names a group by spreading over the group; this term asks
    one query to hold the referred object by itself (an optional training signal: ``loss.query_weight``).

    The choice is made without gradient at the masks' own h×w, against the target area-averaged to h×w
    — N_q masks upsampled to H×W cost more than the rest of the loss (≈ 29 of 30 ms per default step on
    2 cores) — and only the chosen mask is upsampled; the gradient reaches the chosen query alone
    either way, as through a minimum. At h×w = H×W this is exactly the minimum over queries."""
    B, Q, h, w = query_logits.shape
    with torch.no_grad():
        logits = query_logits.detach().float()
        t = F.adaptive_avg_pool2d(target[:, None].float(), (h, w)).expand(-1, Q, -1, -1)
        bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none").flatten(2).mean(2)
        best = (bce + dice_weight * dice_loss(logits, t, reduction="none")).argmin(dim=1)
    return mask_loss(query_logits[torch.arange(B, device=best.device), best], target, dice_weight)


def reconstruction_loss(rec: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                        sentence_weight: float = 0.0, num_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Masked (1 − cosine) per valid token, averaged; plus ``sentence_weight`` × (1 − cosine) of the
    masked-mean-pooled sentences. ``target`` (B×L×C_l) is detached: the loss trains the decoder to
    keep the language, not the text encoder to be easy to reconstruct. ``num_tokens`` replaces this
    batch's valid-token count as the divisor: a micro-batch of gradient accumulation passes the
    whole batch's count ÷ micro-batches, so the accumulated loss is the whole batch's average."""
    target = target.detach().float()
    rec = rec.float()
    valid = mask.float()
    per_token = 1 - F.cosine_similarity(rec, target, dim=-1)
    loss = (per_token * valid).sum() / (valid.sum() if num_tokens is None else num_tokens).clamp_min(1)
    if sentence_weight:
        s_rec, s_tgt = masked_pool(rec, mask), masked_pool(target, mask)
        has = mask.any(dim=1).float()
        per_sent = 1 - F.cosine_similarity(s_rec, s_tgt, dim=-1)
        loss = loss + sentence_weight * (per_sent * has).sum() / has.sum().clamp_min(1)
    return loss


def crformer_loss(outputs: dict, target: torch.Tensor, cfg: dict, num_tokens: torch.Tensor | None = None) -> dict:
    """Total loss and its terms. ``target``: B×H×W float {0,1}. ``cfg``: the ``loss`` section.
    ``num_tokens``: see :func:`reconstruction_loss` (every other term is a mean over samples or
    pixels, so equal micro-batches average to the whole batch's value already)."""
    terms = {"mask": mask_loss(outputs["pred_masks"], target, cfg["dice_weight"])}
    aux = outputs.get("aux_masks", [])
    terms["aux"] = sum(mask_loss(a, target, cfg["dice_weight"]) for a in aux) if aux else target.new_zeros(())
    total = terms["mask"] + cfg["aux_weight"] * terms["aux"]
    if cfg["query_weight"]:
        terms["query"] = best_query_loss(outputs["query_masks"], target, cfg["dice_weight"])
        total = total + cfg["query_weight"] * terms["query"]
    if outputs.get("rec") is not None:
        terms["rec"] = reconstruction_loss(outputs["rec"], outputs["lang"], outputs["lang_mask"],
                                           cfg["rec_sentence_weight"], num_tokens)
        total = total + cfg["rec_weight"] * terms["rec"]
    terms["total"] = total
    return terms
