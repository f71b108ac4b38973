"""Training loop (sd.training.train) on tiny models and a tiny dataset of coloured squares: the losses go down, a resumed run
continues exactly, the random draws and EMA behave as configured, and the export loads back."""

import json

import pytest
import torch
from safetensors.torch import load_file

import sd.training.train
from reference import tiny_configs
from sd.model_loader import build_models, preload_models_from_standard_weights
from sd.training.train import (TrainConfig, VAETrainConfig, checkpoint_path, export, load_ema, train_diffusion,
                      train_vae)

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
    real_tokenize = sd.training.train.tokenize
    monkeypatch.setattr(sd.training.train, "tokenize", lambda captions, tokenizer=None: seen.extend(captions) or
                        real_tokenize(captions, tokenizer))
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
    ("lr", -1e-4, "lr must be a number > 0"),
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


def test_main_trains_and_exports(tmp_path):
    config = tmp_path / "configs.json"
    config.write_text(json.dumps({name: cfg.__dict__ for name, cfg in tiny_configs().items()}))
    sd.training.train.main(["--out", str(tmp_path / "run"), "--steps", "2", "--vae-steps", "2", "--batch-size", "2",
                   "--size", "16", "--config", str(config)])
    models = preload_models_from_standard_weights(tmp_path / "run" / "model.safetensors")
    assert models["diffusion"].config == tiny_configs()["diffusion"]
