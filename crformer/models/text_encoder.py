"""Text encoder: a local Hugging Face BERT-family model (:mod:`crformer.text_folder`) → word
features B×L×C_l. Its tokenizer is data code: :class:`crformer.data.tokenizer.SentenceTokenizer`."""

from __future__ import annotations

import sys
import warnings

import torch
import torch.nn as nn

from crformer.models.layers import use_fp32_norms
from crformer.text_folder import loading_errors, resolve_text_encoder_path


class TextEncoder(nn.Module):
    """BERT-family encoder: (input_ids B×L, attention_mask B×L bool) → word features B×L×C_l.

    With ``finetune=False`` the encoder is frozen and each unique token sequence is encoded once
    and cached (a frozen encoder gives the same features every
    time, so caching changes nothing but the cost).
    """

    MAX_CACHE = 20000  # sentences; ~0.6 GB of features at C_l = 384, L = 20

    def __init__(self, name: str, finetune: bool = False, trainable_layers: int = -1, cache: bool = True):
        super().__init__()
        from transformers import AutoModel

        path = resolve_text_encoder_path(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # fp32 master weights whatever the file stores (a half-precision export would otherwise
            # load as half under transformers' dtype="auto"); bf16 comes from autocast.
            with loading_errors(path, "weights"):
                self.bert = AutoModel.from_pretrained(str(path), local_files_only=True,
                                                      add_pooling_layer=False).float()
        use_fp32_norms(self.bert)  # fine-tuned under CPU autocast, its norms need fp32 too
        self.name = name
        self.dim = self.bert.config.hidden_size
        self.finetune = finetune
        self.use_cache = cache and not finetune
        self._cache: dict[tuple, torch.Tensor] = {}
        self._builds_masks_in_masking_utils = hasattr(sys.modules[type(self.bert).__module__],
                                                      "create_bidirectional_mask")
        for p in self.bert.parameters():
            p.requires_grad = finetune
        if finetune and trainable_layers >= 0:
            layers = self.bert.encoder.layer
            for p in self.bert.embeddings.parameters():
                p.requires_grad = trainable_layers >= len(layers)
            for i, layer in enumerate(layers):
                for p in layer.parameters():
                    p.requires_grad = i >= len(layers) - trainable_layers

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.finetune:
            self.bert.eval()  # frozen: no dropout, deterministic features
        return self

    @property
    def prepared_mask(self) -> bool:
        """Whether BERT gets a prepared B×1×1×L bool mask instead of the 2-D padding mask. Why:
        transformers' 2-D path asks "is any token padded?" (``mask.all()``) in every forward, a
        device→host wait on GPU. Models that build masks with ``masking_utils.create_bidirectional_mask``
        pass a 4-D mask through as-is, and only SDPA reads a bool one as True = attend (eager and flex
        would add it to the scores), so this is decided per call, from the current implementation."""
        c = self.bert.config
        return (self._builds_masks_in_masking_utils and getattr(c, "_attn_implementation", None) == "sdpa"
                and not getattr(c, "is_decoder", False))

    def _encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask[:, None, None, :] if self.prepared_mask else attention_mask.long()
        return self.bert(input_ids=input_ids, attention_mask=mask).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids B×L long, on any device; attention_mask B×L bool, on the model's device →
        word features B×L×C_l there. The frozen encoder's cache is keyed by the ids as Python
        tuples: the trainer keeps the ids on the host, so reading them costs no device→host wait."""
        device = self.bert.embeddings.word_embeddings.weight.device
        attention_mask = attention_mask.to(device, non_blocking=True)
        if not self.use_cache:
            with torch.set_grad_enabled(self.finetune and torch.is_grad_enabled()):
                return self._encode(input_ids.to(device, non_blocking=True), attention_mask)
        # Padded ids determine the mask, so the id tuple alone is the cache key.
        keys = [tuple(row) for row in input_ids.tolist()]
        first: dict[tuple, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        todo = [i for k, i in first.items() if k not in self._cache]
        if todo:
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                feats = self._encode(input_ids[todo].to(device), attention_mask[todo]).float()
            if len(self._cache) + len(todo) > self.MAX_CACHE:
                self._cache.clear()  # bounded memory on large datasets; the cache is only a speed-up
            for i, f in zip(todo, feats):
                self._cache[keys[i]] = f
        return torch.stack([self._cache[k] for k in keys])
