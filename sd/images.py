"""Images into the pipeline: every input image (and mask) normalised once, then made a tensor.

Tutorial part: "Pipeline" (hkproj pipeline.py: the input image resized to WIDTH x HEIGHT and rescaled to [-1, 1]).
Normalising means: the EXIF orientation applied (a phone photo the right way up), any mode and bit depth to 8-bit
RGB or greyscale (16-bit PNGs scaled, not clipped: Pillow's convert("L") clips I;16 to white), and the size made the
output's, by stretching (diffusers' and the tutorial's resize) or by scaling to cover and cropping the centre.
"""

import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

RESIZE_MODES = ("stretch", "crop")  # stretch: resize to the output size; crop: keep the aspect ratio, cut the edges
ASPECT_TOLERANCE = 0.01  # a stretch that changes the aspect ratio by more than this is reported
WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}  # full scale


EXIF_ORIENTATION = 0x0112
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # rotated by 90° or 270°: shown with width and height swapped


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as the image is shown, its EXIF orientation applied."""
    w, h = image.size
    return (h, w) if image.getexif().get(EXIF_ORIENTATION) in TRANSPOSED_ORIENTATIONS else (w, h)


def to_8bit(image: Image.Image, mode: str) -> Image.Image:
    """The image the right way up, in `mode` ("RGB" or "L"), 8 bits per channel."""
    image = ImageOps.exif_transpose(image)
    if image.mode in WIDE_MODES:  # one channel of 16 or 32 bits (or floats): scale to 0..255 ourselves
        array = np.asarray(image, dtype=np.float64) / WIDE_MODES[image.mode]
        image = Image.fromarray((array.clip(0, 1) * 255).round().astype(np.uint8), mode="L")
    return image.convert(mode)


def fit(image: Image.Image, width: int, height: int, resize_mode: str, what: str | None) -> Image.Image:
    """image at width x height: stretched (with a warning naming `what` when that changes its shape) or scaled and
    centre-cropped."""
    if image.size == (width, height):
        return image
    w, h = image.size
    if resize_mode == "crop":
        scale = max(width / w, height / h)  # cover the output, then cut what sticks out
        box_w, box_h = width / scale, height / scale
        left, top = (w - box_w) / 2, (h - box_h) / 2
        return image.resize((width, height), Image.LANCZOS, box=(left, top, left + box_w, top + box_h))
    if what is not None and abs((w / h) / (width / height) - 1) > ASPECT_TOLERANCE:
        warnings.warn(f"{what} is {w}x{h} but the output is {width}x{height}: it is stretched to fit; "
                      f"use resize_mode='crop' (sd: --resize-mode crop) to keep its shape and crop the edges, "
                      f"or give height and width of its aspect ratio", stacklevel=4)
    return image.resize((width, height), Image.LANCZOS)


def image_to_tensor(image: Image.Image, width: int, height: int, resize_mode: str = "stretch") -> torch.Tensor:
    """PIL image (any mode) -> (1, 3, height, width) float32 in [-1, 1], resized with Lanczos as diffusers does."""
    image = fit(to_8bit(image, "RGB"), width, height, resize_mode, "input_image")
    array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3) in [0, 1]
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2 - 1


def mask_to_tensor(mask: Image.Image, width: int, height: int, resize_mode: str = "stretch") -> torch.Tensor:
    """Mask image -> (1, 1, height, width) of 0/1, white (>= half grey) = repaint; fitted as the image is."""
    mask = fit(to_8bit(mask, "L"), width, height, resize_mode, None)  # the same size as the image: warned once
    array = np.asarray(mask, dtype=np.float32) / 255.0
    return (torch.from_numpy(array)[None, None] >= 0.5).float()
