"""Model-level checks: the timestep embedding against diffusers', config validation, and bad inputs to forwards."""

import pytest
import torch

from reference import random_models, tiny_configs
from sd.clip import CLIPConfig
from sd.decoder import VAEConfig
from sd.diffusion import DiffusionConfig, get_time_embedding


@pytest.fixture(scope="module")
def models():
    return random_models(tiny_configs(), seed=11)


def test_time_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 250, 999])
    expected = get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.allclose(get_time_embedding(t, 320), expected, atol=1e-6)
    assert get_time_embedding(981).shape == (1, 320)  # a bare number is a batch of one
    emb = get_time_embedding(torch.tensor([0]), 320)
    assert torch.equal(emb[0, :160], torch.ones(160)) and torch.equal(emb[0, 160:], torch.zeros(160))  # cos 0, sin 0


@pytest.mark.parametrize("make", [
    lambda: CLIPConfig(d_model=30, n_heads=4),
    lambda: VAEConfig(block_out_channels=(30, 64), n_groups=8),
    lambda: DiffusionConfig(channel_mult=(1, 2), attention_levels=(True,)),
    lambda: DiffusionConfig(model_channels=36),  # not divisible by 32 groups
])
def test_inconsistent_configs_are_refused(make):
    with pytest.raises(ValueError, match="Config"):
        make()


def test_configs_are_frozen():
    with pytest.raises(Exception):
        DiffusionConfig().in_channels = 9


@torch.no_grad()
@pytest.mark.parametrize("call,message", [
    (lambda m: m["diffusion"](torch.randn(1, 3, 8, 8), torch.randn(1, 77, 32), 10), r"latents of shape \(B, 4, h, w\)"),
    (lambda m: m["diffusion"](torch.randn(2, 4, 8, 8), torch.randn(1, 77, 32), 10), r"context of shape \(2, T, 32\)"),
    (lambda m: m["diffusion"](torch.randn(2, 4, 8, 8), torch.randn(2, 77, 768), 10), r"context of shape \(2, T, 32\)"),
    (lambda m: m["diffusion"](torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32), torch.tensor([1, 2, 3])), "one timestep or 2"),
    (lambda m: m["encoder"](torch.randn(1, 3, 15, 16)), "divisible by 2"),
    (lambda m: m["encoder"](torch.randn(1, 4, 16, 16)), r"images of shape \(B, 3, H, W\)"),
    (lambda m: m["encoder"](torch.randn(1, 3, 16, 16), torch.randn(1, 4, 4, 4)), "noise must have the latent shape"),
    (lambda m: m["decoder"](torch.randn(1, 3, 8, 8)), r"latents of shape \(B, 4, h, w\)"),
    (lambda m: m["clip"](torch.zeros(1, 78, dtype=torch.long)), "at most 77 tokens"),
    (lambda m: m["clip"](torch.zeros(1, 77)), "integer token ids"),
])
def test_bad_inputs_are_explained(models, call, message):
    with pytest.raises(ValueError, match=message):
        call(models)


@torch.no_grad()
def test_shorter_prompts_and_per_sample_timesteps(models):
    """CLIP takes fewer than 77 tokens (positions 0..T-1); the UNet takes one timestep per sample."""
    tokens = torch.randint(0, 49408, (2, 77))
    full, short = models["clip"](tokens), models["clip"](tokens[:, :10])
    assert torch.allclose(full[:, :10], short, atol=1e-5)  # causal: the first 10 outputs see only the first 10 tokens
    latent, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    both = models["diffusion"](latent, context, torch.tensor([5, 700]))
    assert torch.allclose(both[1], models["diffusion"](latent[1:], context[1:], 700)[0], atol=1e-5)
    assert not torch.allclose(both[0], models["diffusion"](latent[:1], context[:1], 700)[0], atol=1e-3)


def test_presets_and_defaults_are_valid():
    for cls in (CLIPConfig, VAEConfig, DiffusionConfig):
        assert cls() == cls() and cls.tiny() == cls.tiny()
    assert DiffusionConfig.tiny(in_channels=9).in_channels == 9


@pytest.mark.parametrize("cls,field,value", [
    (CLIPConfig, "n_heads", 0),
    (CLIPConfig, "d_model", -768),
    (CLIPConfig, "n_layers", True),  # a bool is an int to Python, never a layer count
    (CLIPConfig, "vocab_size", "49408"),
    (CLIPConfig, "d_ff", 3072.0),
    (CLIPConfig, "layer_norm_eps", float("nan")),
    (VAEConfig, "block_out_channels", (-128, 256)),
    (VAEConfig, "block_out_channels", ()),
    (VAEConfig, "block_out_channels", "128"),
    (VAEConfig, "latent_scale", 0.0),
    (VAEConfig, "norm_eps", float("inf")),
    (VAEConfig, "n_groups", None),
    (DiffusionConfig, "model_channels", -5),
    (DiffusionConfig, "sample_size", 0),
    (DiffusionConfig, "channel_mult", [1, 2, 4, 4]),  # a list, not a tuple: configs are hashable
    (DiffusionConfig, "attention_levels", (1, 1, 1, 0)),
    (DiffusionConfig, "attn_norm_eps", -1e-6),
])
def test_each_field_is_checked(cls, field, value):
    with pytest.raises(ValueError, match=f"{cls.__name__}.{field} must be") as info:
        cls(**{field: value})
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("make,field", [
    (lambda: CLIPConfig(d_model=48, n_heads=5), "d_model"),
    (lambda: VAEConfig(n_groups=24), "n_groups"),
    (lambda: DiffusionConfig(n_heads=7), "n_heads"),
    (lambda: DiffusionConfig(channel_mult=(1, 2, 4)), "attention_levels"),
    (lambda: DiffusionConfig(channel_mult=(2, 2, 4, 4)), "channel_mult"),  # the output layer takes model_channels
    (lambda: DiffusionConfig(model_channels=9, n_groups=3, n_heads=3), "model_channels"),  # odd: half cos, half sin
])
def test_fields_that_must_fit_together(make, field):
    with pytest.raises(ValueError, match=field):
        make()
