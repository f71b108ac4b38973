"""The `sd` command on a tiny checkpoint: PNGs with AUTOMATIC1111-style parameters, and clear errors."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from reference import random_models, tiny_configs
from sd.cli import a1111_parameters, main, parse_a1111_parameters
from sd.model_loader import IMAGE_SIZE_METADATA_KEY, save_standard_weights


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny-shapes.safetensors"
    return save_standard_weights(random_models(tiny_configs(), seed=8), path, metadata={IMAGE_SIZE_METADATA_KEY: "16"})


def test_generate_writes_a_png_with_parameters(checkpoint, tmp_path, capsys):
    out = tmp_path / "cat.png"
    code = main(["generate", "a red circle on a blue background", "-o", str(out), "--checkpoint", str(checkpoint),
                 "--seed", "42", "--steps", "3", "--negative-prompt", "blurry", "--quiet"])
    assert code == 0
    image = Image.open(out)
    assert image.size == (16, 16)  # the checkpoint's training size, from its metadata
    params = parse_a1111_parameters(image.text["parameters"])
    assert params["prompt"] == "a red circle on a blue background" and params["negative_prompt"] == "blurry"
    assert params["Steps"] == "3" and params["Seed"] == "42" and params["Sampler"] == "DPM++ 2M Karras"
    assert params["Size"] == "16x16" and params["Model"] == "tiny-shapes" and len(params["Model hash"]) == 10
    assert "tiny-shapes.safetensors" in capsys.readouterr().err  # it says which model it used
    again = tmp_path / "again.png"
    main(["generate", "a red circle on a blue background", "-o", str(again), "--checkpoint", str(checkpoint),
          "--seed", "42", "--steps", "3", "--negative-prompt", "blurry", "--quiet"])
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(image))


def test_preview_file_is_written_during_generation(checkpoint, tmp_path, monkeypatch):
    import sd.cli

    writes = []
    real = sd.cli._preview_writer

    def counting(*args):
        write = real(*args)
        return lambda *step: (write(*step), writes.append(Image.open(args[1]).size))

    monkeypatch.setattr(sd.cli, "_preview_writer", counting)
    preview = tmp_path / "watch" / "preview.png"
    code = main(["generate", "a cat", "-o", str(tmp_path / "cat.png"), "--checkpoint", str(checkpoint), "--seed", "1",
                 "--steps", "3", "--num-images", "2", "--preview", str(preview), "--quiet"])
    assert code == 0 and writes == [(32, 16)] * 3  # every step, both images side by side at the output size


def test_img2img_inpaint_and_batches(checkpoint, tmp_path):
    start = tmp_path / "start.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(start)
    mask = tmp_path / "mask.png"
    Image.fromarray(np.tile(np.array([0] * 8 + [255] * 8, dtype=np.uint8), (16, 1))).save(mask)
    common = ["--checkpoint", str(checkpoint), "--steps", "2", "--seed", "1", "--quiet"]
    assert main(["img2img", "a cat", "--image", str(start), "--strength", "0.5", "-o", str(tmp_path / "i.png"),
                 "--num-images", "2", *common]) == 0
    params = parse_a1111_parameters(Image.open(tmp_path / "i-1.png").text["parameters"])
    assert params["Denoising strength"] == "0.5" and params["Batch size"] == "2" and params["Batch pos"] == "1"
    assert main(["inpaint", "a cat", "--image", str(start), "--mask", str(mask), "--paste-back",
                 "-o", str(tmp_path / "p.png"), *common]) == 0
    pasted = np.asarray(Image.open(tmp_path / "p.png"))
    assert np.array_equal(pasted[:, :8], np.asarray(Image.open(start))[:, :8])


def test_parameters_round_trip():
    from pathlib import Path

    text = a1111_parameters("a, b\nc", "x", 20, "euler_a", 7.0, 5, 512, 768, Path("w/v1-5.safetensors"), "0123456789",
                            strength=0.75)
    assert text.splitlines()[-1] == ("Steps: 20, Sampler: Euler a, CFG scale: 7.0, Seed: 5, Size: 512x768, "
                                     "Model hash: 0123456789, Model: v1-5, Denoising strength: 0.75")
    parsed = parse_a1111_parameters(text)
    assert parsed["prompt"] == "a, b\nc" and parsed["negative_prompt"] == "x" and parsed["Size"] == "512x768"


@pytest.mark.parametrize("argv,message", [
    (["generate", "a cat", "--checkpoint", "weights/nope.safetensors"], "checkpoint not found"),
    (["img2img", "a cat", "--image", "nope.png"], "image not found"),
    (["generate", "a cat", "--steps", "0"], "n_inference_steps"),
    (["generate", "a cat", "--height", "15"], "height must be a positive multiple"),
])
def test_errors_are_one_line_messages(checkpoint, argv, message, capsys, tmp_path):
    if "--checkpoint" not in argv:
        argv = [*argv, "--checkpoint", str(checkpoint)]
    assert main([*argv, "-o", str(tmp_path / "x.png"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_arguments_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "a cat", "--sampler", "plms"])
    assert info.value.code == 2 and "invalid choice: 'plms'" in capsys.readouterr().err


def test_python_dash_m_sd_runs():
    result = subprocess.run([sys.executable, "-m", "sd", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "generate" in result.stdout and "inpaint" in result.stdout
