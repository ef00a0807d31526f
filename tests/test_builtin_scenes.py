"""The built-in model's data: the scene generator, the evaluator, and the held-out split."""

from __future__ import annotations

import random

import numpy as np

from ortdiffusion.builtin import dataset
from ortdiffusion.builtin.evaluate import read_objects, score
from ortdiffusion.builtin.scenes import (
    COLORS,
    HELD_OUT_PAIRS,
    SHAPES,
    random_scene,
    render,
)


def test_evaluator_reads_clean_scenes_at_least_99_percent():
    rng = random.Random(7)
    scenes = [random_scene(rng, state_size=1.0, state_position=1.0, allow_held_out=True) for _ in range(400)]
    right = sum(score(render(s), s)["all"] for s in scenes)
    assert right / len(scenes) >= 0.99


def test_evaluator_finds_what_is_wrong():
    rng = random.Random(3)
    scene = random_scene(rng, two_objects=0.0, state_size=1.0, state_position=1.0)
    blank = np.full((64, 64, 3), 240, np.uint8)
    assert score(blank, scene) == {"count": False, "color": False, "shape": False, "size": False, "position": False, "all": False}
    other = next(s for s in (random_scene(rng, two_objects=0.0) for _ in range(100)) if s.objects[0].color != scene.objects[0].color)
    assert not score(render(other), scene)["color"]


def test_scenes_cover_the_vocabulary_the_issue_asks_for():
    assert len(COLORS) >= 8 and {"circle", "square", "triangle"} <= set(SHAPES) and len(SHAPES) >= 4
    rng = random.Random(0)
    captions = [random_scene(rng).caption for _ in range(3000)]
    for phrase in ("on the left", "on the right", "at the top", "at the bottom", "in the center", "above",
                   "below", "left of", "small", "large"):
        assert any(phrase in c for c in captions), phrase
    assert render(random_scene(rng)).size == (64, 64)
    read = read_objects(render(random_scene(rng, two_objects=1.0)))
    assert len(read) == 2


def test_evaluation_prompts_and_held_out_pairs_never_appear_in_training():
    data = dataset.build(5000, seed=0)
    evals = dataset.eval_scenes()
    eval_keys = {s.key for group in evals.values() for s in group}
    train_keys = {s.key for s in data.scenes}
    assert not eval_keys & train_keys
    train_captions = {data.caption(i, random.Random(i)) for i in range(len(data.scenes))}
    assert not {s.caption for group in evals.values() for s in group} & train_captions
    drawn = {(o.color, o.shape) for s in data.scenes for o in s.objects}
    assert not drawn & set(HELD_OUT_PAIRS)
    assert {(s.objects[0].color, s.objects[0].shape) for s in evals["held_out_pairs"]} <= set(HELD_OUT_PAIRS)
