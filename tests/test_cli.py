"""The `sd` command on a tiny checkpoint: PNGs with AUTOMATIC1111-style parameters, and clear errors."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sd
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


@pytest.mark.parametrize("native_bf16,expected", [(True, "bfloat16"), (False, "float32")])
def test_the_default_dtype_is_the_fast_one_and_sd_says_which(checkpoint, tmp_path, capsys, monkeypatch,
                                                              native_bf16, expected):
    """--dtype auto by default: bfloat16 on a CPU with native bf16, float32 on one without."""
    import sd.devices

    monkeypatch.setattr(sd.devices, "cpu_has_native_bf16", lambda: native_bf16)
    code = main(["generate", "a cat", "-o", str(tmp_path / "cat.png"), "--checkpoint", str(checkpoint),
                 "--device", "cpu", "--steps", "2", "--quiet"])
    assert code == 0 and f"on cpu in {expected}," in capsys.readouterr().err


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


@pytest.mark.parametrize("argv,message", [
    (["generate", "a cat", "--sampler", "plms"], "argument --sampler: invalid choice: 'plms'"),
    (["generate", "a cat", "--steps", "abc"], "argument --steps: invalid int value: 'abc' (see sd generate --help)"),
    (["paint", "a cat"], "argument COMMAND: invalid choice: 'paint'"),
])
def test_bad_arguments_are_one_line_with_exit_code_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("sd: error: ") and message in err and len(err.splitlines()) == 1


def test_python_dash_m_sd_runs():
    result = subprocess.run([sys.executable, "-m", "sd", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "generate" in result.stdout and "inpaint" in result.stdout


# --- issue 11: what a hostile new user tried ---------------------------------------------------------------------


def generate_args(checkpoint, out, *extra):
    return ["generate", "a cat", "-o", str(out), "--checkpoint", str(checkpoint), "--steps", "2", "--seed", "3",
            "--quiet", *extra]


@pytest.mark.parametrize("name,fmt", [("x.jpg", "JPEG"), ("x.webp", "WEBP"), ("x.png", "PNG")])
def test_the_output_format_follows_the_extension(checkpoint, tmp_path, name, fmt):
    from sd.files import read_parameters

    assert main(generate_args(checkpoint, tmp_path / name)) == 0
    assert Image.open(tmp_path / name).format == fmt
    assert parse_a1111_parameters(read_parameters(tmp_path / name))["Seed"] == "3"


def test_an_existing_output_is_kept_unless_overwrite(checkpoint, tmp_path, capsys):
    out = tmp_path / "out.png"
    out.write_text("my notes")
    assert main(generate_args(checkpoint, out)) == 0
    assert out.read_text() == "my notes" and Image.open(tmp_path / "out-1.png").size == (16, 16)
    assert f"wrote {tmp_path / 'out-1.png'} ({out} exists; --overwrite replaces it)" in capsys.readouterr().err
    assert main(generate_args(checkpoint, out, "--overwrite")) == 0
    assert Image.open(out).format == "PNG" and not (tmp_path / "out-2.png").exists()


@pytest.fixture
def no_model_load(monkeypatch):
    """Every check below must come before the checkpoint is read."""
    import sd.model_loader

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(sd.model_loader, "preload_models_from_standard_weights", refuse)


@pytest.mark.parametrize("extra,message", [
    (["--cfg-scale", "nan"], "cfg_scale must be a finite number, got nan"),
    (["--cfg-scale", "inf"], "cfg_scale must be a finite number, got inf"),
    (["--width", "0"], "width must be a positive integer, got 0"),
    (["--num-images", "0"], "num_images must be a positive integer"),
    (["--seed", "-5"], "--seed must be from 0 to 2**64 - 1, or -1 for a random one, got -5"),
    (["--steps", "1000", "--sampler", "ddim"], "from 1 to 999 for the ddim sampler, got 1000"),
    (["--steps", "1000", "--sampler", "dpmpp_2m"], "from 1 to 999 for the dpmpp_2m sampler"),
    (["--device", "bogus"], "device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'bogus'"),
    (["--device", "meta"], "device 'meta' is not one sd runs on"),
    (["--device", "cuda:99"], "device 'cuda:99': "),
    (["--preview", "p.gif"], "cannot write 'p.gif': images are written as .png, .jpg, .jpeg, .webp"),
])
def test_bad_values_are_one_line_before_the_model_loads(checkpoint, tmp_path, capsys, no_model_load, extra, message):
    assert main(generate_args(checkpoint, tmp_path / "x.png", *extra)) == 1
    err = capsys.readouterr().err
    assert err.startswith("sd: error: ") and message in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device,message", [("cuda", "CUDA is not available here"), ("mps", "MPS) is not available")])
def test_a_missing_gpu_is_one_line(checkpoint, tmp_path, capsys, no_model_load, device, message):
    assert main(generate_args(checkpoint, tmp_path / "x.png", "--device", device)) == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("output,message", [
    (".", "is a folder; give a file name such as"),
    ("notes.txt/x.png", "notes.txt is a file, not a folder"),
    ("x.gif", "cannot write 'x.gif'"),
    ("x", "cannot write 'x'"),
])
def test_bad_output_paths_are_refused_before_any_work(checkpoint, tmp_path, capsys, no_model_load, output, message):
    (tmp_path / "notes.txt").write_text("keep me")
    assert main(generate_args(checkpoint, tmp_path / output)) == 1
    assert message in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_img2img_with_too_few_steps_for_its_strength_is_refused(checkpoint, tmp_path, capsys, no_model_load):
    start = tmp_path / "start.png"
    Image.new("RGB", (16, 16), "red").save(start)
    assert main(["img2img", "a cat", "--image", str(start), "--steps", "1", "-o", str(tmp_path / "x.png"),
                 "--checkpoint", str(checkpoint), "--quiet"]) == 1  # strength 0.6 of 1 step: 0 steps
    assert "strength 0.6 of 1 steps runs int(1 x 0.6) = 0 steps; give at least 2 steps" in capsys.readouterr().err


def test_img2img_writes_the_steps_it_ran(checkpoint, tmp_path):
    start = tmp_path / "start.png"
    Image.new("RGB", (16, 16), "red").save(start)
    assert main(["img2img", "a cat", "--image", str(start), "--steps", "5", "--strength", "0.6",
                 "-o", str(tmp_path / "x.png"), "--checkpoint", str(checkpoint), "--quiet"]) == 0
    params = parse_a1111_parameters(Image.open(tmp_path / "x.png").text["parameters"])
    assert params["Steps"] == "5" and params["Steps run"] == "3" and params["Denoising strength"] == "0.6"


def test_seed_minus_one_is_random_and_the_seed_used_is_written(checkpoint, tmp_path):
    seeds = set()
    for name in ("a.png", "b.png"):
        assert main(generate_args(checkpoint, tmp_path / name, "--seed", "-1")) == 0
        seeds.add(parse_a1111_parameters(Image.open(tmp_path / name).text["parameters"])["Seed"])
    assert len(seeds) == 2 and "-1" not in seeds


@pytest.mark.parametrize("prompt", ["a cat\nNegative prompt: nothing", "Negative prompt: x", "a\n Negative prompt: x",
                                    "a\n\tNegative prompt: x"])
def test_a_prompt_that_would_forge_the_parameters_is_refused(checkpoint, tmp_path, capsys, prompt):
    argv = generate_args(checkpoint, tmp_path / "x.png")
    argv[1] = prompt
    assert main(argv) == 1
    assert "has a line starting 'Negative prompt:'" in capsys.readouterr().err


def test_values_with_commas_are_quoted_as_automatic1111_quotes_them():
    from pathlib import Path

    text = a1111_parameters("p", "", 20, "ddim", 7.5, 1, 64, 64, Path("my, model: v2.safetensors"), None)
    assert 'Model: "my, model: v2"' in text
    parsed = parse_a1111_parameters(text)
    assert parsed["Model"] == "my, model: v2" and parsed["Seed"] == "1" and "v2" not in parsed


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(checkpoint, tmp_path, capsys, monkeypatch):
    import errno

    real_save = Image.Image.save

    def full(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)  # some bytes reach the disk, then it is full
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))

    monkeypatch.setattr(Image.Image, "save", full)
    assert main(generate_args(checkpoint, tmp_path / "x.png")) == 1
    err = capsys.readouterr().err
    assert "sd: error: the disk is full writing" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you tried to "
                 "allocate 1073741824 bytes."),
    MemoryError(),
])
def test_out_of_memory_is_one_line(checkpoint, tmp_path, capsys, monkeypatch, error):
    import sd.pipeline

    def oom(*args, **kwargs):
        raise error

    monkeypatch.setattr(sd.pipeline, "generate", oom)
    assert main(generate_args(checkpoint, tmp_path / "x.png", "--num-images", "10000")) == 1
    assert "sd: error: out of memory: make the work smaller (sd generate: fewer or smaller images" in capsys.readouterr().err


def test_nan_weights_stop_with_where_and_warn_goes_on(tmp_path, capsys):
    import torch

    models = random_models(tiny_configs(), seed=8)
    with torch.no_grad():
        next(models["diffusion"].parameters()).view(-1)[0] = float("nan")
    broken = save_standard_weights(models, tmp_path / "broken.safetensors", metadata={IMAGE_SIZE_METADATA_KEY: "16"})
    assert main(generate_args(broken, tmp_path / "x.png")) == 1
    err = capsys.readouterr().err
    assert "sd: error: the UNet (models['diffusion']) at timestep" in err and "gave NaN or inf" in err
    assert not (tmp_path / "x.png").exists()  # a black image with exit code 0, before
    assert main(generate_args(broken, tmp_path / "x.png", "--nonfinite", "warn")) == 0
    assert "sd: warning: the UNet" in capsys.readouterr().err and (tmp_path / "x.png").exists()


def test_preview_never_replaces_a_file_it_did_not_make(checkpoint, tmp_path, capsys, no_model_load):
    (tmp_path / "mine.png").write_text("precious")
    assert main(generate_args(checkpoint, tmp_path / "x.png", "--preview", str(tmp_path / "mine.png"))) == 1
    assert "--preview" in capsys.readouterr().err and (tmp_path / "mine.png").read_text() == "precious"
    assert main(generate_args(checkpoint, tmp_path / "x.png", "--preview", str(tmp_path / "x.png"))) == 1
    assert "is also the output or an input" in capsys.readouterr().err


def test_an_exif_rotated_image_and_its_mask_are_compared_as_shown(checkpoint, tmp_path, capsys):
    """A phone photo stored 24x16 with orientation 6 is shown 16x24: a 16x24 mask drawn on it fits (it was refused),
    a 24x16 one does not (it was accepted, and lay across the rotated image)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (24, 16), "red").save(tmp_path / "photo.jpg", exif=exif)
    Image.new("L", (16, 24), 255).save(tmp_path / "upright.png")
    Image.new("L", (24, 16), 255).save(tmp_path / "stored.png")
    common = ["inpaint", "a cat", "--image", str(tmp_path / "photo.jpg"), "--checkpoint", str(checkpoint),
              "--steps", "2", "--height", "16", "--width", "16", "--quiet"]
    assert main([*common, "--mask", str(tmp_path / "upright.png"), "-o", str(tmp_path / "a.png")]) == 0
    assert main([*common, "--mask", str(tmp_path / "stored.png"), "-o", str(tmp_path / "b.png")]) == 1
    assert "mask_image is 24x16 but input_image is 16x24 (as shown" in capsys.readouterr().err


def test_a_folder_as_image_is_named_as_such(checkpoint, tmp_path, capsys, no_model_load):
    assert main(["img2img", "a cat", "--image", str(tmp_path), "-o", str(tmp_path / "x.png"),
                 "--checkpoint", str(checkpoint)]) == 1
    assert "is a folder; give an image file" in capsys.readouterr().err


def test_absurd_image_counts_are_refused_at_once(checkpoint, tmp_path, capsys):
    assert main(generate_args(checkpoint, tmp_path / "x.png", "--num-images", "100000000")) == 1
    assert "need at least" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_debug_shows_the_traceback(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="device must be"):
        main(generate_args(checkpoint, tmp_path / "x.png", "--device", "bogus", "--debug"))


def test_train_argument_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), "--steps", "0", "--vae-steps", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sd: error: ") and "steps" in err and "Traceback" not in err


def _complete(folder) -> list[str]:
    """Every file in folder, each of which must be a whole image; no temporary file may be left."""
    names = sorted(p.name for p in folder.iterdir())
    assert not [n for n in names if n.endswith(".tmp")], names
    for name in names:
        with Image.open(folder / name) as image:
            image.load()  # raises on a truncated file
    return names


@pytest.mark.parametrize("moment", ["loading", "generating", "first image written", "fifth image written",
                                    "SIGTERM: first image written"])
def test_ctrl_c_at_any_moment_leaves_only_complete_images(checkpoint, tmp_path, moment):
    """SIGINT during the save loop once left an unreadable PNG. The process is interrupted when its stderr shows
    the moment; exit code 130 (or 0 if it finished first, or the signal itself if it came as Python was ending),
    and the output folder holds only whole images. SIGTERM (kill, a scheduler's time limit) stops it the same way."""
    import signal

    stop = signal.SIGINT
    if moment.startswith("SIGTERM: "):
        stop, moment = signal.SIGTERM, moment[len("SIGTERM: "):]
    out = tmp_path / "out"
    triggers = {"loading": "sd: checkpoint", "generating": "sd: checkpoint", "first image written": "sd: wrote",
                "fifth image written": "sd: wrote"}
    skip = {"fifth image written": 4, "generating": 0}.get(moment, 0)
    proc = subprocess.Popen([sys.executable, "-m", "sd", "generate", "a cat", "-o", str(out / "x.png"),
                             "--checkpoint", str(checkpoint), "--num-images", "40", "--steps", "2", "--quiet",
                             "--preview", str(out / "preview.png")],
                            stderr=subprocess.PIPE, text=True)
    seen = 0
    for line in proc.stderr:
        if line.startswith(triggers[moment]):
            if seen == skip:
                if moment == "generating":
                    __import__("time").sleep(0.3)
                proc.send_signal(stop)
                break
            seen += 1
    rest = proc.stderr.read()
    code = proc.wait(timeout=120)
    images = [name for name in _complete(out) if name.startswith("x-")] if out.exists() else []
    if code == -stop:  # it came as Python was ending, after putting back the signal's default action: all is done
        assert len(images) == 40 and "Traceback" not in rest and "sd: interrupted" not in rest, rest
        return
    assert code in (0, 130), rest
    if code == 130:
        assert "sd: interrupted" in rest and "Traceback" not in rest
    assert code == 0 or len(images) < 40  # interrupted: some images are missing, none is broken


def test_a_ctrl_c_that_a_library_turns_into_another_error_still_reads_as_one(monkeypatch, capsys):
    """CI saw a Ctrl-C during loading come out as "sd: error: could not determine the shape of object type
    'torch.storage.UntypedStorage'" (exit 1): an extension caught the KeyboardInterrupt and raised its own error.
    The command remembers the signal, so any error after it is an interruption."""
    import signal

    import sd.cli

    def load_in_an_extension(argv):
        try:
            signal.raise_signal(signal.SIGINT)
            sum(range(10))  # the KeyboardInterrupt is raised here, at the next bytecode
        except KeyboardInterrupt:
            raise TypeError("could not determine the shape of object type 'torch.storage.UntypedStorage'") from None

    monkeypatch.setattr(sd.cli, "run_command", load_in_an_extension)
    assert main(["generate", "a cat"]) == 130
    assert capsys.readouterr().err == "sd: interrupted\n"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_ctrl_c_inside_a_string_exec_still_exits_130_under_python_m(tmp_path):
    """CI saw `python -m sd` say "sd: interrupted" and then die of SIGINT (-2): the Ctrl-C had landed in a
    dataclass's `exec` while transformers was being imported, and CPython then ends a `-m` run by the signal
    whatever code it returns. The command clears that mark once it has handled the interruption."""
    package = tmp_path / "interrupted_in_exec"
    package.mkdir()
    (package / "__main__.py").write_text(
        "import sys\n"
        "import sd.cli\n"
        "def load_as_transformers_does(argv):\n"
        "    exec('import signal; signal.raise_signal(signal.SIGINT); built = 1')\n"
        "sd.cli.run_command = load_as_transformers_does\n"
        "sys.exit(sd.cli.main(['generate', 'a cat']))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(sd.__file__).parents[1])])}
    result = subprocess.run([sys.executable, "-m", package.name], capture_output=True, text=True, env=env,
                            timeout=120)
    assert (result.returncode, result.stderr) == (130, "sd: interrupted\n")


def test_speedups_are_options_and_are_written_in_the_image(checkpoint, tmp_path):
    out = tmp_path / "fast.png"
    code = main(["generate", "a cat", "-o", str(out), "--checkpoint", str(checkpoint), "--steps", "4", "--seed", "3",
                 "--tome", "--deepcache", "--attention-slice-size", "64", "--vae-tiling", "--quiet"])
    params = parse_a1111_parameters(Image.open(out).text["parameters"])
    assert code == 0 and params["Token merging ratio"] == "0.5" and params["DeepCache interval"] == "3"
    plain = tmp_path / "plain.png"
    main(["generate", "a cat", "-o", str(plain), "--checkpoint", str(checkpoint), "--steps", "4", "--seed", "3",
          "--tome", "0", "--deepcache", "1", "--quiet"])
    assert "Token merging ratio" not in Image.open(plain).text["parameters"]


@pytest.mark.parametrize("option,message", [
    (["--tome", "1"], "tome_ratio must be a finite number in [0, 1) (0: off, e.g. 0.5), got 1.0"),
    (["--deepcache", "-3"], "deepcache_interval must be a whole number of UNet calls >= 0"),
    (["--attention-slice-size", "-1"], "attention_slice_size must be a positive number of query tokens"),
])
def test_bad_speedup_options_are_refused_before_loading(tmp_path, capsys, option, message):
    code = main(["generate", "a cat", "-o", str(tmp_path / "x.png"), "--checkpoint", str(tmp_path / "none.ckpt"),
                 *option])
    err = capsys.readouterr().err
    assert code == 1 and message in err and "none.ckpt" not in err.split("error:")[1]  # before the missing file
