"""Your own pictures as training data: a folder of images with captions, in the conventions fine-tuning tools use.

No tutorial counterpart. Captions, in this order of precedence: a caption given for every image (DreamBooth's
instance prompt, "a sks dog"); a `metadata.jsonl` of {"file_name", "text"} lines (Hugging Face's imagefolder);
`img.txt` (or kohya-ss's `img.caption`) beside each `img.png`. Images of any mode, bit depth and size, the right way
up (EXIF), scaled to cover size x size and centre-cropped (sd.images); with flip, each image also appears mirrored.
Item i depends on i alone, so every process of a distributed run reads the same item for the same index.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from ..checks import check, is_int
from ..images import image_to_tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_SUFFIXES = (".txt", ".caption")  # beside the image: ours and kohya-ss's
METADATA_FILE = "metadata.jsonl"  # Hugging Face imagefolder: {"file_name": "a.png", "text": "..."} per line
LATENT_MULTIPLE = 8  # the VAE's downscale: a training size must be a multiple of it


class ImageFolderDataset(torch.utils.data.Dataset):
    """Item i: (image (3, size, size) float32 in [-1, 1], caption). With flip, items len(files) .. 2·len(files)-1
    are the same images mirrored left to right."""

    def __init__(self, folder: str | os.PathLike, size: int = 512, caption: str | None = None, flip: bool = False):
        self.folder = Path(folder)
        check(is_int(size) and size >= LATENT_MULTIPLE and size % LATENT_MULTIPLE == 0,
              f"size must be a positive multiple of {LATENT_MULTIPLE} pixels, got {size!r}")
        check(caption is None or isinstance(caption, str), f"caption must be a string, got {caption!r}")
        check(isinstance(flip, bool), f"flip must be True or False, got {flip!r}")
        check(self.folder.is_dir(), f"training data {self.folder} is not a folder")
        self.size, self.flip = size, flip
        self.files = image_files(self.folder)
        self.captions = captions(self.folder, self.files, caption)
        for path in self.files:
            _check_readable(path)

    def __len__(self) -> int:
        return len(self.files) * (2 if self.flip else 1)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        n = len(self.files)
        with Image.open(self.files[i % n]) as image:
            pixels = image_to_tensor(image, self.size, self.size, "crop")[0]  # (3, size, size)
        return (pixels.flip(-1) if i >= n else pixels), self.captions[i % n]


def image_files(folder: Path, required: bool = True) -> list[Path]:
    """Every image in folder and the folders below it, sorted; a clear error if there are none and required."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    check(files or not required, f"training data {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}), in it or in its folders")
    return files


def captions(folder: Path, files: list[Path], caption: str | None) -> list[str]:
    """Each image's caption (see the module's docstring for where it comes from)."""
    orphans = sorted(p for p in folder.rglob("*") if p.suffix in CAPTION_SUFFIXES
                     and not any(p.with_suffix(s).is_file() for s in _all_cases(IMAGE_SUFFIXES)))
    check(not orphans, f"caption file {orphans[0] if orphans else ''} has no image beside it (an image of the same "
          f"name, {', '.join(IMAGE_SUFFIXES)}); remove it or add its image")
    if caption is not None:
        return [caption] * len(files)
    if (folder / METADATA_FILE).is_file():
        return _metadata_captions(folder, files)
    beside = {path: next((path.with_suffix(s) for s in CAPTION_SUFFIXES if path.with_suffix(s).is_file()), None)
              for path in files}
    missing = [path for path, text in beside.items() if text is None]
    check(not missing, f"{len(missing)} images have no caption, e.g. {missing[0] if missing else ''}: put a "
          f"{CAPTION_SUFFIXES[0]} beside each, a {METADATA_FILE}, or one caption for all")
    return [beside[path].read_text(encoding="utf-8").strip() for path in files]


def _all_cases(suffixes: tuple[str, ...]) -> list[str]:
    return [s for suffix in suffixes for s in (suffix, suffix.upper())]


def _metadata_captions(folder: Path, files: list[Path]) -> list[str]:
    """Captions from metadata.jsonl: every image listed once, every listed file there."""
    path, texts = folder / METADATA_FILE, {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            name, text = entry["file_name"], entry["text"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}, line {n}: expected {{\"file_name\": ..., \"text\": ...}}, got {line[:80]!r}") \
                from None
        check(isinstance(name, str) and isinstance(text, str), f"{path}, line {n}: file_name and text must be strings")
        check((folder / name).is_file(), f"{path}, line {n}: {name!r} is not a file in {folder}")
        texts[(folder / name).resolve()] = text
    unlisted = [p for p in files if p.resolve() not in texts]
    check(not unlisted, f"{path} has no caption for {len(unlisted)} images, e.g. {unlisted[0] if unlisted else ''}")
    return [texts[p.resolve()] for p in files]


def _check_readable(path: Path) -> None:
    """The file is an image Pillow can decode (its header and data), before any training starts."""
    try:
        with Image.open(path) as image:
            image.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as e:
        raise ValueError(f"training image {path} cannot be read ({e})") from None
