"""Colour as a person sees it: an object's mean colour against the palette in CIELAB (ΔE2000), and
its hue read through a strict window.

The evaluator's `color` attribute is the *nearest* palette colour, which hides drift: a yellow drawn
yellow-green (hue 72° for the palette's 52°) is still nearest to yellow. This module measures how
far each drawn colour is from the one asked for:

1. the object's core pixels (`evaluate.read_objects`), averaged in linear light would be the
   physically right mean, but people judge flat colours by their sRGB appearance and the palette is
   given in sRGB: the mean is taken in sRGB, then converted to CIELAB (D65)
2. ΔE2000 (CIE 2000 colour difference) between that mean and the palette colour; ≤ 10 reads as
   "the same colour, a bit off", ≥ 20 as another colour
3. the HSV hue of the mean, within the palette hue ± 12° (wrapping at 360°)

Written here in numpy rather than taken from scikit-image or colour-science: the evaluator runs
beside the runtime with numpy and pillow only, and the formulas are short. `tests/test_builtin_colour.py`
checks ΔE2000 against the published test data of Sharma, Wu and Dalal (2005), the reference every
implementation is checked against.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

from .evaluate import read_objects
from .scenes import COLORS

HUE_WINDOW = 12.0  # degrees either side of the palette hue
DELTA_E_TARGET = 10.0

# sRGB (IEC 61966-2-1) → XYZ, D65 white
_SRGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                         [0.2126729, 0.7151522, 0.0721750],
                         [0.0193339, 0.1191920, 0.9503041]])
_D65 = np.array([0.95047, 1.0, 1.08883])


def srgb_to_lab(rgb) -> np.ndarray:
    """sRGB in 0–255 (…, 3) → CIELAB (…, 3) under D65."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _SRGB_TO_XYZ.T / _D65
    eps, kappa = 216 / 24389, 24389 / 27
    f = np.where(xyz > eps, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def delta_e_2000(lab1, lab2) -> np.ndarray:
    """CIE 2000 colour difference (kL = kC = kH = 1), as Sharma, Wu and Dalal (2005) give it."""
    lab1, lab2 = np.asarray(lab1, np.float64), np.asarray(lab2, np.float64)
    L1, a1, b1 = np.moveaxis(lab1, -1, 0)
    L2, a2, b2 = np.moveaxis(lab2, -1, 0)
    c_mean7 = ((np.hypot(a1, b1) + np.hypot(a2, b2)) / 2) ** 7
    g = 0.5 * (1 - np.sqrt(c_mean7 / (c_mean7 + 25.0 ** 7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p = np.degrees(np.arctan2(b1, a1p)) % 360
    h2p = np.degrees(np.arctan2(b2, a2p)) % 360
    both = (c1p * c2p) != 0
    dh = h2p - h1p
    dh = np.where(dh > 180, dh - 360, np.where(dh < -180, dh + 360, dh))
    dh = np.where(both, dh, 0.0)
    dL, dC = L2 - L1, c2p - c1p
    dH = 2 * np.sqrt(c1p * c2p) * np.sin(np.radians(dh / 2))
    L_mean, c_mean = (L1 + L2) / 2, (c1p + c2p) / 2
    h_sum = h1p + h2p
    h_mean = np.where(np.abs(h1p - h2p) <= 180, h_sum / 2, np.where(h_sum < 360, (h_sum + 360) / 2, (h_sum - 360) / 2))
    h_mean = np.where(both, h_mean, h_sum)
    t = (1 - 0.17 * np.cos(np.radians(h_mean - 30)) + 0.24 * np.cos(np.radians(2 * h_mean))
         + 0.32 * np.cos(np.radians(3 * h_mean + 6)) - 0.20 * np.cos(np.radians(4 * h_mean - 63)))
    s_l = 1 + 0.015 * (L_mean - 50) ** 2 / np.sqrt(20 + (L_mean - 50) ** 2)
    s_c = 1 + 0.045 * c_mean
    s_h = 1 + 0.015 * c_mean * t
    c_mean7 = c_mean ** 7
    r_t = (-2 * np.sqrt(c_mean7 / (c_mean7 + 25.0 ** 7))
           * np.sin(np.radians(60 * np.exp(-(((h_mean - 275) / 25) ** 2)))))
    return np.sqrt((dL / s_l) ** 2 + (dC / s_c) ** 2 + (dH / s_h) ** 2 + r_t * (dC / s_c) * (dH / s_h))


def hue(rgb) -> float:
    """HSV hue in degrees of an sRGB colour (0–255)."""
    r, g, b = (float(v) / 255.0 for v in rgb)
    return colorsys.rgb_to_hsv(r, g, b)[0] * 360.0


def hue_distance(h1: float, h2: float) -> float:
    d = abs(h1 - h2) % 360
    return min(d, 360 - d)


@dataclass(frozen=True)
class ColourReading:
    """How one object's drawn colour compares with the palette colour its caption asked for."""
    wanted: str
    mean_rgb: tuple[float, float, float] | None  # None: no object found

    @property
    def found(self) -> bool:
        return self.mean_rgb is not None

    @property
    def delta_e(self) -> float | None:
        if self.mean_rgb is None:
            return None
        return float(delta_e_2000(srgb_to_lab(self.mean_rgb), srgb_to_lab(COLORS[self.wanted])))

    @property
    def hue(self) -> float | None:
        return None if self.mean_rgb is None else hue(self.mean_rgb)

    @property
    def in_hue_window(self) -> bool:
        return self.mean_rgb is not None and hue_distance(self.hue, hue(COLORS[self.wanted])) <= HUE_WINDOW


def read_colour(image, scene, found=None) -> ColourReading:
    """The drawn colour of a one-object scene's object: the largest object the evaluator finds.
    `found`: the objects already read from the image, largest first (`evaluate.draw_scenes` gives them)."""
    (want,) = scene.objects
    if found is None:
        found = read_objects(image, max_objects=1)
    return ColourReading(want.color, found[0].mean_rgb if found else None)


def summarise(readings: list[ColourReading]) -> dict:
    """Per palette colour: images, objects found, the mean colour drawn, ΔE2000 (per image: mean,
    median, max; and of the mean colour), hue of the mean, and the share inside the hue window;
    then the same over all colours and whether the issue's targets hold."""
    per_colour = {}
    for name in COLORS:
        rows = [r for r in readings if r.wanted == name]
        if not rows:
            continue
        found = [r for r in rows if r.found]
        entry = {"images": len(rows), "found": len(found), "palette_rgb": list(COLORS[name]),
                 "palette_hue": round(hue(COLORS[name]), 1),
                 "in_hue_window": sum(r.in_hue_window for r in rows) / len(rows)}
        if found:
            mean_rgb = np.mean([r.mean_rgb for r in found], axis=0)
            d = np.array([r.delta_e for r in found])
            entry.update({
                "mean_rgb": [round(float(v), 1) for v in mean_rgb],
                "hue_of_mean": round(hue(mean_rgb), 1),
                "delta_e_of_mean": round(float(delta_e_2000(srgb_to_lab(mean_rgb), srgb_to_lab(COLORS[name]))), 2),
                "delta_e_mean": round(float(d.mean()), 2),
                "delta_e_median": round(float(np.median(d)), 2),
                "delta_e_max": round(float(d.max()), 2),
            })
        per_colour[name] = entry
    worst = max((e.get("delta_e_mean", float("inf")) for e in per_colour.values()), default=float("inf"))
    window = sum(r.in_hue_window for r in readings) / max(len(readings), 1)
    return {
        "per_colour": per_colour,
        "images": len(readings),
        "in_hue_window": window,
        "worst_delta_e_mean": worst,
        "targets": {"delta_e_mean_each_colour_max": DELTA_E_TARGET, "in_hue_window_min": 0.95,
                    "hue_window_degrees": HUE_WINDOW,
                    # every one of the palette's colours must have been drawn and judged
                    "met": bool(set(per_colour) == set(COLORS) and worst <= DELTA_E_TARGET and window >= 0.95
                                and all(e["in_hue_window"] >= 0.95 for e in per_colour.values()))},
    }


__all__ = ["ColourReading", "delta_e_2000", "hue", "hue_distance", "read_colour", "srgb_to_lab", "summarise"]
