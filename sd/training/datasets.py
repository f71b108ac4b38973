"""Synthetic captioned training data for the embedded model: simple flat-colour shapes drawn with PIL,
and `describe`, which reads shape, colour and background back from an image to score prompt adherence.

No tutorial counterpart (hkproj only runs inference). Item i depends on (seed, i) alone, through
numpy's `default_rng([seed, i])`, so it is identical in any process and in any order.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

# Well separated in RGB: the closest pair (yellow, orange) is ~120 apart, so a pixel shifted by
# blur, noise or a colour cast still lands nearest its true colour.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 25, 35),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (250, 235, 40),
    "purple": (150, 40, 170),
    "orange": (240, 120, 10),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

HALF_PIXEL_RANGE = 127.5           # maps 0..255 pixels to the model's [-1, 1] and back
MIN_SIZE = 16                      # smaller images leave too few pixels to tell the shapes apart
RADIUS_RANGE = (0.18, 0.38)        # shape radius as a fraction of the image size
MARGIN = 1                         # pixels of background always left between the shape and the border
SQUARE_HALF_SIDE = 0.85            # a square's half-side per unit radius (its area is then close to the circle's)
TRIANGLE_HALF_WIDTH = 3**0.5 / 2   # equilateral triangle inscribed in the circle of the radius: apex up

MIN_FOREGROUND_FRACTION = 0.01     # a blob smaller than this share of the image counts as "no shape"
TRIANGLE_MAX_TAPER = 0.6           # mean width of the top third / bottom third: triangle ~0.2-0.4, others ~0.7-1
SQUARE_MIN_DIAGONAL_RATIO = 1.2    # diagonal / axis extent of the blob: square sqrt(2), circle 1


def _check_shape(shape: str) -> None:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")


def _check_colour(name: str, role: str = "colour", palette: dict = COLOURS) -> None:
    if name not in palette:
        raise ValueError(f"unknown {role} {name!r}; known colours: {', '.join(palette)}")


def _check(shape: str, colour: str, background: str, palette: dict = COLOURS) -> None:
    _check_shape(shape)
    _check_colour(colour, palette=palette)
    _check_colour(background, "background", palette)
    if colour == background:
        raise ValueError(f"shape colour and background are both {colour!r}; they must differ")


def caption(shape: str, colour: str, background: str) -> str:
    """'a red circle on a blue background'."""
    _check(shape, colour, background)
    return f"a {colour} {shape} on a {background} background"


def draw(shape: str, colour: str, background: str, size: int = 64,
         center: tuple[float, float] | None = None, radius: float | None = None,
         palette: dict[str, tuple[int, int, int]] = COLOURS) -> Image.Image:
    """An RGB image of `size` x `size`: a flat `colour` shape on a flat `background`, no anti-aliasing.
    `radius` (pixels) is the circle's radius, the triangle's circumradius, and 1/0.85 of the square's
    half-side; `center` (x, y) in pixels. Defaults: centred, the largest radius of RADIUS_RANGE.
    palette: the colours by name (a fine-tuning example adds one the embedded model never saw)."""
    _check(shape, colour, background, palette)
    if not isinstance(size, int) or size < MIN_SIZE:
        raise ValueError(f"size must be an integer of at least {MIN_SIZE} pixels, got {size!r}")
    cx, cy = center if center is not None else ((size - 1) / 2, (size - 1) / 2)
    r = radius if radius is not None else RADIUS_RANGE[1] * size
    if r <= 0 or min(cx, cy) - r < 0 or max(cx, cy) + r > size - 1:
        raise ValueError(f"a shape of radius {r} at {(cx, cy)} does not fit inside a {size}x{size} image")
    image = Image.new("RGB", (size, size), palette[background])
    pen = ImageDraw.Draw(image)
    fill = palette[colour]
    if shape == "circle":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = SQUARE_HALF_SIDE * r
        pen.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    else:
        w = TRIANGLE_HALF_WIDTH * r
        pen.polygon([(cx, cy - r), (cx + w, cy + r / 2), (cx - w, cy + r / 2)], fill=fill)
    return image


class ShapesDataset(torch.utils.data.Dataset):
    """`length` captioned shape images; item i is (image (3, size, size) float32 in [-1, 1], caption)."""

    def __init__(self, length: int = 10_000, size: int = 64, seed: int = 0,
                 shapes: tuple[str, ...] = SHAPES, colours: tuple[str, ...] = tuple(COLOURS)):
        if not isinstance(size, int) or size < MIN_SIZE:
            raise ValueError(f"size must be an integer of at least {MIN_SIZE} pixels, got {size!r}")
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be a positive integer, got {length!r}")
        for name in shapes:
            _check_shape(name)
        for name in colours:
            _check_colour(name)
        if len(set(colours)) < 2:
            raise ValueError(f"need at least two distinct colours (shape and background), got {colours!r}")
        self.length, self.size, self.seed = length, size, seed
        self.shapes, self.colours = tuple(shapes), tuple(colours)

    def __len__(self) -> int:
        return self.length

    def spec(self, i: int) -> dict:
        """{"shape", "colour", "background", "center", "radius"} of item i, from (seed, i) alone."""
        i = int(i)  # samplers may hand over numpy or torch integers
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for a dataset of length {self.length}")
        rng = np.random.default_rng([self.seed, i])
        shape = self.shapes[rng.integers(len(self.shapes))]
        colour = self.colours[rng.integers(len(self.colours))]
        others = [c for c in self.colours if c != colour]
        background = others[rng.integers(len(others))]
        radius = float(rng.uniform(*RADIUS_RANGE) * self.size)
        lo, hi = MARGIN + radius, self.size - 1 - MARGIN - radius
        center = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
        return {"shape": shape, "colour": colour, "background": background, "center": center, "radius": radius}

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        s = self.spec(i)
        image = draw(s["shape"], s["colour"], s["background"], self.size, s["center"], s["radius"])
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)  # (3, H, W)
        return pixels / HALF_PIXEL_RANGE - 1.0, caption(s["shape"], s["colour"], s["background"])


def _to_rgb_array(image) -> np.ndarray:
    """PIL image, (H, W, 3) array in 0..255, or (3, H, W) tensor in [-1, 1] -> float (H, W, 3) in 0..255."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"a tensor image must be (3, H, W) in [-1, 1], got shape {tuple(image.shape)}")
        return ((image.detach().float().cpu().permute(1, 2, 0).numpy() + 1.0) * HALF_PIXEL_RANGE).clip(0, 255)
    array = np.asarray(image, dtype=np.float32)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"an array image must be (H, W, 3) in 0..255, got shape {array.shape}")
    return array


def _run_max(labels: np.ndarray) -> np.ndarray:
    """Give every horizontal run of nonzero labels the run's largest label (rows never join: a zero column pads them)."""
    padded = np.pad(labels, ((0, 0), (0, 1))).ravel()
    inside = padded > 0
    starts = inside & ~np.concatenate([[False], inside[:-1]])
    run = np.cumsum(starts) * inside  # 0 outside, else the run's number
    best = np.zeros(run.max() + 1, dtype=labels.dtype)
    np.maximum.at(best, run, padded)
    return np.where(inside, best[run], 0).reshape(labels.shape[0], -1)[:, :-1]


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask: spread the largest pixel label along rows,
    then columns, until nothing changes (a few passes for a compact shape)."""
    if not mask.any():
        return mask
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        spread = _run_max(_run_max(labels).T).T
        if np.array_equal(spread, labels):
            break
        labels = spread
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return labels == counts.argmax()


def _shape_of(blob: np.ndarray) -> str:
    """Triangle: the blob is much narrower at the top than at the bottom. Square: the blob reaches much further
    along the diagonals than along the axes (sqrt(2) times for a square, once for a circle)."""
    rows, cols = np.nonzero(blob)
    widths = blob[rows.min():rows.max() + 1].sum(axis=1)
    third = max(1, len(widths) // 3)
    if widths[:third].mean() / max(widths[-third:].mean(), 1) < TRIANGLE_MAX_TAPER:
        return "triangle"
    axis_extent = (np.ptp(rows) + np.ptp(cols)) / 2 + 1  # a pixel is 1 wide along an axis ...
    diagonal_extent = (np.ptp(rows + cols) + np.ptp(rows - cols)) / 2 / 2**0.5 + 2**0.5  # ... and sqrt(2) along a diagonal
    return "square" if diagonal_extent / axis_extent >= SQUARE_MIN_DIAGONAL_RATIO else "circle"


def describe(image, palette: dict[str, tuple[int, int, int]] = COLOURS) -> dict:
    """Read {"shape", "colour", "background"} back from an image (PIL, (H, W, 3) array, or (3, H, W)
    tensor in [-1, 1]). Every pixel takes its nearest palette colour; the background is the commonest
    one on the border; the shape is the largest connected blob of other pixels (stray noise is ignored),
    its colour the commonest inside it. "none" for shape and colour when there is almost no blob."""
    rgb = _to_rgb_array(image)
    names = list(palette)
    palette = np.array(list(palette.values()), dtype=np.float32)
    nearest = np.linalg.norm(rgb[:, :, None, :] - palette, axis=-1).argmin(axis=-1)  # (H, W)
    border = np.concatenate([nearest[0], nearest[-1], nearest[1:-1, 0], nearest[1:-1, -1]])
    background = np.bincount(border, minlength=len(names)).argmax()
    blob = _largest_blob(nearest != background)
    if blob.sum() < MIN_FOREGROUND_FRACTION * blob.size:
        return {"shape": "none", "colour": "none", "background": names[background]}
    # Blur blends the edge into in-between colours (yellow on red gives orange), so vote with the interior.
    padded = np.pad(blob, 1)
    interior = blob & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    voters = interior if interior.sum() >= MIN_FOREGROUND_FRACTION * blob.size else blob
    colour = np.bincount(nearest[voters], minlength=len(names)).argmax()
    return {"shape": _shape_of(blob), "colour": names[colour], "background": names[background]}


def matches(image, shape: str, colour: str, background: str) -> bool:
    """Whether `describe(image)` reads exactly this shape, colour and background."""
    _check(shape, colour, background)
    return describe(image) == {"shape": shape, "colour": colour, "background": background}


def prompts_grid(n: int = 24, seed: int = 0) -> list[tuple[str, str, str]]:
    """n (shape, colour, background) triples for the adherence evaluation. Shapes and colours cycle, and the
    background is the colour a (seed-dependent) number of steps further round the palette, so any n that is a
    multiple of 24 (lcm of 3 shapes and 8 colours) covers every shape-colour pair and every background."""
    names, period = list(COLOURS), len(COLOURS)
    triples = []
    for i in range(n):
        step = 1 + (seed + i // period) % (period - 1)  # never 0, so background != colour
        triples.append((SHAPES[i % len(SHAPES)], names[i % period], names[(i + step) % period]))
    return triples


ADHERENCE_PROMPTS: tuple[tuple[str, str, str], ...] = tuple(prompts_grid())
