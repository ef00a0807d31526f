"""The colour measure of the built-in model's evaluator: ΔE2000 against the published reference
data, CIELAB against the standard's anchors, and the reading of rendered and drifted objects."""

import numpy as np
import pytest

from ortdiffusion.builtin.colour import (
    ColourReading, delta_e_2000, hue, hue_distance, read_colour, srgb_to_lab, summarise,
)
from ortdiffusion.builtin.scenes import COLORS, Scene, SceneObject, render

# Sharma, Wu and Dalal (2005), "The CIEDE2000 color-difference formula: implementation notes,
# supplementary test data, and mathematical observations", Table 1 (pairs 1, 2, 7, 13-15, 25, 26,
# 29, 30, 32, 34): the cases that catch the usual mistakes (hue wrap, a* = 0, near-neutral colours).
SHARMA = [
    ((50.0, 2.6772, -79.7751), (50.0, 0.0, -82.7485), 2.0425),
    ((50.0, 3.1571, -77.2803), (50.0, 0.0, -82.7485), 2.8615),
    ((50.0, 0.0, 0.0), (50.0, -1.0, 2.0), 2.3669),
    ((50.0, 2.49, -0.001), (50.0, -2.49, 0.0009), 7.1792),
    ((50.0, 2.49, -0.001), (50.0, -2.49, 0.0010), 7.1792),
    ((50.0, 2.49, -0.001), (50.0, -2.49, 0.0011), 7.2195),
    ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644),
    ((63.0109, -31.0961, -5.8663), (62.8187, -29.7946, -4.0864), 1.2630),
    ((22.7233, 20.0904, -46.6940), (23.0331, 14.9730, -42.5619), 2.0373),
    ((36.4612, 47.8580, 18.3852), (36.2715, 50.5065, 21.2231), 1.4146),
    ((90.8027, -2.0831, 1.4410), (91.1528, -1.6435, 0.0447), 1.4441),
    ((2.0776, 0.0795, -1.1350), (0.9033, -0.0636, -0.5514), 0.9082),
]


@pytest.mark.parametrize("lab1,lab2,expected", SHARMA)
def test_delta_e_2000_matches_the_published_test_data(lab1, lab2, expected):
    assert delta_e_2000(lab1, lab2) == pytest.approx(expected, abs=1e-4)
    assert delta_e_2000(lab2, lab1) == pytest.approx(expected, abs=1e-4)  # symmetric


def test_delta_e_2000_is_vectorised():
    a = np.array([p[0] for p in SHARMA])
    b = np.array([p[1] for p in SHARMA])
    np.testing.assert_allclose(delta_e_2000(a, b), [p[2] for p in SHARMA], atol=1e-4)


def test_srgb_to_lab_anchors():
    # white is L*=100 a*=b*=0 under D65; black is 0; sRGB red's CIELAB is (53.24, 80.09, 67.20)
    np.testing.assert_allclose(srgb_to_lab([255, 255, 255]), [100, 0, 0], atol=0.01)
    np.testing.assert_allclose(srgb_to_lab([0, 0, 0]), [0, 0, 0], atol=1e-9)
    np.testing.assert_allclose(srgb_to_lab([255, 0, 0]), [53.24, 80.09, 67.20], atol=0.02)


def test_hue_window_wraps_at_360():
    assert hue(COLORS["yellow"]) == pytest.approx(52.5, abs=0.1)
    assert hue((175, 206, 50)) == pytest.approx(71.9, abs=0.1)  # the yellow-green the issue saw
    assert hue_distance(355.0, 5.0) == 10.0
    red = ColourReading("red", (220.0, 40.0, 60.0))  # hue ~353.3, palette red 0
    assert red.in_hue_window


def test_a_rendered_object_reads_as_its_palette_colour_and_a_drifted_one_does_not():
    obj = SceneObject("yellow", "circle", "large", 32, 32, position="center")
    scene = Scene((obj,))
    exact = read_colour(render(scene), scene)
    assert exact.found and exact.delta_e < 3 and exact.in_hue_window
    drifted = np.asarray(render(scene)).copy()
    inside = np.linalg.norm(drifted.astype(float) - np.array([240, 240, 236]), axis=-1) > 60
    drifted[inside] = (175, 206, 50)
    reading = read_colour(drifted, scene)
    # nearest palette colour is still yellow, but a person sees another colour and the window says so
    assert reading.delta_e > 10 and not reading.in_hue_window


def test_summarise_reports_each_colour_and_judges_the_targets():
    good = [ColourReading(name, tuple(map(float, rgb))) for name, rgb in COLORS.items() for _ in range(3)]
    report = summarise(good)
    assert set(report["per_colour"]) == set(COLORS)
    assert report["worst_delta_e_mean"] < 1e-6 and report["targets"]["met"]
    bad = good + [ColourReading("yellow", (175.0, 206.0, 50.0)), ColourReading("blue", None)]
    report = summarise(bad)
    assert not report["targets"]["met"]
    assert report["per_colour"]["yellow"]["delta_e_max"] > 10
    assert report["per_colour"]["blue"]["found"] == 3 and report["per_colour"]["blue"]["images"] == 4


def test_targets_are_not_met_unless_every_palette_colour_was_judged():
    some = [ColourReading(name, tuple(map(float, rgb))) for name, rgb in COLORS.items() if name != "cyan"]
    assert not summarise(some)["targets"]["met"]
