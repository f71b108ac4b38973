"""sd.files: a file is written whole or not at all, never over another unless asked, in the format its name says,
with AUTOMATIC1111's parameters where AUTOMATIC1111 puts them."""

import errno
import multiprocessing
import os

import numpy as np
import pytest
from PIL import Image

from sd.files import OutputError, atomic_output, check_image_output, free_path, read_parameters, save_image

TEXT = "a cat, best quality\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 1"


def picture(value: int = 90) -> Image.Image:
    return Image.fromarray(np.full((8, 8, 3), value, np.uint8))


def leftovers(folder) -> list[str]:
    return [name for name in os.listdir(folder) if name.endswith(".tmp")]


@pytest.mark.parametrize("name,fmt", [("a.png", "PNG"), ("a.jpg", "JPEG"), ("a.JPEG", "JPEG"), ("a.webp", "WEBP")])
def test_the_format_follows_the_extension_with_the_parameters_inside(tmp_path, name, fmt):
    path = save_image(picture(), tmp_path / name, TEXT)
    with Image.open(path) as image:
        assert image.format == fmt  # -o x.jpg used to write PNG bytes
    assert read_parameters(path) == TEXT


@pytest.mark.parametrize("suffix", [".jpg", ".webp"])
def test_jpeg_and_webp_parameters_read_back_with_automatic1111s_reader(tmp_path, suffix):
    """AUTOMATIC1111 reads them with piexif: UserComment must be of type UNDEFINED (Pillow writes bytes as BYTE,
    which piexif returns as a tuple of ints, and AUTOMATIC1111's reader then fails)."""
    piexif = pytest.importorskip("piexif")
    import piexif.helper

    path = save_image(picture(), tmp_path / f"a{suffix}", TEXT + " ünïcode")
    comment = piexif.load(str(path))["Exif"][piexif.ExifIFD.UserComment]
    assert comment == b"UNICODE\0" + (TEXT + " ünïcode").encode("utf-16-be")  # UserComment.dump(encoding="unicode")
    assert piexif.helper.UserComment.load(comment) == TEXT + " ünïcode"


@pytest.mark.parametrize("name", ["a.gif", "a.bmp", "a", "a.png.txt"])
def test_other_extensions_are_refused(tmp_path, name):
    with pytest.raises(OutputError, match="images are written as .png, .jpg, .jpeg, .webp"):
        save_image(picture(), tmp_path / name)
    assert os.listdir(tmp_path) == []


def test_a_folder_or_a_path_under_a_file_is_refused(tmp_path):
    (tmp_path / "file.png").write_text("not a folder")
    with pytest.raises(OutputError, match="is a folder; give a file name such as"):
        check_image_output(tmp_path)
    with pytest.raises(OutputError, match="file.png is a file, not a folder"):
        check_image_output(tmp_path / "file.png" / "x.png")


def test_an_existing_file_is_kept_and_the_next_free_name_used(tmp_path):
    (tmp_path / "out.png").write_text("my notes")  # even a text file: it was silently replaced before
    first = save_image(picture(1), tmp_path / "out.png")
    second = save_image(picture(2), tmp_path / "out.png")
    assert (first.name, second.name) == ("out-1.png", "out-2.png")
    assert (tmp_path / "out.png").read_text() == "my notes"
    replaced = save_image(picture(3), tmp_path / "out.png", overwrite=True)
    assert replaced == tmp_path / "out.png" and np.asarray(Image.open(replaced))[0, 0, 0] == 3
    assert free_path(tmp_path / "new.png") == tmp_path / "new.png"


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"the old, complete file")
    for error in (KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")):
        with pytest.raises(type(error)), atomic_output(path) as tmp:
            tmp.write_bytes(b"half of the new")
            raise error
        assert path.read_bytes() == b"the old, complete file" and leftovers(tmp_path) == []


def test_a_ctrl_c_just_as_the_temporary_file_is_made_leaves_nothing(tmp_path, monkeypatch):
    """CI once found `.x-1.png.*.tmp` left by a Ctrl-C: Python ran the KeyboardInterrupt after mkstemp had made the
    file and before its name was kept. The signal is now held back for those lines and raised where the file is
    cleaned up."""
    import signal
    import tempfile

    made = []
    real_mkstemp = tempfile.mkstemp

    def mkstemp_then_ctrl_c(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        made.append(name)
        signal.raise_signal(signal.SIGINT)  # its handler runs at the next bytecode, before mkstemp returns
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt), atomic_output(tmp_path / "x.png") as tmp:
        tmp.write_bytes(b"never written")
    assert made and os.listdir(tmp_path) == [] and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_reader_sees_the_old_file_until_the_new_one_is_whole(tmp_path):
    """What --preview needs: the viewer reads the last complete image while the next one is being written."""
    path = save_image(picture(1), tmp_path / "preview.png", overwrite=True)
    with atomic_output(path) as tmp:
        picture(2).save(tmp, format="PNG")
        with open(tmp, "r+b") as f:
            f.truncate(20)  # as if the write were half-way
        assert np.asarray(Image.open(path))[0, 0, 0] == 1
        picture(2).save(tmp, format="PNG")
    assert np.asarray(Image.open(path))[0, 0, 0] == 2


def test_written_files_get_the_usual_permissions(tmp_path):
    mask = os.umask(0)
    os.umask(mask)
    path = save_image(picture(), tmp_path / "a.png")
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's private 0600
    with atomic_output(tmp_path / "model.bin") as tmp:  # a writer that renames its own private file over ours,
        private = tmp_path / "private"                  # as safetensors' save_file does
        private.write_bytes(b"weights")
        private.chmod(0o600)
        os.replace(private, tmp)
    assert (tmp_path / "model.bin").stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_broken_symlink_is_a_taken_name(tmp_path):
    """free_path once took it for free and the no-clobber link then failed on it, forever."""
    (tmp_path / "out.png").symlink_to(tmp_path / "nowhere")
    assert save_image(picture(), tmp_path / "out.png").name == "out-1.png"
    assert (tmp_path / "out.png").is_symlink()


def test_the_longest_legal_name_can_be_written(tmp_path):
    name = "a" * 251 + ".png"  # 255 characters: the temporary name beside it must not be longer
    assert save_image(picture(), tmp_path / name).name == name and leftovers(tmp_path) == []


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc (a folder no one may write to)")
def test_a_folder_that_cannot_be_written_is_refused_before_any_work():
    with pytest.raises(OutputError, match="cannot write /proc/self/x.png: "):
        check_image_output("/proc/self/x.png")


def _save_many(folder: str, value: int, n: int) -> list[str]:
    return [save_image(picture(value), os.path.join(folder, "same.png")).name for _ in range(n)]


def test_two_processes_writing_one_path_both_keep_their_images(tmp_path):
    n = 8
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.starmap(_save_many, [(str(tmp_path), 10, n), (str(tmp_path), 20, n)])
    names = results[0] + results[1]
    assert len(set(names)) == 2 * n  # nobody's image replaced another's
    values = sorted(int(np.asarray(Image.open(tmp_path / name))[0, 0, 0]) for name in names)
    assert values == [10] * n + [20] * n and leftovers(tmp_path) == []
