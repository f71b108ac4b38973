"""Training loop (sd.training.train) on tiny models and a tiny dataset of coloured squares: the losses go down, a resumed run
continues exactly, the random draws and EMA behave as configured, and the export loads back. `sd train` (main): the
same seed gives the same model, every argument is checked before any work, a checkpoint resumes only its own run,
and Ctrl-C saves the last step done (a file being written is finished first). In a real process:
test_train_interrupt.py."""

import dataclasses
import itertools
import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import sd.training.command
import sd.training.train
from sd.training.progress import read_log
from reference import tiny_configs
from sd.checks import NonFiniteError
from sd.devices import best_device
from sd.model_loader import build_models, preload_models_from_standard_weights
from sd.interrupts import deferred_sigint
from sd.training.train import (TrainConfig, TrainingInterrupted, VAETrainConfig, checkpoint_path, export, load_ema,
                               train_diffusion, train_vae)
from sd.training.command import build_parser, main, make_plan

COLOURS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0), "white": (1.0, 1.0, 1.0)}


class Squares:
    """A half-size square of one of four colours at a position fixed by i, on black; 'a red square'."""

    def __init__(self, length: int = 32, size: int = 16):
        self.length, self.size = length, size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        name = list(COLOURS)[i % len(COLOURS)]
        side = self.size // 2
        y, x = torch.randint(0, self.size - side + 1, (2,), generator=torch.Generator().manual_seed(i)).tolist()
        image = -torch.ones(3, self.size, self.size)
        image[:, y:y + side, x:x + side] = torch.tensor(COLOURS[name]).view(3, 1, 1)
        return image, f"a {name} square"


def tiny_models(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return build_models(tiny_configs())  # PyTorch's default init: a UNet whose outputs start small


def quick(**overrides) -> TrainConfig:
    return TrainConfig(**{"steps": 4, "batch_size": 4, "lr": 1e-3, "warmup_steps": 0, **overrides})


def mean(values) -> float:
    return sum(values) / len(values)


def test_diffusion_loss_goes_down(tmp_path):
    losses = train_diffusion(tiny_models(), Squares(), quick(steps=50), tmp_path, progress=False)
    assert len(losses) == 50
    # measured: 0.80 -> 0.19 (ratio 0.23; 0.29 and 0.32 with seeds 1 and 2)
    assert mean(losses[-10:]) < 0.8 * mean(losses[:10]), losses


def test_vae_loss_goes_down(tmp_path):
    models = tiny_models()
    cfg = VAETrainConfig(steps=30, batch_size=4, lr=1e-3, warmup_steps=0, kl_weight=1e-3)
    losses = train_vae(models["encoder"], models["decoder"], Squares(), cfg, tmp_path, progress=False)
    assert mean(losses[-5:]) < 0.8 * mean(losses[:5]), losses  # measured: 0.62 -> 0.27 (ratio 0.43)


def test_resume_continues_exactly(tmp_path):
    cfg = quick(steps=8, checkpoint_every=4, caption_dropout=0.5)
    full = train_diffusion(tiny_models(), Squares(), cfg, tmp_path / "full", progress=False)
    assert checkpoint_path(tmp_path / "full", 4).is_file()

    # Fresh models: the trained ones (UNet, CLIP) come from the checkpoint, the frozen VAE must be the same one.
    resumed = train_diffusion(tiny_models(), Squares(), cfg, tmp_path / "resumed", progress=False,
                              resume_from=checkpoint_path(tmp_path / "full", 4))
    assert resumed == full[4:]  # bit-identical
    a, b = (load_file(str(checkpoint_path(tmp_path / run, 8))) for run in ("full", "resumed"))
    assert a.keys() == b.keys()
    assert any(k.startswith("optimizer.diffusion.") and k.endswith(".exp_avg_sq") for k in a)
    assert any(k.startswith("ema.clip.") for k in a)  # the text encoder trains by default
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_caption_dropout_rate(tmp_path, monkeypatch):
    seen = []
    real_encode = sd.training.train.encode_captions
    monkeypatch.setattr(sd.training.train, "encode_captions", lambda clip, captions, tokenizer=None:
                        seen.extend(captions) or real_encode(clip, captions, tokenizer))
    train_diffusion(tiny_models(), Squares(), quick(steps=3, batch_size=50, caption_dropout=0.3), tmp_path,
                    progress=False)
    assert len(seen) == 150
    assert 25 <= seen.count("") <= 65  # 45 expected; the standard deviation is 5.6
    assert all(c == "" or c.startswith("a ") for c in seen)

    seen.clear()
    train_diffusion(tiny_models(), Squares(), quick(steps=1, caption_dropout=0.0), tmp_path / "none", progress=False)
    assert seen and "" not in seen


def test_ema_moves_toward_weights(tmp_path):
    models = tiny_models()
    before = {k: v.clone() for k, v in models["diffusion"].state_dict().items()}
    train_diffusion(models, Squares(), quick(steps=1), tmp_path, progress=False)
    after = models["diffusion"].state_dict()
    ema = load_ema(models, checkpoint_path(tmp_path, 1))["diffusion"].state_dict()
    assert ema["final.conv.weight"].ne(after["final.conv.weight"]).any()
    # The first update uses decay min(0.9999, 1/10): ema = 0.1 * init + 0.9 * weights.
    for key in before:
        torch.testing.assert_close(ema[key], before[key] + 0.9 * (after[key] - before[key]))


def test_gradient_accumulation_matches_one_big_batch(tmp_path, monkeypatch):
    grads = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm):
        params = list(params)
        grads.append([p.grad.clone() for p in params])
        return real_clip(params, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    one = train_diffusion(tiny_models(), Squares(), quick(steps=1, batch_size=4), tmp_path / "a", progress=False)
    two = train_diffusion(tiny_models(), Squares(), quick(steps=1, batch_size=2, grad_accum=2), tmp_path / "b",
                          progress=False)
    assert one[0] == pytest.approx(two[0], rel=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_export_loads_back_as_the_ema_weights(tmp_path, dtype):
    models = tiny_models()
    train_diffusion(models, Squares(), quick(steps=2), tmp_path, progress=False)
    ema = load_ema(models, checkpoint_path(tmp_path, 2))
    path = export(ema, tmp_path / "model.safetensors", dtype=dtype)
    loaded = preload_models_from_standard_weights(path)
    for name in ("clip", "diffusion", "encoder", "decoder"):
        expected, got = ema[name].state_dict(), loaded[name].state_dict()
        for key, value in got.items():
            assert value.dtype == torch.float32
            if dtype is None:
                assert torch.equal(value, expected[key]), (name, key)
            else:
                torch.testing.assert_close(value, expected[key], rtol=1e-3, atol=1e-4)


def test_samples_frozen_text_encoder_and_bf16(tmp_path):
    models = tiny_models()
    clip_before = {k: v.clone() for k, v in models["clip"].state_dict().items()}
    cfg = quick(steps=2, sample_every=2, sample_prompts=["a red square", "a blue square"], sample_steps=2,
                mixed_precision="bf16", train_text_encoder=False)
    losses = train_diffusion(models, Squares(), cfg, tmp_path, progress=False)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step-2-0.png", "step-2-1.png"]
    assert all(torch.equal(v, clip_before[k]) for k, v in models["clip"].state_dict().items())
    saved = load_file(str(checkpoint_path(tmp_path, 2)))
    assert not any(k.startswith("model.clip.") for k in saved)


@pytest.mark.parametrize("field, value, message", [
    ("steps", 0, "steps must be a positive integer"),
    ("batch_size", 2.5, "batch_size must be a positive integer"),
    ("lr", -1e-4, "lr must be a finite number > 0"),
    ("lr", float("nan"), "lr must be a finite number > 0"),
    ("weight_decay", float("inf"), "weight_decay must be a finite number >= 0"),
    ("caption_dropout", 1.5, "caption_dropout must be a number in [0, 1]"),
    ("ema_decay", -0.1, "ema_decay must be a number in [0, 1]"),
    ("mixed_precision", "fp8", "mixed_precision must be one of"),
    ("mixed_precision", "fp16", "needs a CUDA device"),
    ("sample_every", 10, "needs sample_prompts"),
    ("grad_accum", 0, "grad_accum must be a positive integer"),
    ("device", "toaster", "device must be a torch device"),
])
def test_bad_config_is_refused(field, value, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        TrainConfig(**{field: value})


def test_bad_vae_config_and_dataset_are_refused(tmp_path):
    with pytest.raises(ValueError, match="reconstruction must be 'l1' or 'mse'"):
        VAETrainConfig(reconstruction="lpips")

    class Unnormalised(Squares):
        def __getitem__(self, i):
            image, caption = super().__getitem__(i)
            return (image + 1) * 127.5, caption

    with pytest.raises(ValueError, match=r"images \(3, H, W\) in \[-1, 1\]"):
        train_diffusion(tiny_models(), Unnormalised(), quick(steps=1), tmp_path, progress=False)


def tiny_config_file(folder) -> Path:
    path = Path(folder) / "configs.json"
    path.write_text(json.dumps({name: cfg.__dict__ for name, cfg in tiny_configs().items()}))
    return path


def tiny_args(out, *extra, steps: int = 2) -> list[str]:
    """`sd train` arguments for a run of tiny models on 16 px images, a second or so on a CPU."""
    return ["--out", str(out), "--steps", str(steps), "--vae-steps", "2", "--batch-size", "2", "--size", "16",
            "--config", str(tiny_config_file(Path(out).parent)), "--device", "cpu", *extra]


def test_main_trains_and_exports(tmp_path):
    sd.training.command.main(tiny_args(tmp_path / "run"))
    models = preload_models_from_standard_weights(tmp_path / "run" / "model.safetensors")
    assert models["diffusion"].config == tiny_configs()["diffusion"]


# --- `sd train`: seeded, checked before any work, resumed only into its own run -----------------------------------

def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every .safetensors file under folder, keyed 'relative/path.safetensors:key'."""
    return {f"{path.relative_to(folder)}:{key}": value for path in sorted(folder.rglob("*.safetensors"))
            for key, value in load_file(str(path)).items()}


def test_main_same_seed_same_weights_other_seed_other_weights(tmp_path):
    rng_before = torch.random.get_rng_state()
    for run, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        main(tiny_args(tmp_path / run, "--seed", seed))
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's random state is left alone
    a, b, c = (all_tensors(tmp_path / run) for run in "abc")
    files = {key.split(":")[0] for key in a}
    assert files == {"model.safetensors", "vae/checkpoint-2.safetensors", "diffusion/checkpoint-2.safetensors"}
    assert a.keys() == b.keys() == c.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit-identical: initial weights, data, noise, latent scale
    for file in files:
        assert any(not torch.equal(a[key], c[key]) for key in a if key.startswith(file + ":")), file


@pytest.mark.parametrize("extra, error, message", [
    (["--vae-steps", "3", "--steps", "0"], ValueError, "--steps must be a positive integer, got 0"),
    (["--vae-steps", "-1"], ValueError, "--vae-steps must be an integer >= 0, got -1"),
    (["--batch-size", "0"], ValueError, "--batch-size must be a positive integer, got 0"),
    (["--lr", "nan"], ValueError, "--lr must be a finite number > 0, got nan"),
    (["--lr", "inf"], ValueError, "--lr must be a finite number > 0, got inf"),
    (["--lr", "0"], ValueError, "--lr must be a finite number > 0"),
    (["--size", "30"], ValueError, r"--size must be a multiple of 4 \(the VAE's downscale\) of at least 16 pixels"
                                   r", got 30"),
    (["--size", "8"], ValueError, "--size must be a multiple of 4"),
    (["--seed", "-1"], ValueError, r"--seed must be an integer from 0 to 2\*\*64 - 1, got -1"),
    (["--seed", str(2**64)], ValueError, r"--seed must be an integer from 0 to 2\*\*64 - 1, got 18446744073709551616"),
    (["--sample-every", "-5"], ValueError, "--sample-every must be an integer >= 0"),
    (["--steps", "many"], ValueError, "argument --steps: invalid int value: 'many'"),
    (["--mixed-precision", "fp16", "--device", "cpu"], ValueError, "--mixed-precision fp16 needs a CUDA device"),
    (["--device", "toaster"], ValueError, "--device: device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
    (["--device", "meta"], ValueError, "--device: device 'meta' is not one sd runs on"),
    (["--export", "model.bin"], ValueError, "--export must end in .safetensors or .ckpt, got 'model.bin'"),
    (["--export", "afile/model.safetensors"], ValueError, "--export: .* is a file, not a folder"),
    (["--resume", "missing.safetensors"], FileNotFoundError, "--resume missing.safetensors: no such file"),
    (["--resume", "run/diffusion/afile"], ValueError, "is not a readable .safetensors checkpoint"),
    (["--resume", "run/model.safetensors"], ValueError, (
        r"--resume run/model.safetensors is not in run/diffusion: --resume must be a checkpoint in OUT/diffusion "
        r"\(e.g. run/diffusion/checkpoint-500.safetensors\), not an exported model: a diffusion checkpoint goes on "
        r"only with the VAE of its own run$")),
    (["--config", "missing.json"], FileNotFoundError, "--config missing.json: no such file"),
    (["--config", "bad.json"], ValueError, "--config bad.json is not a JSON of model configs"),
    (["--config", "mismatch.json"], ValueError, "--config: diffusion d_context=32 must equal clip d_model"),
    (["--out", "afile"], ValueError, "--out afile is a file; give a folder"),
    (["--out", "afile/run"], ValueError, "--out afile/run cannot be made: afile is a file, not a folder"),
])
def test_main_checks_every_argument_before_any_work(tmp_path, monkeypatch, extra, error, message):
    monkeypatch.chdir(tmp_path)
    Path("afile").write_text("not a folder")
    Path("run/diffusion").mkdir(parents=True)
    Path("run/diffusion/afile").write_text("not a checkpoint")
    Path("run/model.safetensors").write_text("an export, not a checkpoint")
    Path("bad.json").write_text("{not json")
    Path("mismatch.json").write_text(json.dumps({"diffusion": tiny_configs()["diffusion"].__dict__}))

    def no_models(*args, **kwargs):
        raise AssertionError("a model was built before the arguments were checked")

    monkeypatch.setattr(sd.training.command, "build_models", no_models)
    with pytest.raises(error, match=message):
        main(["--out", "run", *extra])  # later --out wins


def test_resume_is_refused_into_another_run(tmp_path):
    main(tiny_args(tmp_path / "a"))
    checkpoint = str(checkpoint_path(tmp_path / "a" / "diffusion", 2))
    with pytest.raises(ValueError, match=r"is not in .*b/diffusion: --resume must be a checkpoint in OUT/diffusion "
                                         r".* goes on only with the VAE of its own run; .* belongs to the run in "
                                         r"--out .*a$"):
        main(tiny_args(tmp_path / "b", "--resume", checkpoint, steps=4))
    with pytest.raises(ValueError, match=r"--resume: .* another run \(image_size: \[16, 16\] in the checkpoint, "
                                         r"\[20, 20\] now; models.diffusion.sample_size: 8 in the checkpoint, 10"):
        main(tiny_args(tmp_path / "a", "--size", "20", "--resume", checkpoint, steps=4))
    with pytest.raises(ValueError, match="past the 1 steps asked for"):
        main(tiny_args(tmp_path / "a", "--resume", checkpoint, steps=1))
    with pytest.raises(ValueError, match="--resume: the VAE stage of .* is at step 2, not at --vae-steps 3"):
        main(tiny_args(tmp_path / "a", "--resume", checkpoint, "--vae-steps", "3", steps=4))
    with pytest.raises(ValueError, match=r"--out: the VAE stage would go on from .*vae/checkpoint-2.safetensors "
                                         r"was written by another run \(image_size"):
        main(tiny_args(tmp_path / "a", "--size", "20", steps=4))


def test_main_replaces_no_file_without_overwrite(tmp_path):
    main(tiny_args(tmp_path / "a"))
    before = all_tensors(tmp_path / "a")
    latest = checkpoint_path(tmp_path / "a" / "diffusion", 2)
    with pytest.raises(ValueError, match=f"^{tmp_path / 'a' / 'diffusion'} already holds checkpoints of a run: go on "
                                         f"with --resume {latest}, use another --out, or --overwrite to start again$"):
        main(tiny_args(tmp_path / "a", "--export", str(tmp_path / "other.safetensors")))
    export = tmp_path / "a" / "model.safetensors"
    with pytest.raises(ValueError, match=f"^--export {export} already exists: give another --export, or "
                                         f"--overwrite to replace it$"):
        main(tiny_args(tmp_path / "b", "--export", str(export)))
    assert not (tmp_path / "b").exists() and not (tmp_path / "other.safetensors").exists()  # refused before any work
    after = all_tensors(tmp_path / "a")
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    main(tiny_args(tmp_path / "a", "--overwrite"))  # starts again, as before --overwrite was an option
    assert all(torch.equal(before[k], v) for k, v in all_tensors(tmp_path / "a").items())  # the same seed


def test_main_resolves_device_auto_once(tmp_path):
    plan = make_plan(build_parser().parse_args(tiny_args(tmp_path / "run", "--device", "auto")))
    assert plan.device == plan.cfg.device == plan.vae_cfg.device == str(best_device())


def test_resume_is_refused_with_another_frozen_vae_or_config(tmp_path):
    cfg = quick(steps=2)
    train_diffusion(tiny_models(), Squares(), cfg, tmp_path, progress=False)
    other_vae = {**tiny_models(), "encoder": tiny_models(seed=1)["encoder"]}
    with pytest.raises(ValueError, match=r"another run \(frozen.encoder: '[0-9a-f]{16}' in the checkpoint"):
        train_diffusion(other_vae, Squares(), quick(steps=4), tmp_path, progress=False,
                        resume_from=checkpoint_path(tmp_path, 2))
    other_config = tiny_models()
    other_config["diffusion"].config = dataclasses.replace(tiny_configs()["diffusion"], sample_size=4)  # same shapes
    with pytest.raises(ValueError, match="models.diffusion.sample_size: 8 in the checkpoint, 4 now"):
        train_diffusion(other_config, Squares(), quick(steps=4), tmp_path, progress=False,
                        resume_from=checkpoint_path(tmp_path, 2))


# --- a diverging run: stopped, and nothing non-finite saved ---------------------------------------------------------

def assert_all_finite(folder: Path) -> None:
    for key, value in all_tensors(folder).items():
        assert value.isfinite().all(), key


def test_non_finite_loss_stops_before_the_step(tmp_path):
    with pytest.raises(NonFiniteError, match=r"^diffusion step \d+: the loss is nan; training stopped before the step "
                                             r"changed any weight.*try a lower --lr$"):
        train_diffusion(tiny_models(), Squares(), quick(steps=6, lr=1e30, checkpoint_every=1), tmp_path,
                        progress=False)
    assert_all_finite(tmp_path)


def test_non_finite_gradient_norm_stops_before_the_step(tmp_path, monkeypatch):
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *args: real_clip(*args) * float("inf"))
    models = tiny_models()
    before = {k: v.clone() for k, v in models["diffusion"].state_dict().items()}
    with pytest.raises(NonFiniteError, match=r"^diffusion step 1: the gradient norm is inf"):
        train_diffusion(models, Squares(), quick(steps=2), tmp_path, progress=False)
    assert all(torch.equal(before[k], v) for k, v in models["diffusion"].state_dict().items())
    assert not list(tmp_path.iterdir())


def test_non_finite_weights_stop_before_the_ema_and_the_checkpoint(tmp_path, monkeypatch):
    """A finite loss and gradient can still overflow a weight in AdamW's step (a huge lr times the weight decay)."""
    real_step = torch.optim.AdamW.step

    def overflowing_step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    with pytest.raises(NonFiniteError, match=r"^diffusion step 1: the step made weights non-finite"):
        train_diffusion(tiny_models(), Squares(), quick(steps=1), tmp_path, progress=False)
    assert not list(tmp_path.iterdir())  # no checkpoint was begun


@pytest.mark.parametrize("vae_steps", ["0", "3"])
def test_main_with_a_diverging_lr_stops_and_saves_nothing_non_finite(tmp_path, vae_steps):
    out = tmp_path / "run"
    args = tiny_args(out, "--vae-steps", vae_steps, "--lr", "1e30", "--checkpoint-every", "1", "--sample-every", "0",
                     steps=3)
    with pytest.raises(NonFiniteError, match=r"^(vae|diffusion) step \d+: .*try a lower --lr$"):
        main(args)
    assert not (out / "model.safetensors").exists()
    assert_all_finite(out)


def test_export_refuses_weights_float16_cannot_hold(tmp_path):
    models = tiny_models()
    with torch.no_grad():
        next(models["diffusion"].parameters()).fill_(1e30)  # finite in float32, inf in float16
    with pytest.raises(NonFiniteError, match=r"cannot export .*: diffusion\.\S+ holds NaN or inf \(in torch.float16\)"):
        export(models, tmp_path / "model.safetensors", dtype=torch.float16)
    assert not list(tmp_path.iterdir())


# --- Ctrl-C --------------------------------------------------------------------------------------------------------

def sigint_on_tokenize_call(monkeypatch, n: int) -> None:
    """The training loss's n-th caption encoding (from 0) sends this process SIGINT, as a Ctrl-C would."""
    calls = itertools.count()
    real_encode = sd.training.train.encode_captions

    def encode_captions(clip, captions, tokenizer=None):
        if next(calls) == n:
            signal.raise_signal(signal.SIGINT)
        return real_encode(clip, captions, tokenizer)

    monkeypatch.setattr(sd.training.train, "encode_captions", encode_captions)


def leftover_temporary_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")]


def test_ctrl_c_mid_step_saves_the_last_step_done_and_resumes_exactly(tmp_path, monkeypatch):
    cfg = quick(steps=8, batch_size=2, grad_accum=2, caption_dropout=0.5)
    full = train_diffusion(tiny_models(), Squares(), cfg, tmp_path / "full", progress=False)
    sigint_on_tokenize_call(monkeypatch, 2 * 5 + 1)  # step 5's second micro-batch: its first one's gradients wait
    with pytest.raises(KeyboardInterrupt) as info:
        train_diffusion(tiny_models(), Squares(), cfg, tmp_path / "cut", progress=False)
    assert isinstance(info.value, TrainingInterrupted)
    assert (info.value.step, info.value.steps, info.value.checkpoint) == (5, 8, checkpoint_path(tmp_path / "cut", 5))
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["checkpoint-5.safetensors", "log.csv", "loss.png"]
    assert [row["step"] for row in read_log(tmp_path / "cut" / "log.csv")] == [1, 2, 3, 4, 5]
    monkeypatch.undo()

    resumed = train_diffusion(tiny_models(), Squares(), cfg, tmp_path / "cut", progress=False,
                              resume_from=info.value.checkpoint)
    assert resumed == full[5:]  # the partial step 5 was dropped, and redone whole
    assert read_log(tmp_path / "cut" / "log.csv") and [r["loss"] for r in read_log(tmp_path / "cut" / "log.csv")] == \
        [r["loss"] for r in read_log(tmp_path / "full" / "log.csv")]  # the log reads as one run
    a, b = (load_file(str(checkpoint_path(tmp_path / run, 8))) for run in ("full", "cut"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("fate, stopped_after", [("dropped", 3), ("made a ValueError", 2)])
def test_ctrl_c_whose_exception_is_lost_still_stops_the_loop(tmp_path, monkeypatch, fate, stopped_after):
    """Python drops an exception raised in a finalizer, and safetensors turns a KeyboardInterrupt into a ValueError:
    the loop notes the Ctrl-C itself, and stops after the step (or, on an error, with the last completed one)."""
    real_encode = sd.training.train.encode_captions
    calls = itertools.count()

    def encode_captions(clip, captions, tokenizer=None):
        if next(calls) == 2:
            try:
                signal.raise_signal(signal.SIGINT)
                real_encode(clip, captions, tokenizer)
            except KeyboardInterrupt:
                if fate != "dropped":
                    raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'")
        return real_encode(clip, captions, tokenizer)

    monkeypatch.setattr(sd.training.train, "encode_captions", encode_captions)
    with pytest.raises(KeyboardInterrupt) as info:
        train_diffusion(tiny_models(), Squares(), quick(steps=6), tmp_path, progress=False)
    assert (info.value.step, info.value.checkpoint) == (stopped_after, checkpoint_path(tmp_path, stopped_after))


@pytest.fixture
def sigterm_as_ctrl_c():
    """SIGTERM raises KeyboardInterrupt, as the `sd` command makes it while a subcommand runs."""
    before = signal.signal(signal.SIGTERM, signal.default_int_handler)
    yield
    signal.signal(signal.SIGTERM, before)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_while_a_checkpoint_is_written_waits_for_it(tmp_path, monkeypatch, sigterm_as_ctrl_c, signum):
    written = []
    real_save_file = sd.training.train.save_file

    def save_file(tensors, path, metadata=None):
        signal.raise_signal(signum)
        real_save_file(tensors, path, metadata=metadata)
        written.append(path)

    monkeypatch.setattr(sd.training.train, "save_file", save_file)
    with pytest.raises(KeyboardInterrupt) as info:
        train_diffusion(tiny_models(), Squares(), quick(steps=3), tmp_path, progress=False)
    assert len(written) == 1  # the last step's checkpoint, written whole, and not written again
    assert (info.value.step, info.value.checkpoint) == (3, checkpoint_path(tmp_path, 3))
    assert not leftover_temporary_files(tmp_path)
    with safe_open(str(checkpoint_path(tmp_path, 3)), "pt") as f:
        assert f.metadata()["step"] == "3"
        assert all(f.get_tensor(key) is not None for key in f.keys())


def test_ctrl_c_during_the_export_waits_for_the_file(tmp_path, monkeypatch):
    real_save = sd.training.train.save_standard_weights

    def save_standard_weights(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(sd.training.train, "save_standard_weights", save_standard_weights)
    with pytest.raises(KeyboardInterrupt):
        main(tiny_args(tmp_path / "run"))
    models = preload_models_from_standard_weights(tmp_path / "run" / "model.safetensors")
    assert models["diffusion"].config.sample_size == 8


def test_ctrl_c_in_main_says_how_to_go_on_and_going_on_gives_the_same_model(tmp_path, monkeypatch, capsys):
    main(tiny_args(tmp_path / "whole", steps=4))
    sigint_on_tokenize_call(monkeypatch, 2)  # in diffusion step 2: steps 0 and 1 are done
    with pytest.raises(KeyboardInterrupt):
        main(tiny_args(tmp_path / "cut", steps=4))
    monkeypatch.undo()
    said = capsys.readouterr().err
    checkpoint = checkpoint_path(tmp_path / "cut" / "diffusion", 2)
    assert f"diffusion step 2 of 4 is saved in {checkpoint}; to go on, run the same command with --resume " \
           f"{checkpoint}" in said
    main(tiny_args(tmp_path / "cut", "--resume", str(checkpoint), steps=4))
    whole, cut = all_tensors(tmp_path / "whole"), all_tensors(tmp_path / "cut")
    for key in whole:
        assert torch.equal(whole[key], cut[key]), key


def test_deferred_sigint_delivers_after_the_block_and_restores_the_handler():
    before = signal.getsignal(signal.SIGINT)
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_sigint():
            signal.raise_signal(signal.SIGINT)
            finished.append("the block")
    assert finished == ["the block"] and signal.getsignal(signal.SIGINT) is before
    with deferred_sigint(deliver=False):
        signal.raise_signal(signal.SIGINT)  # dropped
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with deferred_sigint():
            signal.raise_signal(signal.SIGINT)  # ignored, as it would have been without the block
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_deferred_sigint_holds_back_sigterm_too(sigterm_as_ctrl_c):
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_sigint():
            signal.raise_signal(signal.SIGTERM)
            finished.append("the block")
    assert finished == ["the block"]
    assert signal.getsignal(signal.SIGTERM) is signal.default_int_handler
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with deferred_sigint(deliver=False):
        signal.raise_signal(signal.SIGTERM)  # dropped
