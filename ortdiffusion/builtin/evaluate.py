"""Reading a picture back into objects by classical image analysis, and scoring it against a scene.

1. background: the median colour of the border; foreground: pixels far from it
2. objects: 4-connected components of the foreground, largest first (specks dropped)
3. per object: colour = nearest named colour to its core pixels; shape from fill ratio (area over
   bounding box) and solidity (area over convex hull); size from its extent; position from its centroid

numpy + pillow only, so it runs next to the runtime without torch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .scenes import ANCHORS, COLORS, RELATIONS, SIZES, Scene

FOREGROUND_DISTANCE = 60.0
MIN_AREA = 12
_SIZE_THRESHOLD = (SIZES["small"] + SIZES["large"]) / 2


@dataclass(frozen=True)
class ReadObject:
    color: str
    shape: str
    size: str
    x: float
    y: float
    area: int
    mean_rgb: tuple[float, float, float] = (0.0, 0.0, 0.0)  # of its core pixels (see `colour`)

    @property
    def position(self) -> str:
        return min(ANCHORS, key=lambda k: (ANCHORS[k][0] - self.x) ** 2 + (ANCHORS[k][1] - self.y) ** 2)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of (row, col), largest first."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    found = []
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        seen[r0, c0] = True
        queue, pixels = deque([(r0, c0)]), []
        while queue:
            r, c = queue.popleft()
            pixels.append((r, c))
            for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                rr, cc = r + dr, c + dc
                if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    queue.append((rr, cc))
        found.append(np.array(pixels))
    return sorted(found, key=len, reverse=True)


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of pixel squares (Andrew's monotone chain over their corners)."""
    corners = np.concatenate([points + d for d in ((0, 0), (0, 1), (1, 0), (1, 1))]).astype(float)
    pts = sorted(set(map(tuple, corners)))
    if len(pts) < 3:
        return float(len(points))

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = np.array(lower[:-1] + upper[:-1])
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _classify_shape(pixels: np.ndarray) -> str:
    rows, cols = pixels[:, 0], pixels[:, 1]
    r0, r1, c0, c1 = rows.min(), rows.max(), cols.min(), cols.max()
    fill = len(pixels) / ((r1 - r0 + 1) * (c1 - c0 + 1))
    solidity = len(pixels) / _hull_area(pixels)
    if solidity < 0.72:  # the only concave shape: its arms leave the hull half empty
        return "star"
    # a square fills its bounding box's corners (one pixel in, past the anti-aliasing); a circle does not
    filled = {(int(r), int(c)) for r, c in pixels}
    corners = sum((r, c) in filled for r in (r0 + 1, r1 - 1) for c in (c0 + 1, c1 - 1))
    if corners >= 3:
        return "square"
    return "circle" if fill > 0.66 else "triangle"


def read_objects(image: Image.Image | np.ndarray, max_objects: int = 2) -> list[ReadObject]:
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float64)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(rgb - background, axis=-1)
    objects = []
    for pixels in _components(distance > FOREGROUND_DISTANCE)[:max_objects]:
        if len(pixels) < MIN_AREA:
            break
        values = rgb[pixels[:, 0], pixels[:, 1]]
        dist = distance[pixels[:, 0], pixels[:, 1]]
        core = values[dist >= np.percentile(dist, 50)]  # away from anti-aliased edges
        mean = core.mean(axis=0)
        color = min(COLORS, key=lambda k: float(np.sum((np.array(COLORS[k]) - mean) ** 2)))
        rows, cols = pixels[:, 0], pixels[:, 1]
        extent = max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) / 2
        objects.append(ReadObject(
            color=color, shape=_classify_shape(pixels), size="large" if extent > _SIZE_THRESHOLD else "small",
            x=float(cols.mean()) + 0.5, y=float(rows.mean()) + 0.5, area=len(pixels),
            mean_rgb=tuple(float(v) for v in mean),
        ))
    return objects


def draw_scenes(pipe, scenes: list[Scene], seeds: int, batch: int = 32, **kwargs):
    """Yield (image, scene, objects read back) for every scene under `seeds` seeds, drawn in batches
    through a pipeline (`Pipeline` or anything called the same way; `kwargs` go to each call).

    The seed of the j-th (scene, k) job is 1000 * k + j, so a figure is reproducible from the scene
    list, the seed count and the call's settings alone. Objects are read once here (up to one more
    than the scene has), for `score` and `colour.read_colour` to share.
    """
    jobs = [(s, k) for s in scenes for k in range(seeds)]
    for start in range(0, len(jobs), batch):
        chunk = jobs[start:start + batch]
        result = pipe([s.caption for s, _ in chunk], seed=[1000 * k + j for j, (_, k) in enumerate(chunk, start)],
                      **kwargs)
        for image, (scene, _) in zip(result.images, chunk):
            yield image, scene, read_objects(image, max_objects=len(scene.objects) + 1)


def score(image: Image.Image | np.ndarray, scene: Scene, found: list[ReadObject] | None = None) -> dict[str, bool]:
    """Which attributes the scene's caption states are right in the image ("all" is every one).
    `found`: the objects already read from it (`draw_scenes` gives them)."""
    if found is None:
        found = read_objects(image, max_objects=len(scene.objects) + 1)
    result: dict[str, bool] = {}
    if scene.relation is None:
        (want,) = scene.objects
        got = found[0] if found else None
        result["count"] = len(found) == 1
        result["color"] = got is not None and got.color == want.color
        result["shape"] = got is not None and got.shape == want.shape
        if want.size_stated:
            result["size"] = got is not None and got.size == want.size
        if want.position_stated:
            result["position"] = got is not None and got.position == want.position
    else:
        a, b = scene.objects
        # match each wanted object to a found one by colour and shape
        ga = next((o for o in found if (o.color, o.shape) == (a.color, a.shape)), None)
        gb = next((o for o in found if o is not ga and (o.color, o.shape) == (b.color, b.shape)), None)
        result["count"] = len(found) == 2
        result["objects"] = ga is not None and gb is not None
        for name, want, got in (("size_a", a, ga), ("size_b", b, gb)):
            if want.size_stated:
                result[name] = got is not None and got.size == want.size
        _, axis, sign = RELATIONS[scene.relation]
        if ga is not None and gb is not None:
            delta = (ga.x - gb.x) if axis == "x" else (ga.y - gb.y)
            result["relation"] = sign * delta > 4
        else:
            result["relation"] = False
    result["all"] = all(result.values())
    return result
