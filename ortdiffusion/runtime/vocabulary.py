"""What a model was trained on, where a bundle says so: the words of its captions and the image
sizes it saw. A prompt outside them is not refused — the model draws something — but what it draws
is not what was asked (the built-in model reads "two red circles" as shapes it knows and draws three
squares), so the CLI warns and the service can report it (`prompt_warnings`).

The vocabulary is an optional file beside the manifest, `vocabulary.json`, outside the manifest's
hashed file list: a bundle without it (any exported checkpoint) gets no warnings. The built-in
model's is derived from its scene generator (`ortdiffusion/builtin/vocabulary.py`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

VOCABULARY_FILE = "vocabulary.json"
_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class Vocabulary:
    words: frozenset[str]
    #: (width, height) pairs the model was trained at
    sizes: tuple[tuple[int, int], ...]
    #: the most objects one training picture held
    max_objects: int
    #: one sentence on what its prompts look like, for the warning
    hint: str = ""

    def unknown_words(self, prompt: str) -> list[str]:
        """The words of `prompt` never seen in training, in order, each once."""
        return list(dict.fromkeys(w for w in _WORD.findall(prompt.lower()) if w not in self.words))


def load_vocabulary(bundle_dir: Path | str) -> Vocabulary | None:
    """The bundle's vocabulary, or None when it has none (or an unreadable one: it only informs)."""
    path = Path(bundle_dir) / VOCABULARY_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Vocabulary(words=frozenset(data["words"]), sizes=tuple(tuple(s) for s in data["sizes"]),
                          max_objects=int(data["max_objects"]), hint=str(data.get("hint", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prompt_warnings(bundle_dir: Path | str, prompts: Iterable[str], width: int, height: int,
                    vocabulary: Vocabulary | None = None) -> list[str]:
    """One sentence per problem: words a prompt has that the model never saw, a size it was not
    trained at. Empty for a bundle without a vocabulary."""
    vocab = vocabulary or load_vocabulary(bundle_dir)
    if vocab is None:
        return []
    warnings = []
    for prompt in dict.fromkeys(prompts):
        unknown = vocab.unknown_words(prompt)
        if unknown:
            warnings.append(f"the model never saw {', '.join(repr(w) for w in unknown)} in training "
                            f"(prompt {prompt!r}); it will draw something else. {vocab.hint}".strip())
    if vocab.sizes and (width, height) not in vocab.sizes:
        trained = ", ".join(f"{w}x{h}" for w, h in vocab.sizes)
        warnings.append(f"the model was trained at {trained} only; at {width}x{height} it draws shapes it was not "
                        "asked for")
    return warnings
