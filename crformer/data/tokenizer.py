"""Sentences → fixed-length token ids, with the text encoder's own tokenizer (data side: the
collate function, the API and the demo tokenise; the model only reads ids)."""

from __future__ import annotations

import warnings

import torch

from crformer.errors import UserError
from crformer.text_folder import loading_errors, resolve_text_encoder_path


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path = resolve_text_encoder_path(name)
    with loading_errors(path, "tokenizer"):
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


class SentenceTokenizer:
    """Tokenises sentences to fixed-length ids.

    Each distinct sentence is tokenised and checked once (one tokeniser pass for the new sentences of
    a call); training sees every sentence once per epoch, so later epochs only look ids up. Warns once
    when a sentence is truncated, and the first time it sees a sentence with no word token (only
    emoji, zero-width characters or punctuation): the model would segment without reading words.
    """

    #: Distinct sentences remembered; past this the memory starts afresh (an API or demo process
    #: sees an unbounded stream of sentences). RefCOCO's training split has ≈ 120,000.
    MAX_CACHED = 1 << 18

    def __init__(self, name: str, max_tokens: int):
        self.tokenizer = load_tokenizer(name)
        self.max_tokens = max_tokens
        self._warned = False
        tok = self.tokenizer
        self._special = set(tok.all_special_ids)
        self._pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        self._rows: dict[str, list[int]] = {}

    def _has_word(self, ids: list[int]) -> bool:
        content = [i for i in ids if i not in self._special]
        return any(any(ch.isalnum() for ch in t.removeprefix("##"))
                   for t in self.tokenizer.convert_ids_to_tokens(content))

    def _row(self, row: list[int], sentence: str) -> list[int]:
        """A new sentence's ids, cut to max_tokens (keeping the final [SEP]), with its warnings."""
        length = self.max_tokens
        if len(row) > length:
            if not self._warned:
                warnings.warn(f"a sentence has {len(row)} tokens; truncated to data.max_tokens={length} "
                              "(warned once)", stacklevel=3)
                self._warned = True
            row = row[:length - 1] + row[-1:]
        if not self._has_word(row):
            warnings.warn(f"the sentence {sentence[:40]!r} has no word tokens (only symbols, emoji or "
                          "punctuation): the model sees no words", stacklevel=3)
        return row

    def __call__(self, sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """→ (input_ids B×L long, attention_mask B×L bool), L = max_tokens; the same ids as the
        tokenizer's own ``padding="max_length", truncation=True`` (the final [SEP] is kept)."""
        for s in sentences:
            if not s or not s.strip():
                raise UserError("empty sentence: a referring expression needs at least one word")
        new = list(dict.fromkeys(s for s in sentences if s not in self._rows))
        if len(self._rows) + len(new) > self.MAX_CACHED:
            self._rows.clear()
            new = list(dict.fromkeys(sentences))
        if new:
            for s, row in zip(new, self.tokenizer(new, add_special_tokens=True)["input_ids"]):
                self._rows[s] = self._row(row, s)
        ids = torch.full((len(sentences), self.max_tokens), self._pad, dtype=torch.long)
        mask = torch.zeros((len(sentences), self.max_tokens), dtype=torch.bool)
        for i, s in enumerate(sentences):
            row = self._rows[s]
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = True
        return ids, mask
