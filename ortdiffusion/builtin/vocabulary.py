"""The built-in model's vocabulary, derived from the scene generator it was trained on, written
beside its bundle as `vocabulary.json` (read by `ortdiffusion.runtime.vocabulary`).

    python -m ortdiffusion.builtin.vocabulary     # rewrite ortdiffusion/builtin/bundle/vocabulary.json

A test checks the shipped file is what this gives, so it cannot drift from the generator.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from . import scenes

#: Captions sampled to collect the words: every template, colour, shape and phrase appears well
#: before this many (the generator draws each uniformly).
SAMPLES = 20_000


def vocabulary() -> dict:
    rng = random.Random(0)
    words: set[str] = set()
    for _ in range(SAMPLES):
        caption = scenes.random_scene(rng, allow_held_out=True).caption or ""
        words.update(re.findall(r"[a-z]+", caption.lower()))
    colors, shapes = ", ".join(scenes.COLORS), ", ".join(scenes.SHAPES)
    return {
        "words": sorted(words),
        "sizes": [[scenes.SIZE, scenes.SIZE]],
        "max_objects": 2,
        "hint": (f"It knows one or two objects, each 'a'/'an' + an optional size + a colour ({colors}) + a shape "
                 f"({shapes}): e.g. 'a small red circle on the left', 'a blue square above a yellow star'."),
    }


def write(path: Path | None = None) -> Path:
    path = path or Path(__file__).parent / "bundle" / "vocabulary.json"
    path.write_text(json.dumps(vocabulary(), indent=1) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    print(write())
