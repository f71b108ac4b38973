"""sd.training.image_folder: a folder of your pictures with captions (beside each image, metadata.jsonl, or one for
all), any mode and size, cropped to a square, optionally mirrored; and the errors a user's folder can raise."""

import json

import pytest
import torch
from PIL import Image

from sd.training.image_folder import ImageFolderDataset


def picture(path, size=(40, 24), mode="RGB", colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, colour)
    image.paste((20, 20, 220), (0, 0, size[0] // 4, size[1]))  # a blue band on the left: shows a flip
    image.convert(mode).save(path)
    return path


def test_captions_beside_each_image_any_mode_and_size(tmp_path):
    picture(tmp_path / "a.png")
    picture(tmp_path / "sub" / "b.jpg", size=(16, 64), mode="L")
    picture(tmp_path / "c.webp", size=(64, 64), mode="RGBA")
    (tmp_path / "a.txt").write_text("a red thing\n")
    (tmp_path / "sub" / "b.txt").write_text("a grey thing")
    (tmp_path / "c.caption").write_text("kohya's caption")
    data = ImageFolderDataset(tmp_path, size=16)
    assert len(data) == 3 and [data[i][1] for i in range(3)] == ["a red thing", "kohya's caption", "a grey thing"]
    for i in range(3):
        image = data[i][0]
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and -1 <= image.min() <= image.max() <= 1


def test_one_caption_for_all_and_flips(tmp_path):
    picture(tmp_path / "a.png", size=(32, 32))
    data = ImageFolderDataset(tmp_path, size=16, caption="a sks shape", flip=True)
    assert len(data) == 2 and data[0][1] == data[1][1] == "a sks shape"
    assert torch.equal(data[1][0], data[0][0].flip(-1))
    assert data[0][0][2, 8, 0] > 0.5 and data[1][0][2, 8, -1] > 0.5  # the blue band: left, then right


def test_metadata_jsonl(tmp_path):
    picture(tmp_path / "x.png")
    picture(tmp_path / "y.png")
    lines = [{"file_name": "y.png", "text": "why"}, {"file_name": "x.png", "text": "ex"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    data = ImageFolderDataset(tmp_path, size=8)
    assert [data[0][1], data[1][1]] == ["ex", "why"]


def test_the_crop_keeps_the_centre(tmp_path):
    """A wide image is scaled to cover the square and its centre kept: the blue band on the far left is cut off."""
    picture(tmp_path / "wide.png", size=(64, 16))
    image = ImageFolderDataset(tmp_path, size=16, caption="x")[0][0]
    assert (image[0] > 0.5).all()  # all red: the left quarter, blue, lies outside the centre square


@pytest.mark.parametrize("make, kwargs, message", [
    (lambda d: None, {}, "holds no images"),
    (lambda d: [picture(d / "a.png"), (d / "notes.txt").write_text("hi")], {"caption": "x"},
     "notes.txt has no image beside it"),
    (lambda d: picture(d / "a.png"), {}, "1 images have no caption, e.g."),
    (lambda d: (d / "bad.png").write_bytes(b"not a png"), {"caption": "x"}, "bad.png cannot be read"),
    (lambda d: picture(d / "a.png"), {"caption": "x", "size": 12}, "size must be a positive multiple of 8"),
    (lambda d: picture(d / "a.png"), {"caption": "x", "flip": "yes"}, "flip must be True or False"),
    (lambda d: [picture(d / "a.png"), (d / "metadata.jsonl").write_text('{"file_name": "b.png", "text": "t"}')],
     {}, "'b.png' is not a file in"),
    (lambda d: [picture(d / "a.png"), (d / "metadata.jsonl").write_text("nonsense")], {}, "line 1: expected"),
    (lambda d: [picture(d / "a.png"), picture(d / "b.png"),
                (d / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "t"}')], {}, "no caption for 1"),
])
def test_a_users_folder_errors_are_clear(tmp_path, make, kwargs, message):
    folder = tmp_path / "data"
    folder.mkdir()
    make(folder)
    with pytest.raises(ValueError, match=message):
        ImageFolderDataset(folder, **{"size": 16, **kwargs})


def test_a_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        ImageFolderDataset(tmp_path / "nowhere")
