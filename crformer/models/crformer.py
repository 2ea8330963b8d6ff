"""CRFormer: text encoder + Swin/VLF + pixel decoder + QGM + Calibration Decoder + mask head + LRM."""

from __future__ import annotations

import torch
import torch.nn as nn

from crformer.models.backbone import SwinVLFEncoder
from crformer.models.decoder import CalibrationDecoder
from crformer.models.heads import LanguageReconstructionModule, MaskHead
from crformer.models.layers import LayerNorm, sine_position_embedding
from crformer.models.pixel_decoder import PixelDecoder
from crformer.models.qgm import QueryGenerationModule
from crformer.models.text_encoder import TextEncoder
from crformer.ops import masked_pool


class CRFormer(nn.Module):
    """Referring image segmentation model.

    ``forward(images B×3×S×S, input_ids B×L, attention_mask B×L bool)`` → dict:
      - ``pred_masks``: B×(S/s)×(S/s) mask logits from the last decoder layer (s = ``model.mask_stride``);
      - ``aux_masks``: list of N_d − 1 mask logits B×(S/4)×(S/4) from the earlier layers, before the
        outline refinement of ``mask_stride`` < 4 (training only);
      - ``rec``: B×L×C_l reconstructed language (training with LRM only), ``lang``: B×L×C_l word
        features, ``lang_mask``: B×L.
    """

    def __init__(self, cfg: dict):
        super().__init__()
        m, d = cfg["model"], cfg["data"]
        D, backend = m["d_model"], m["attn_backend"]
        self.text_encoder = TextEncoder(m["text_encoder"], m["text_finetune"], m["text_trainable_layers"])
        C_l = self.text_encoder.dim
        self.backbone = SwinVLFEncoder(m["backbone"], d["image_size"], C_l, m["vlf_heads"], backend)
        memory_strides = list(m["memory_strides"])[: m["num_decoder_layers"]]
        self.pixel_decoder = PixelDecoder(self.backbone.dims, D, memory_strides, m["mask_stride"], self.backbone.strides)
        self.lang_proj = nn.Sequential(nn.Linear(C_l, D), LayerNorm(D))
        self.sentence_proj = nn.Sequential(nn.Linear(C_l, D), LayerNorm(D))
        self.qgm = QueryGenerationModule(D, m["num_queries"], m["num_heads"], backend)
        self.decoder = CalibrationDecoder(D, m["num_decoder_layers"], m["num_heads"], m["ffn_dim"],
                                          m["num_queries"], m["calibration"], backend,
                                          fold_keys=m["fold_decoder_attention"])
        self.mask_head = MaskHead(D, PixelDecoder.detail_dim if m["mask_stride"] < 4 else 0)
        self.lrm = (LanguageReconstructionModule(D, C_l, d["max_tokens"], m["num_heads"], backend)
                    if m["lrm"] else None)
        self.set_grad_checkpointing(m["grad_checkpointing"])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in backward instead of keeping them: every Swin stage (timm's own
        switch) and every decoder layer. Same gradients; less memory for about a third more compute."""
        self.backbone.swin.set_grad_checkpointing(enable)
        self.decoder.grad_checkpointing = enable

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        mask = attention_mask.bool()
        lang = self.text_encoder(input_ids, mask)
        maps = self.backbone(images, lang.to(images.dtype), mask)
        memories, pixel, detail = self.pixel_decoder(maps, images)
        sentence = self.sentence_proj(masked_pool(lang, mask))
        words = self.lang_proj(lang)
        q = self.qgm(memories[0], words, mask, sentence)
        mem_seq = [m.flatten(2).transpose(1, 2) for m in memories]  # B×(h·w)×D
        mem_pos = [sine_position_embedding(*m.shape[-2:], m.shape[1], m.device, m.dtype) for m in memories]
        outs = self.decoder(q, mem_seq, mem_pos, words, mask)
        result = {"pred_masks": self.mask_head(outs[-1], pixel, sentence, detail), "lang": lang, "lang_mask": mask}
        if self.training:
            # Unrefined (B×(S/4)×(S/4)): deep supervision trains the queries; only the final mask
            # needs the outline refinement, which was a tenth of a CPU training step per call.
            result["aux_masks"] = [self.mask_head(o, pixel, sentence) for o in outs[:-1]]
            result["rec"] = self.lrm(outs[-1]) if self.lrm is not None else None
        return result


def build_model(cfg: dict) -> CRFormer:
    """Build CRFormer from a full config dict (see :mod:`crformer.config`)."""
    return CRFormer(cfg)
