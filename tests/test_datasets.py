"""Tests for sd/datasets.py: the synthetic shapes dataset is deterministic and well formed, and `describe`
reads shape, colour and background back from clean and degraded (blurred, noisy, colour-shifted) images.
"""

import itertools

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from sd.training.datasets import (ADHERENCE_PROMPTS, COLOURS, MIN_SIZE, RADIUS_RANGE, SHAPES, ShapesDataset, caption, describe, draw,
                         matches, prompts_grid)

N_CHECKED = 500        # items per accuracy or invariant check
N_COVERAGE = 2_000     # items in which every shape and colour must appear
BLUR_RADIUS = 1        # degradation: PIL Gaussian blur radius (pixels) ...
NOISE_SIGMA = 12       # ... then per-pixel Gaussian noise (0..255 scale) ...
COLOUR_SHIFT = 15      # ... then one uniform shift per channel in [-15, 15] for the whole image


def _drawn(ds, i):
    s = ds.spec(i)
    return s, draw(s["shape"], s["colour"], s["background"], ds.size, s["center"], s["radius"])


def _degrade(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(BLUR_RADIUS)), dtype=np.float32)
    pixels = pixels + rng.normal(0, NOISE_SIGMA, pixels.shape) + rng.integers(-COLOUR_SHIFT, COLOUR_SHIFT + 1, 3)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def _accuracy(size, degrade=False):
    ds, rng = ShapesDataset(N_CHECKED, size, seed=1), np.random.default_rng(0)
    right = 0
    for i in range(N_CHECKED):
        s, image = _drawn(ds, i)
        right += matches(_degrade(image, rng) if degrade else image, s["shape"], s["colour"], s["background"])
    return right / N_CHECKED


def test_palette_is_well_separated():
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    assert min(np.linalg.norm(a - b) for a, b in itertools.combinations(palette, 2)) > 100


def test_items_are_deterministic_and_well_formed():
    a, b = ShapesDataset(50, seed=3), ShapesDataset(50, seed=3)
    for i in (0, 17, 49):
        (xa, ca), (xb, cb) = a[i], b[i]
        assert torch.equal(xa, xb) and ca == cb and a.spec(i) == b.spec(i)
        assert xa.shape == (3, 64, 64) and xa.dtype == torch.float32
        assert xa.min() >= -1 and xa.max() <= 1
        s = a.spec(i)
        assert ca == caption(s["shape"], s["colour"], s["background"])
    assert [b[i][1] for i in (49, 17, 0)] == [a[i][1] for i in (49, 17, 0)]  # order does not matter
    other = ShapesDataset(50, seed=4)
    assert any(not torch.equal(a[i][0], other[i][0]) for i in range(5))
    assert len(a) == 50 and ShapesDataset(10, size=32)[0][0].shape == (3, 32, 32)


def test_caption_text():
    assert caption("circle", "red", "blue") == "a red circle on a blue background"


def test_specs_are_valid_and_cover_everything():
    ds = ShapesDataset(N_COVERAGE, size=48, seed=0)
    specs = [ds.spec(i) for i in range(N_COVERAGE)]
    for s in specs[:N_CHECKED]:
        assert s["colour"] != s["background"]
        (cx, cy), r = s["center"], s["radius"]
        assert RADIUS_RANGE[0] * ds.size <= r <= RADIUS_RANGE[1] * ds.size
        assert min(cx, cy) - r >= 0 and max(cx, cy) + r <= ds.size - 1  # fully inside the image
    assert {s["shape"] for s in specs} == set(SHAPES)
    assert {s["colour"] for s in specs} == set(COLOURS) == {s["background"] for s in specs}


def test_restricted_shapes_and_colours():
    ds = ShapesDataset(200, shapes=("circle",), colours=("red", "blue"))
    assert {(ds.spec(i)["shape"], ds.spec(i)["colour"], ds.spec(i)["background"]) for i in range(200)} == {
        ("circle", "red", "blue"), ("circle", "blue", "red")}


def test_draw_uses_exact_colours():
    image = np.asarray(draw("square", "green", "white", size=32))
    assert tuple(image[0, 0]) == COLOURS["white"] and tuple(image[16, 16]) == COLOURS["green"]
    assert {tuple(p) for p in image.reshape(-1, 3)} == {COLOURS["white"], COLOURS["green"]}


@pytest.mark.parametrize("size", [64, 32])
def test_describe_clean_images(size):
    assert _accuracy(size) >= 0.99


@pytest.mark.parametrize("size", [64, 32])
def test_describe_degraded_images(size):
    assert _accuracy(size, degrade=True) >= 0.90


def test_describe_inputs_and_empty_image():
    image = draw("triangle", "yellow", "purple", size=64)
    tensor, _ = ShapesDataset(1)[0]
    expected = {k: ShapesDataset(1).spec(0)[k] for k in ("shape", "colour", "background")}
    assert describe(image) == describe(np.asarray(image)) == {"shape": "triangle", "colour": "yellow", "background": "purple"}
    assert describe(tensor) == expected
    blank = Image.new("RGB", (64, 64), COLOURS["blue"])
    assert describe(blank) == {"shape": "none", "colour": "none", "background": "blue"}
    assert not matches(blank, "circle", "red", "blue")


def test_prompt_grid_covers_everything():
    assert len(ADHERENCE_PROMPTS) >= 24
    for grid in (ADHERENCE_PROMPTS, prompts_grid(48, seed=5)):
        assert all(colour != background for _, colour, background in grid)
        assert {t[0] for t in grid} == set(SHAPES)
        assert {t[1] for t in grid} == set(COLOURS) == {t[2] for t in grid}
        assert len(set(grid)) == len(grid)
    assert prompts_grid(24, seed=1) != prompts_grid(24, seed=0)


@pytest.mark.parametrize("call, message", [
    (lambda: draw("hexagon", "red", "blue"), "known shapes: circle"),
    (lambda: draw("circle", "teal", "blue"), "known colours: red"),
    (lambda: caption("circle", "red", "mauve"), "unknown background 'mauve'"),
    (lambda: draw("circle", "red", "red"), "must differ"),
    (lambda: draw("circle", "red", "blue", size=MIN_SIZE - 1), f"at least {MIN_SIZE}"),
    (lambda: draw("circle", "red", "blue", size=32, center=(5, 16), radius=10), "does not fit"),
    (lambda: ShapesDataset(size=8), f"at least {MIN_SIZE}"),
    (lambda: ShapesDataset(shapes=("circle", "star")), "unknown shape 'star'"),
    (lambda: ShapesDataset(colours=("red",)), "at least two distinct colours"),
    (lambda: matches(draw("circle", "red", "blue"), "circle", "blue", "blue"), "must differ"),
])
def test_bad_input_is_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
