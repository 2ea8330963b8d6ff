"""CRFormer: text encoder + Swin/VLF + pixel decoder + QGM + Calibration Decoder + mask head + LRM."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from crformer.errors import UserError
from crformer.models.backbone import SwinVLFEncoder
from crformer.models.decoder import CalibrationDecoder
from crformer.models.heads import LanguageReconstructionModule, MaskHead
from crformer.models.layers import LayerNorm, sine_position_embedding
from crformer.models.pixel_decoder import PixelDecoder
from crformer.models.qgm import QueryGenerationModule
from crformer.models.text_encoder import TextEncoder
from crformer.ops import backend_for, masked_pool


#: Values of ``model.lrm_input`` (:class:`CRFormer` ``lrm_input``).
LRM_INPUTS = ("calibrated", "pre_calibration")


class CRFormer(nn.Module):
    """Referring image segmentation model.

    ``forward(images B×3×S×S, input_ids B×L, attention_mask B×L bool)`` → dict:
      - ``pred_masks``: B×(S/s)×(S/s) mask logits from the last decoder layer (s = ``mask_stride``);
      - ``aux_masks``: list of N_d − 1 mask logits B×(S/4)×(S/4) from the earlier layers, before the
        outline refinement of ``mask_stride`` < 4 (training only);
      - ``query_masks``: B×N_q×(S/4)×(S/4), the last layer's per-query mask logits before they are
        merged (training with ``return_query_masks = True`` only, which :meth:`from_config` sets when
        ``loss.query_weight`` > 0: otherwise no step pays for them);
      - ``rec``: B×L×C_l reconstructed language (training with LRM only), ``lang``: B×L×C_l word
        features, ``lang_mask``: B×L.

    Every argument is named as its config key (``model.<name>``; ``image_size`` and ``max_tokens``
    are ``data.*``) and defaults to its value in :data:`crformer.config.DEFAULTS`, so ``CRFormer()`` is
    the embedded default model; :meth:`from_config` builds one from a config dict.

    Args:
        image_size: S.  max_tokens: L (slots of the language reconstruction).
        text_encoder, text_finetune, text_trainable_layers: see :class:`TextEncoder`.
        backbone: keyword arguments of the Swin in :class:`SwinVLFEncoder` (``name``, ``embed_dim``,
            ``depths``, ``num_heads``, ``window_size``, ``patch_size``, ``drop_path_rate``,
            ``weights``); None: its defaults.
        vlf_heads: heads of each VLF.  d_model: D.  num_queries: N_q.  num_decoder_layers: N_d.
        num_heads: heads of the decoder, QGM and LRM attentions.  ffn_dim: decoder FFN width.
        memory_strides, mask_stride, position_frequencies: see :class:`PixelDecoder` (memory strides
            beyond N_d are unused).
        value_positions: the decoder's cross-attention values carry the memory's sine positions too
            (:class:`CrossAttentionLayer`; the paper: keys only).
        calibration: the Calibration layers (False: a plain decoder).  lrm: build the LRM.
        lrm_input: what the LRM reconstructs the words from: ``"calibrated"``, the last decoder
            layer's output (the paper), or ``"pre_calibration"``, that layer's state after its FFN,
            before the calibration re-injects the words (the language-fidelity study's control;
            the same state for a plain decoder).
        attn_backend: a name in :data:`crformer.ops.BACKENDS` or ``"auto"``: decided here, once, for
            ``device`` (:func:`crformer.ops.backend_for`: ``$CRFORMER_ATTN_BACKEND``, else triton on
            CUDA and reference on CPU; a backend that cannot run there is a UserError), and the
            registry entry handed to every attention module, which calls it directly.
        fold_decoder_attention: the decoder cross-attention with its K/V projections folded into
            the queries (same function and parameters; :class:`MultiHeadAttention`).
        grad_checkpointing: see :meth:`set_grad_checkpointing`.
        device: where the model will run, for ``attn_backend``; None: CUDA when available. Not a
            config key, and not where the model is built: that is always the CPU.
    """

    return_query_masks: bool = False

    def __init__(self, *, image_size: int = 64, max_tokens: int = 20, text_encoder: str = "minilm",
                 text_finetune: bool = False, text_trainable_layers: int = -1,
                 backbone: Optional[Mapping[str, Any]] = None, vlf_heads: int = 1, d_model: int = 128,
                 num_queries: int = 16, num_decoder_layers: int = 3, num_heads: int = 4, ffn_dim: int = 512,
                 memory_strides: Sequence[int] = (32, 16, 8), mask_stride: int = 2, position_frequencies: int = 3,
                 value_positions: bool = False, calibration: bool = True,
                 lrm: bool = True, lrm_input: str = "calibrated", attn_backend: str = "auto",
                 fold_decoder_attention: bool = False, grad_checkpointing: bool = False,
                 device: Union[torch.device, str, None] = None):
        super().__init__()
        if lrm_input not in LRM_INPUTS:
            raise UserError(f"model.lrm_input must be one of {', '.join(LRM_INPUTS)}; got {lrm_input!r}")
        D, attn_backend = d_model, backend_for(attn_backend, device)
        self.lrm_input = lrm_input
        self.text_encoder = TextEncoder(text_encoder, text_finetune, text_trainable_layers)
        C_l = self.text_encoder.dim
        self.backbone = SwinVLFEncoder(image_size=image_size, lang_dim=C_l, **(backbone or {}), vlf_heads=vlf_heads,
                                       attn_backend=attn_backend)
        self.pixel_decoder = PixelDecoder(in_dims=self.backbone.dims, dim=D,
                                          memory_strides=list(memory_strides)[:num_decoder_layers],
                                          mask_stride=mask_stride, strides=self.backbone.strides,
                                          position_frequencies=position_frequencies)
        self.lang_proj = nn.Sequential(nn.Linear(C_l, D), LayerNorm(D))
        self.sentence_proj = nn.Sequential(nn.Linear(C_l, D), LayerNorm(D))
        self.qgm = QueryGenerationModule(dim=D, num_queries=num_queries, num_heads=num_heads,
                                         attn_backend=attn_backend)
        self.decoder = CalibrationDecoder(dim=D, num_layers=num_decoder_layers, num_heads=num_heads, ffn_dim=ffn_dim,
                                          num_queries=num_queries, calibration=calibration, attn_backend=attn_backend,
                                          fold_decoder_attention=fold_decoder_attention, value_positions=value_positions)
        self.mask_head = MaskHead(dim=D, detail_dim=PixelDecoder.detail_dim if mask_stride < 4 else 0)
        self.lrm = (LanguageReconstructionModule(dim=D, lang_dim=C_l, max_tokens=max_tokens, num_heads=num_heads,
                                                 attn_backend=attn_backend) if lrm else None)
        self.set_grad_checkpointing(grad_checkpointing)

    @classmethod
    def from_config(cls, cfg: dict, device: Union[torch.device, str, None] = None) -> "CRFormer":
        """Build from a full config dict (see :mod:`crformer.config`): the one place that reads it.
        ``device``: where the model will run (the constructor's ``device``). Built on CPU either way."""
        m, d = cfg["model"], cfg["data"]
        model = cls(**m, image_size=d["image_size"], max_tokens=d["max_tokens"], device=device)
        model.return_query_masks = cfg["loss"]["query_weight"] > 0
        return model

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
        outs, pres = self.decoder(q, mem_seq, mem_pos, words, mask, return_pre_calibration=True)
        result = {"pred_masks": self.mask_head(outs[-1], pixel, sentence, detail), "lang": lang, "lang_mask": mask}
        if self.training:
            # Unrefined (B×(S/4)×(S/4)): deep supervision trains the queries; only the final mask
            # needs the outline refinement, which was a tenth of a CPU training step per call.
            result["aux_masks"] = [self.mask_head(o, pixel, sentence) for o in outs[:-1]]
            if self.return_query_masks:
                result["query_masks"] = self.mask_head.query_masks(outs[-1], pixel)
            lrm_reads = pres if self.lrm_input == "pre_calibration" else outs
            result["rec"] = self.lrm(lrm_reads[-1]) if self.lrm is not None else None
        return result


def build_model(cfg: dict, device: Union[torch.device, str, None] = None) -> CRFormer:
    """Alias of :meth:`CRFormer.from_config`."""
    return CRFormer.from_config(cfg, device)
