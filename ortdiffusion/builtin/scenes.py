"""Procedural scenes for the built-in model: one or two flat shapes on a plain background, with
captions that state some of their attributes.

A `Scene` is structured (objects with colour, shape, size, position; an optional relation) and
knows which attributes its caption states, so the evaluator can check exactly those. Rendering is
PIL at 4× then downsampled, so edges are anti-aliased like a photograph's. numpy + pillow only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
BACKGROUND = (240, 240, 236)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 145, 30),
    "yellow": (235, 210, 35),
    "green": (50, 165, 70),
    "cyan": (40, 195, 210),
    "blue": (45, 80, 215),
    "purple": (135, 60, 190),
    "pink": (245, 135, 195),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 7.0, "large": 12.5}  # "radius" in pixels
# Where a lone object sits, by the word its caption uses.
ANCHORS = {"left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48), "center": (32, 32)}
POSITION_PHRASES = {
    "left": ("on the left", "at the left", "on the left side"),
    "right": ("on the right", "at the right", "on the right side"),
    "top": ("at the top", "on the top", "at the top of the image"),
    "bottom": ("at the bottom", "on the bottom", "at the bottom of the image"),
    "center": ("in the center", "in the middle", "at the center"),
}
RELATIONS = {  # relation → (phrases, the axis it separates the two objects along, sign)
    "above": (("above",), "y", -1),
    "below": (("below", "under"), "y", 1),
    "left of": (("to the left of", "left of"), "x", -1),
    "right of": (("to the right of", "right of"), "x", 1),
}
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
#: Colour–shape pairs never drawn in training, to measure generalisation.
HELD_OUT_PAIRS = (("blue", "triangle"), ("yellow", "circle"), ("pink", "square"))


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    size: str
    x: float
    y: float
    position: str | None = None  # the anchor word, for a lone object
    size_stated: bool = False
    position_stated: bool = False


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    relation: str | None = None  # objects[0] <relation> objects[1]
    caption: str = ""

    @property
    def key(self) -> tuple:
        """The attributes the caption states: scenes with equal keys ask for the same picture."""
        objs = tuple(
            (o.color, o.shape, o.size if o.size_stated else None, o.position if o.position_stated else None)
            for o in self.objects
        )
        return (objs, self.relation)


def _phrase(obj: SceneObject, rng: random.Random) -> str:
    words = f"{rng.choice(SIZE_WORDS[obj.size])} {obj.color}" if obj.size_stated else obj.color
    article = "an" if words[0] in "aeiou" else "a"
    return f"{article} {words} {obj.shape}"


def caption_for(scene: Scene, rng: random.Random) -> str:
    if scene.relation is not None:
        a, b = scene.objects
        return f"{_phrase(a, rng)} {rng.choice(RELATIONS[scene.relation][0])} {_phrase(b, rng)}"
    (obj,) = scene.objects
    where = f" {rng.choice(POSITION_PHRASES[obj.position])}" if obj.position_stated else ""
    return _phrase(obj, rng) + where


def _pair(rng: random.Random, allow_held_out: bool) -> tuple[str, str]:
    while True:
        pair = (rng.choice(list(COLORS)), rng.choice(SHAPES))
        if allow_held_out or pair not in HELD_OUT_PAIRS:
            return pair


def random_scene(rng: random.Random, two_objects: float = 0.4, state_size: float = 0.5,
                 state_position: float = 0.85, allow_held_out: bool = False) -> Scene:
    """A random scene and a caption for it (the caption's wording varies, its meaning is the key)."""
    if rng.random() < two_objects:
        relation = rng.choice(list(RELATIONS))
        _, axis, sign = RELATIONS[relation]
        near, far = 18 + rng.uniform(-2, 2), 46 + rng.uniform(-2, 2)
        first, second = (near, far) if sign < 0 else (far, near)
        cross = [32 + rng.uniform(-8, 8), 32 + rng.uniform(-8, 8)]
        objs = []
        for along, across in ((first, cross[0]), (second, cross[1])):
            color, shape = _pair(rng, allow_held_out)
            size = "small" if rng.random() < 0.6 else "large"
            x, y = (along, across) if axis == "x" else (across, along)
            objs.append(SceneObject(color, shape, size, x, y, size_stated=rng.random() < state_size * 0.5))
        if objs[0].color == objs[1].color and objs[0].shape == objs[1].shape:
            return random_scene(rng, two_objects, state_size, state_position, allow_held_out)
        scene = Scene(tuple(objs), relation)
    else:
        color, shape = _pair(rng, allow_held_out)
        size = rng.choice(list(SIZES))
        position = rng.choice(list(ANCHORS))
        ax, ay = ANCHORS[position]
        jitter = 3.0 if size == "large" else 5.0
        obj = SceneObject(color, shape, size, ax + rng.uniform(-jitter, jitter), ay + rng.uniform(-jitter, jitter),
                          position=position, size_stated=rng.random() < state_size,
                          position_stated=rng.random() < state_position)
        scene = Scene((obj,))
    return replace(scene, caption=caption_for(scene, rng))


def shape_polygon(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        h = 0.85 * r
        return [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)]
    if shape == "triangle":
        return [(x, y - r), (x + r, y + 0.8 * r), (x - r, y + 0.8 * r)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.42 * r
            angle = -np.pi / 2 + k * np.pi / 5
            points.append((x + radius * np.cos(angle), y + radius * np.sin(angle) + 0.1 * r))
        return points
    return None  # circle


def render(scene: Scene, scale: int = 4) -> Image.Image:
    canvas = Image.new("RGB", (SIZE * scale, SIZE * scale), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        x, y, r, fill = obj.x * scale, obj.y * scale, SIZES[obj.size] * scale, COLORS[obj.color]
        polygon = shape_polygon(obj.shape, x, y, r)
        if polygon is None:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        else:
            draw.polygon(polygon, fill=fill)
    return canvas.resize((SIZE, SIZE), Image.LANCZOS)
