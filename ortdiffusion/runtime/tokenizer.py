"""Prompts → token ids with the `tokenizers` library, as diffusers' pipelines tokenize them:
padded to the model's fixed length, truncated past it (with a warning saying what was dropped)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .errors import BundleError

logger = logging.getLogger(__name__)


class PromptTokenizer:
    def __init__(self, path: Path | str, max_length: int, pad_token_id: int):
        try:
            self._full = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise BundleError(str(path), f"not a valid tokenizer.json ({e})") from None
        self._full.no_padding()
        self._full.no_truncation()
        self._fixed = Tokenizer.from_str(self._full.to_str())
        # Truncation keeps room for the special tokens the post-processor adds (BOS/EOS).
        self._fixed.enable_truncation(max_length)
        self._fixed.enable_padding(length=max_length, pad_id=pad_token_id, pad_token=self._full.id_to_token(pad_token_id) or "")
        self.max_length = max_length

    def __call__(self, prompts: Sequence[str], warn_truncation: bool = True) -> np.ndarray:
        """int64 ids of shape (len(prompts), max_length)."""
        checked = self._full.encode_batch(list(prompts)) if warn_truncation else []
        for prompt, full in zip(prompts, checked):
            dropped = len(full.ids) - self.max_length
            if dropped > 0:
                logger.warning(
                    "prompt is %d tokens long; the model takes %d, so the last %d tokens were dropped: %.60r",
                    len(full.ids), self.max_length, dropped, prompt,
                )
        encodings = self._fixed.encode_batch(list(prompts))
        return np.array([e.ids for e in encodings], dtype=np.int64)
