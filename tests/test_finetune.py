"""`sd train --data`: LoRA and full fine-tuning on a folder of pictures, DreamBooth's prior preservation, and the
same run on two gloo processes under torchrun (issue 14)."""

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from sd.lora import apply_lora
from sd.model_loader import save_standard_weights
from sd.training.command import main
from sd.training.datasets import draw
from sd.training.distributed import World, world_from_env
from sd.training.progress import read_log

from reference import random_models, tiny_configs
from test_lora import close, diffusers_outputs, inputs

PICTURES = [("circle", "blue"), ("square", "black"), ("triangle", "white"), ("circle", "yellow")]
QUICK = ["--size", "32", "--sample-every", "0", "--device", "cpu"]


@pytest.fixture
def data(tmp_path) -> Path:
    """Four purple shapes (a colour the prompts call 'sks'), each with its caption beside it."""
    folder = tmp_path / "data"
    folder.mkdir()
    for i, (shape, background) in enumerate(PICTURES):
        draw(shape, "purple", background, size=48).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a sks {shape} on a {background} background")
    return folder


def train(*argv) -> None:
    main([str(a) for a in argv])


def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def largest_difference(a: Path, b: Path) -> float:
    x, y = lora_tensors(a), lora_tensors(b)
    assert x.keys() == y.keys()
    return max((x[key].float() - y[key].float()).abs().max().item() for key in x)


def assert_close_files(a: Path, b: Path, atol: float = 1e-6) -> None:
    assert largest_difference(a, b) <= atol


# --- LoRA ------------------------------------------------------------------------------------------------------------

def test_lora_run_writes_a_kohya_file_with_its_settings_a_log_and_a_loss_curve(data, tmp_path):
    out = tmp_path / "out"
    train("--data", data, "--out", out, "--lora-rank", 4, "--lora-alpha", 2, "--steps", 6, "--batch-size", 2,
          "--checkpoint-every", 3, *QUICK)
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        metadata, keys = f.metadata(), list(f.keys())
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2"
    assert metadata["ss_max_train_steps"] == "6" and metadata["ss_resolution"] == "(32, 32)"
    assert metadata["ss_num_train_images"] == "4" and metadata["ss_network_train_unet_only"] == "True"
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert [row["step"] for row in read_log(out / "checkpoints" / "log.csv")] == [1, 2, 3, 4, 5, 6]
    assert Image.open(out / "checkpoints" / "loss.png").format == "PNG"
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-3.safetensors", "checkpoint-6.safetensors"]


def test_a_lora_in_bf16_with_gradient_checkpointing_trains_the_same_as_without(data, tmp_path):
    """Gradient checkpointing recomputes the same activations: the same LoRA up to float rounding."""
    common = ["--data", data, "--lora-rank", 4, "--steps", 3, "--lr", "1e-3", "--base-dtype", "bf16", *QUICK]
    train(*common, "--out", tmp_path / "plain")
    train(*common, "--out", tmp_path / "checkpointed", "--gradient-checkpointing")
    assert_close_files(tmp_path / "plain" / "lora.safetensors", tmp_path / "checkpointed" / "lora.safetensors", 1e-5)
    assert all(t.dtype == torch.float32 for t in lora_tensors(tmp_path / "plain" / "lora.safetensors").values())


def test_the_lora_sd_train_writes_loads_in_diffusers_to_our_outputs(data, tmp_path):
    """A tiny random base saved as a checkpoint, a LoRA trained on it by `sd train` (UNet with conv, and CLIP):
    diffusers' load_lora_weights + fuse_lora and our apply_lora give the same UNet and CLIP outputs."""
    base = random_models(tiny_configs(), seed=11)
    save_standard_weights(base, checkpoint := tmp_path / "tiny.safetensors")
    out = tmp_path / "out"
    train("--data", data, "--checkpoint", checkpoint, "--out", out, "--lora-rank", 4, "--lora-alpha", 8,
          "--lora-targets", "attention,projection,conv", "--train-text-encoder", "--steps", 5, "--lr", "3e-2",
          "--size", 16, "--sample-every", 0, "--device", "cpu")
    latents, context, t, ids = inputs()
    with torch.no_grad():
        plain = base["diffusion"](latents, context, t)
        with apply_lora(base, out / "lora.safetensors"):
            ours = base["diffusion"](latents, context, t), base["clip"](ids)
    assert not close(ours[0], plain, 1e-3)  # it learnt something: the check below is not of the base alone
    unet, clip = diffusers_outputs(random_models(tiny_configs(), seed=11), out / "lora.safetensors")
    assert close(unet, ours[0]) and close(clip, ours[1])


# --- DreamBooth and the full fine-tune -------------------------------------------------------------------------------

def test_class_images_are_made_once_and_the_prior_loss_weight_counts(data, tmp_path):
    common = ["--data", data, "--lora-rank", 4, "--steps", 3, "--lr", "1e-3", "--caption", "a sks shape", *QUICK]
    prior = ["--class-data", tmp_path / "class", "--class-prompt", "a shape", "--num-class-images", 3]
    train(*common, *prior, "--out", tmp_path / "weight0", "--prior-loss-weight", 0)
    made = sorted((tmp_path / "class").iterdir())
    assert [p.name for p in made] == ["class-0000.png", "class-0001.png", "class-0002.png"]
    stamps = [p.stat().st_mtime_ns for p in made]
    train(*common, *prior, "--out", tmp_path / "weight1")
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "class").iterdir())] == stamps  # not made again
    train(*common, "--out", tmp_path / "none")
    files = {run: tmp_path / run / "lora.safetensors" for run in ("weight0", "weight1", "none")}
    # Weight 0: the class images change nothing but the rounding of a batch twice as large. Three Adam steps of
    # lr 1e-3 move a weight by up to 3e-3: the runs agree to 1% of that, and weight 1 moves them by more than 10%.
    assert largest_difference(files["weight0"], files["none"]) <= 3e-5
    assert largest_difference(files["weight1"], files["none"]) > 3e-4


def test_a_full_fine_tune_writes_a_model_that_generates(data, tmp_path):
    out = tmp_path / "out"
    train("--data", data, "--out", out, "--steps", 2, "--flip", *QUICK)
    result = subprocess.run([sys.executable, "-m", "sd", "generate", "a sks circle", "--checkpoint",
                             out / "model.safetensors", "-o", tmp_path / "x.png", "--steps", "2", "--quiet"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "x.png").size == (64, 64)


# --- bad inputs, each refused before the base model loads -------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--lora-rank", "0"], "--lora-rank must be a positive integer, got 0"),
    (["--lora-rank", "4", "--lora-alpha", "nan"], "--lora-alpha must be a finite number > 0, got nan"),
    (["--lora-alpha", "4"], "--lora-alpha needs --lora-rank"),
    (["--lora-rank", "4", "--lora-targets", "attention,mlp"], "--lora-targets must be some of attention, "),
    (["--size", "30"], "--size must be a positive multiple of 8 pixels"),
    (["--size", "100000"], "--size 100000 with 1 image(s) a step needs at least"),
    (["--base-dtype", "bf16"], "--base-dtype bf16 keeps the base frozen in half precision, which only a LoRA"),
    (["--lora-rank", "4", "--base-dtype", "fp16"], "--base-dtype fp16 needs a CUDA device"),
    (["--class-data", "cls"], "--class-data needs --class-prompt"),
    (["--class-prompt", "a dog"], "--class-prompt needs --class-data"),
    (["--class-data", "data", "--class-prompt", "a dog"], "--class-data must be another folder than --data"),
    (["--vae-steps", "10"], "--vae-steps belongs to training the shapes model from scratch"),
    (["--checkpoint", "nowhere.safetensors"], "--checkpoint nowhere.safetensors: no such file"),
    (["--caption-dropout", "2"], "--caption-dropout must be a number from 0 to 1, got 2"),
    (["--prior-loss-weight", "-1"], "--prior-loss-weight must be a finite number >= 0"),
    (["--grad-accum", "0"], "--grad-accum must be a positive integer, got 0"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--lora-rank", "4", "--export", "x.ckpt"], "a LoRA is written as .safetensors"),
])
def test_bad_options_are_refused_before_anything_loads(data, tmp_path, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sd.training.finetune.preload_models_from_standard_weights",
                        lambda *a, **k: pytest.fail("the base model was loaded"))
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("(", r"\(").replace(")", r"\)")):
        train("--data", data, "--out", tmp_path / "out", *extra)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("make, message", [
    (lambda d: [p.unlink() for p in d.iterdir()], "holds no images"),
    (lambda d: (d / "img0.png").unlink(), "caption file .*img0.txt has no image beside it"),
    (lambda d: (d / "img1.txt").unlink(), "1 images have no caption"),
    (lambda d: (d / "img2.png").write_bytes(b"not a png"), "training image .*img2.png cannot be read"),
])
def test_bad_folders_are_refused(data, tmp_path, make, message):
    make(data)
    with pytest.raises(ValueError, match=message):
        train("--data", data, "--out", tmp_path / "out", "--lora-rank", 4)


def test_an_existing_result_or_run_is_kept_without_overwrite(data, tmp_path):
    common = ["--data", data, "--out", tmp_path / "out", "--lora-rank", 4, "--steps", 2, *QUICK]
    train(*common)
    before = (tmp_path / "out" / "lora.safetensors").read_bytes()
    with pytest.raises(ValueError, match="lora.safetensors already exists: give another --export, or --overwrite"):
        train(*common)
    assert (tmp_path / "out" / "lora.safetensors").read_bytes() == before
    train(*common, "--overwrite", "--lr", "1e-2")
    assert (tmp_path / "out" / "lora.safetensors").read_bytes() != before


# --- two processes ---------------------------------------------------------------------------------------------------

def test_each_rank_takes_its_part_of_every_micro_batch():
    """3 ranks, batch 2, 2 micro-batches: rank r's micro-batch i is one process's micro-batch i of 6, its r-th pair."""
    shares = [World(rank, 3).positions(batch_size=2, grad_accum=2) for rank in range(3)]
    assert shares == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11]]
    assert sorted(sum(shares, [])) == list(range(12))


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE is set but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT is not: start"),
    ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"}, "RANK 2 must be below"),
    ({"WORLD_SIZE": "two", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"},
     "WORLD_SIZE must be a whole number"),
])
def test_a_broken_torchrun_environment_is_refused(monkeypatch, env, message):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        world_from_env()


def torchrun(n: int, *argv, command: str = "train") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
               "-m", "sd", command, *map(str, argv)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("kind", [["--lora-rank", "4"], ["--grad-accum", "2", "--train-text-encoder"]])
def test_two_gloo_processes_train_what_one_does_with_the_doubled_batch_and_resume_on_one(data, tmp_path, kind):
    """K steps on 2 processes (batch 1 each) = K steps on 1 (batch 2), same data order; and a run killed after its
    step-2 checkpoint, resumed on 1 process, ends where the 2-process run did."""
    common = ["--data", data, "--steps", 4, "--checkpoint-every", 2, "--lr", "1e-3", *QUICK, *kind]
    result = torchrun(2, *common, "--out", tmp_path / "two", "--batch-size", 1)
    assert "effective batch 1 x 2 process(es)" in result.stderr
    assert result.stdout.count("wrote ") == 1  # rank 0 alone writes
    train(*common, "--out", tmp_path / "one", "--batch-size", 2)
    name = "lora.safetensors" if "--lora-rank" in kind else "model.safetensors"
    last = Path("checkpoints") / "checkpoint-4.safetensors"  # float32 weights, EMA and Adam's state
    # Adam moves a weight by at most about lr a step (4e-3 in all); where a gradient is near 0, its update turns on
    # the gradient's rounding, which differs between one batch of 2 and two of 1: the runs agree to 2% of that.
    tolerance = 0.02 * 1e-3 * 4
    assert_close_files(tmp_path / "two" / last, tmp_path / "one" / last, tolerance)

    # The state a kill after step 3 leaves: the step-2 checkpoint, nothing after it.
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "two", killed)
    (killed / name).unlink()
    (killed / last).unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same effective batch on another world size: no changed setting
        train(*common, "--out", killed, "--batch-size", 2, "--resume", killed / "checkpoints" / "checkpoint-2.safetensors")
    assert_close_files(killed / last, tmp_path / "two" / last, tolerance)
    assert (killed / name).is_file()


# --- the log ---------------------------------------------------------------------------------------------------------

def test_a_log_cut_short_by_a_crash_reads_up_to_its_last_whole_row_and_plots(tmp_path):
    from sd.training.progress import TrainingLog, plot_losses

    log = TrainingLog(tmp_path, done=0)
    for step in range(1, 6):
        log.add(step, 1.0 / step, 1e-4, step * 0.5)
    log.close()
    with open(tmp_path / "log.csv", "a") as f:
        f.write("6,0.1")  # a crash in the middle of a row
    assert [row["step"] for row in read_log(tmp_path / "log.csv")] == [1, 2, 3, 4, 5]
    resumed = TrainingLog(tmp_path, done=3)  # a run resumed at step 3 keeps rows 1-3 and goes on after them
    resumed.add(4, 0.3, 1e-4, 0.5)
    resumed.close()
    assert [row["step"] for row in read_log(tmp_path / "log.csv")] == [1, 2, 3, 4]
    image = Image.open(plot_losses(resumed.rows, tmp_path / "loss.png"))
    colours = np.unique(np.asarray(image).reshape(-1, 3), axis=0)
    assert image.size == (720, 400) and len(colours) > 2  # axes, curves and labels were drawn



# --- sharing out a batch of images -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedded():
    from sd.cli import EMBEDDED_CHECKPOINT
    from sd.model_loader import preload_models_from_standard_weights
    return preload_models_from_standard_weights(EMBEDDED_CHECKPOINT)


@pytest.mark.parametrize("sampler", ["euler_a", "ddpm"])
def test_a_share_of_the_batch_is_exactly_those_images_of_the_whole(embedded, sampler):
    """rows draws every noise (the start and each ancestral step's) for the whole batch and keeps its rows."""
    from sd.pipeline import generate
    common = dict(prompt=["a red circle on a blue background", "a yellow square on a black background"],
                  models=embedded, num_images=2, seed=3, sampler_name=sampler, n_inference_steps=4, progress=False)
    whole = generate(**common)
    assert np.array_equal(generate(**common, rows=[1, 2]), whole[[1, 2]])


@pytest.mark.parametrize("rows, message", [([2, 1], "in order, each once"), ([0, 4], "images 0..3"), ([], "rows must"),
                                           ([1.5], "rows must")])
def test_bad_rows_are_refused(embedded, rows, message):
    from sd.pipeline import generate
    with pytest.raises(ValueError, match=message):
        generate("a cat", models=embedded, num_images=4, seed=0, rows=rows, progress=False)


def test_two_processes_share_out_sd_generate_under_the_single_run_names(tmp_path):
    """torchrun sd generate --num-images 3: rank 0 makes images 0 and 2, rank 1 image 1, named as one process names
    them; in float32 the pixels are one process's (to 1/255: the processes run on one thread each)."""
    args = ["a red circle on a blue background", "--num-images", 3, "--seed", 7, "--steps", 4, "--dtype", "float32",
            "--quiet"]
    (tmp_path / "two").mkdir()
    torchrun(2, *args, "-o", tmp_path / "two" / "x.png", command="generate")
    result = subprocess.run([sys.executable, "-m", "sd", "generate", *map(str, args), "-o", str(tmp_path / "x.png")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["x-0.png", "x-1.png", "x-2.png"]
    for i in range(3):
        a, b = (np.asarray(Image.open(folder / f"x-{i}.png"), dtype=np.int16) for folder in (tmp_path, tmp_path / "two"))
        assert np.abs(a - b).max() <= 1
        assert Image.open(tmp_path / "two" / f"x-{i}.png").text["parameters"] == \
            Image.open(tmp_path / f"x-{i}.png").text["parameters"]


@pytest.mark.parametrize("extra, message", [
    ([], "under torchrun, give --seed: every process must draw the same batch"),
    (["--seed", "1", "--num-images", "1"], "--num-images 1 leaves nothing for rank 1 of 2"),
])
def test_sd_generate_under_torchrun_refuses_what_cannot_be_shared(tmp_path, monkeypatch, extra, message):
    from sd.cli import main as sd_main
    for name, value in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="localhost", MASTER_PORT="1").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        sd_main(["--debug", "generate", "a cat", "-o", str(tmp_path / "x.png"), *extra])
    assert not list(tmp_path.iterdir())


# --- Ctrl-C -------------------------------------------------------------------------------------------------------------

def test_ctrl_c_in_a_lora_run_keeps_the_last_step_and_going_on_gives_the_same_lora(data, tmp_path, monkeypatch):
    import itertools
    import signal

    import sd.training.train
    from sd.training.train import TrainingInterrupted

    common = ["--data", data, "--lora-rank", 4, "--steps", 6, "--batch-size", 2, "--lr", "1e-3", *QUICK]
    train(*common, "--out", tmp_path / "whole")
    calls, real = itertools.count(), sd.training.train.encode_captions

    def encode_captions(clip, captions, tokenizer=None):
        if next(calls) == 3:  # in step 4: steps 1-3 are done
            signal.raise_signal(signal.SIGINT)
        return real(clip, captions, tokenizer)

    monkeypatch.setattr(sd.training.train, "encode_captions", encode_captions)
    cut = tmp_path / "cut"
    with pytest.raises(TrainingInterrupted) as info:
        train(*common, "--out", cut)
    assert (info.value.step, info.value.checkpoint) == (3, cut / "checkpoints" / "checkpoint-3.safetensors")
    assert not (cut / "lora.safetensors").exists()
    monkeypatch.undo()
    train(*common, "--out", cut, "--resume", info.value.checkpoint)
    assert largest_difference(cut / "lora.safetensors", tmp_path / "whole" / "lora.safetensors") == 0
