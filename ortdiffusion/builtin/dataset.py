"""The built-in model's training scenes and its held-out evaluation prompts.

Evaluation prompts never appear as training captions: every training scene whose caption would
state the same attributes as an evaluation prompt (its `Scene.key`) is left out of training, and
the colour–shape pairs in `HELD_OUT_PAIRS` are never drawn in training at all.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from .scenes import (
    ANCHORS,
    COLORS,
    HELD_OUT_PAIRS,
    POSITION_PHRASES,
    RELATIONS,
    SHAPES,
    SIZE_WORDS,
    SIZES,
    Scene,
    SceneObject,
    caption_for,
    random_scene,
)

EVAL_SEED = 1234


@dataclass
class Dataset:
    scenes: list[Scene]

    def caption(self, index: int, rng: random.Random, short: bool = False) -> str:
        """A fresh wording of scene `index`'s caption (same attributes stated). With `short`, a
        one-object scene is captioned by its colour and shape alone ("a yellow circle"): still true
        of the picture, since a size or place left unsaid means any."""
        scene = self.scenes[index]
        if short and len(scene.objects) == 1:
            scene = replace(scene, objects=(replace(scene.objects[0], size_stated=False, position_stated=False),))
        return caption_for(scene, rng)


def _full_single(color: str, shape: str, size: str, position: str, rng: random.Random) -> Scene:
    ax, ay = ANCHORS[position]
    obj = SceneObject(color, shape, size, ax, ay, position=position, size_stated=True, position_stated=True)
    scene = Scene((obj,))
    return replace(scene, caption=caption_for(scene, rng))


def eval_scenes(per_set: int = 48) -> dict[str, list[Scene]]:
    """Fixed evaluation sets: one object (every attribute stated), two objects with a relation,
    and one object of a held-out colour–shape pair."""
    rng = random.Random(EVAL_SEED)
    singles = [(c, s, z, p) for c in COLORS for s in SHAPES for z in SIZES for p in ANCHORS]
    seen_pairs = [t for t in singles if (t[0], t[1]) not in HELD_OUT_PAIRS]
    held = [t for t in singles if (t[0], t[1]) in HELD_OUT_PAIRS]
    one = [_full_single(*t, rng) for t in rng.sample(seen_pairs, per_set)]
    held_out = [_full_single(*t, rng) for t in rng.sample(held, min(per_set, len(held)))]
    two: list[Scene] = []
    keys = set()
    while len(two) < per_set:
        s = random_scene(rng, two_objects=1.0, state_size=0.0)
        if s.key not in keys:
            keys.add(s.key)
            two.append(s)
    return {"one_object": one, "two_objects": two, "held_out_pairs": held_out}


def build(n: int, seed: int = 0) -> Dataset:
    excluded = {s.key for group in eval_scenes().values() for s in group}
    rng = random.Random(seed)
    scenes: list[Scene] = []
    while len(scenes) < n:
        s = random_scene(rng)
        if s.key not in excluded:
            scenes.append(s)
    return Dataset(scenes)


def vocabulary() -> list[str]:
    words = {"a", "an", *COLORS, *SHAPES}
    for phrases in [*POSITION_PHRASES.values(), *(r[0] for r in RELATIONS.values()), *SIZE_WORDS.values()]:
        for phrase in phrases:
            words.update(phrase.split())
    return sorted(words)


__all__ = ["Dataset", "HELD_OUT_PAIRS", "build", "eval_scenes", "vocabulary"]
