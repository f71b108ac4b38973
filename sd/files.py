"""Every file sd writes goes through here: written whole or not at all, and never over a file unless asked.

No tutorial counterpart (the tutorial saves nothing). A file is written to a temporary name in its own folder,
flushed to disk (fsync), then renamed over its final name, which POSIX makes atomic: a reader, a second process or
a Ctrl-C sees the old file or the new one, never half of one. Without overwrite the final name is taken with a hard
link, which fails if the name exists, so two processes writing one path cannot both "win". Images: the format
follows the extension, with the generation parameters where AUTOMATIC1111 writes them (PNG: a "parameters" text
chunk; JPEG and WebP: EXIF UserComment, "UNICODE\\0" + UTF-16 as piexif writes it).
"""

import contextlib
import errno
import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, features
from PIL.PngImagePlugin import PngInfo

from .interrupts import deferred_sigint

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
JPEG_QUALITY = 95  # AUTOMATIC1111's default (jpeg_quality / webp quality)
EXIF_IFD = 0x8769  # the Exif sub-IFD, where UserComment lives
USER_COMMENT = 0x9286  # EXIF UserComment: 8 bytes naming the encoding, then the text
UNICODE_PREFIX = b"UNICODE\0"  # piexif.helper.UserComment's "unicode" encoding (UTF-16, big-endian)
TIFF_LONG, TIFF_UNDEFINED = 4, 7  # EXIF field types: UserComment must be UNDEFINED (Pillow would write BYTE)
MAX_FREE_NAME_TRIES = 10_000
TEMP_NAME_CHARS = 64  # of the target's name kept in the temporary name, so a long legal name stays legal


class OutputError(ValueError):
    """An output path that cannot be written: a folder, under a file, an extension we do not write."""


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (the folder's entry), where the OS lets us open a folder."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; when the block ends, the file is synced to disk and put at
    `path` in one step. On any failure (a full disk, Ctrl-C) the temporary file is removed and `path` is untouched.
    overwrite=False: FileExistsError if `path` exists, even if another process took it while we wrote."""
    path = Path(path)
    _existing_folder(path)  # cheap; mkstemp below tries the folder itself
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        with deferred_sigint():  # a Ctrl-C between making the file and holding its name would leave it behind
            fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:TEMP_NAME_CHARS]}.", suffix=".tmp")
            os.close(fd)
            tmp = Path(name)
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's file (or one a writer renamed over it) is private: 0600
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # atomic, and fails with FileExistsError if the name is taken
            tmp.unlink()
        _fsync_dir(path.parent)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def check_output_path(path: Path) -> None:
    """Refuse, before any work, a path that is a folder, lies under a file or in a folder we cannot write to (tried
    with a temporary file: permissions alone do not tell, for root or on a read-only file system)."""
    parent = _existing_folder(path)
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror} in {parent}") from None


def _existing_folder(path: Path) -> Path:
    """The nearest folder above path that exists; OutputError if path is a folder or lies under a file."""
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give a file name such as {path / 'out.png'}")
    parent = next(p for p in path.parents if p.exists())  # "/" or "." always does
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: {parent} is a file, not a folder")
    return parent


def free_path(path: Path) -> Path:
    """`path` if no file has that name, else the first free `stem-1.ext`, `stem-2.ext`, ... (AUTOMATIC1111 also
    numbers its outputs rather than replace one)."""
    if not os.path.lexists(path):  # a broken symlink is a name taken too
        return path
    for n in range(1, MAX_FREE_NAME_TRIES):
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        if not os.path.lexists(candidate):
            return candidate
    raise FileExistsError(f"{path} and {MAX_FREE_NAME_TRIES} numbered names beside it exist; use --overwrite")


def image_format(path: Path) -> str:
    """PIL's format name for the extension, or an OutputError saying which extensions are written."""
    fmt = IMAGE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise OutputError(f"cannot write {path.name!r}: images are written as "
                          f"{', '.join(IMAGE_FORMATS)} (the format follows the extension)")
    if fmt == "WEBP" and not features.check("webp"):
        raise OutputError(f"cannot write {path.name!r}: this Pillow was built without WebP; use .png or .jpg")
    return fmt


def check_image_output(path: str | os.PathLike) -> Path:
    """The checks save_image will make, made before any work: a known extension, not a folder, not under a file."""
    path = Path(path)
    check_output_path(path)
    image_format(path)
    return path


def _save_options(fmt: str, parameters: str | None) -> dict:
    if fmt == "PNG":
        info = PngInfo()
        if parameters is not None:
            info.add_text("parameters", parameters)
        return {"pnginfo": info}
    options = {"quality": JPEG_QUALITY}
    if parameters is not None:
        options["exif"] = exif_user_comment(parameters)
    return options


def exif_user_comment(text: str) -> bytes:
    """EXIF that holds only UserComment = text, as piexif writes it for AUTOMATIC1111 (type UNDEFINED, "UNICODE\0" +
    UTF-16BE): a little-endian TIFF header, IFD0 with one entry pointing to the Exif IFD, whose one entry points to
    the comment."""
    comment = UNICODE_PREFIX + text.encode("utf-16-be")
    ifd0 = 8                      # after the header
    exif_ifd = ifd0 + 2 + 12 + 4  # after IFD0: its entry count, one 12-byte entry, the next-IFD offset
    data = exif_ifd + 2 + 12 + 4
    return (b"Exif\0\0" + b"II*\0" + struct.pack("<I", ifd0)
            + struct.pack("<HHHII", 1, EXIF_IFD, TIFF_LONG, 1, exif_ifd) + struct.pack("<I", 0)
            + struct.pack("<HHHII", 1, USER_COMMENT, TIFF_UNDEFINED, len(comment), data) + struct.pack("<I", 0)
            + comment)


def save_image(image: Image.Image, path: str | os.PathLike, parameters: str | None = None,
               overwrite: bool = False) -> Path:
    """Write image in the format of path's extension, with parameters (AUTOMATIC1111's text) in its metadata.
    Returns the path written: `path`, or with overwrite=False the next free numbered name beside it. (A caller checks
    the path once before its work with check_image_output; this runs for every --preview step.)"""
    path = Path(path)
    fmt = image_format(path)
    options = _save_options(fmt, parameters)
    while True:
        target = path if overwrite else free_path(path)
        try:
            with atomic_output(target, overwrite=overwrite) as tmp:
                image.save(tmp, format=fmt, **options)
            return target
        except FileExistsError:
            if overwrite:
                raise
            # another process took the name between free_path and the link: try the next one


def read_parameters(path: str | os.PathLike) -> str | None:
    """The parameters text save_image wrote (PNG text chunk or EXIF UserComment), or None."""
    with Image.open(path) as image:
        if "parameters" in image.info:
            return image.info["parameters"]
        comment = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    if isinstance(comment, bytes) and comment.startswith(UNICODE_PREFIX):
        return comment[len(UNICODE_PREFIX):].decode("utf-16-be")
    return None


def is_disk_full(error: OSError) -> bool:
    return error.errno in (errno.ENOSPC, errno.EDQUOT)
