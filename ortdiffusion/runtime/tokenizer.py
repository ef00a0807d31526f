"""Prompts → token ids with the `tokenizers` library, as diffusers' pipelines tokenize them:
padded to the model's fixed length, truncated past it (with a warning saying what was dropped)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .errors import BundleError, InvalidRequestError

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

    def chunked(self, prompts: Sequence[str], max_chunks: int, min_chunks: int = 1) -> tuple[np.ndarray, int]:
        """Long prompts as the well-known web UIs encode them: each prompt's tokens in windows of
        max_length − 2, each window wrapped in BOS … EOS and padded like a prompt of its own; every
        prompt gets as many windows as the longest (the rest: empty prompts). (ids of shape
        (len(prompts) × chunks, max_length), chunks), a prompt's windows on consecutive rows. A prompt
        that fits gives exactly `__call__`'s ids; a longer one's first window is `__call__`'s too.
        `min_chunks`: at least this many windows (SDXL's two encoders must give the UNet as many)."""
        bos, eos = self._fixed.encode("").ids[:2]  # the post-processor's BOS and EOS
        pad = self._fixed.padding["pad_id"]
        width = self.max_length - 2
        bodies = [e.ids[1:-1] for e in self._full.encode_batch(list(prompts))]
        chunks = max(min_chunks, *(-(-len(b) // width) for b in bodies))
        if chunks > max_chunks:
            longest = max(len(b) for b in bodies)
            raise InvalidRequestError("prompt", f"is {longest} tokens long; long prompts take at most "
                                                f"{max_chunks} × {width} = {max_chunks * width} tokens")
        rows = []
        for body in bodies:
            for k in range(chunks):
                piece = body[k * width:(k + 1) * width]
                rows.append([bos, *piece, eos] + [pad] * (width - len(piece)))
        return np.array(rows, dtype=np.int64), chunks
