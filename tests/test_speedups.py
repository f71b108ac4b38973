"""The optional speed-ups (Token Merging, DeepCache) and memory savers (attention slicing, the tiled VAE): off is an
exact no-op, on is close to off and follows the prompt, and each is put back as it was when generate() returns."""

import numpy as np
import pytest
import torch

from reference import random_models, tiny_configs
from sd.attention import CrossAttention, SelfAttention, sliced_attention
from sd.deepcache import deep_cache
from sd.diffusion import UNET_AttentionBlock
from sd.pipeline import generate
from sd.tome import merged_tokens


@pytest.fixture(scope="module")
def models():
    return random_models(tiny_configs(), seed=3)


def unet_inputs(models, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cfg = models["diffusion"].config
    latents = torch.randn(batch, cfg.in_channels, 16, 16, generator=g)
    context = torch.randn(batch, 7, cfg.d_context, generator=g)
    return latents, context


def count_calls(module) -> list:
    calls = []
    module.register_forward_hook(lambda *args: calls.append(1))
    return calls


@torch.no_grad()
@pytest.mark.parametrize("interval", [0, 1])
def test_deepcache_off_is_an_exact_no_op(models, interval):
    diffusion = models["diffusion"]
    latents, context = unet_inputs(models)
    plain = [diffusion(latents, context, t) for t in (900, 500)]
    with deep_cache(diffusion, interval) as cache:
        cached = [diffusion(latents, context, t) for t in (900, 500)]
    assert cache is None and diffusion.unet.deep_cache is None
    assert all(torch.equal(a, b) for a, b in zip(plain, cached))


@torch.no_grad()
def test_deepcache_runs_the_deep_blocks_every_interval_calls_only(models):
    diffusion = models["diffusion"]
    latents, context = unet_inputs(models)
    bottleneck = count_calls(diffusion.unet.bottleneck)
    first_block = count_calls(diffusion.unet.encoders[1])
    with deep_cache(diffusion, 3):
        outputs = [diffusion(latents, context, 500) for _ in range(7)]
    assert len(bottleneck) == 4 and len(first_block) == 7  # calls 1, 2 (the first two always), 4 and 7 are whole
    # On the same input the kept features are exactly what a whole call computes, so the shallow path agrees.
    assert all(torch.equal(outputs[0], out) for out in outputs[1:])
    assert diffusion.unet.deep_cache is None


@torch.no_grad()
def test_deepcache_shallow_calls_use_the_kept_features_and_their_own_input(models):
    diffusion = models["diffusion"]
    latents, context = unet_inputs(models)
    other = latents + 0.3 * torch.randn_like(latents)
    with deep_cache(diffusion, 3):
        diffusion(latents, context, 500)
        diffusion(latents, context, 500)
        shallow = diffusion(other, context, 480)
    assert not torch.equal(shallow, diffusion(other, context, 480))  # deep features from the earlier call
    assert not torch.equal(shallow, diffusion(latents, context, 500))  # the top blocks on its own input and time


@torch.no_grad()
def test_deepcache_recomputes_when_the_batch_changes_and_is_put_back_after_an_error(models):
    diffusion = models["diffusion"]
    latents, context = unet_inputs(models, batch=2)
    bottleneck = count_calls(diffusion.unet.bottleneck)
    with pytest.raises(RuntimeError, match="stop"), deep_cache(diffusion, 4):
        diffusion(latents, context, 500)
        diffusion(latents, context, 500)
        diffusion(latents[:1], context[:1], 500)  # another batch: the kept features do not fit, a whole call
        raise RuntimeError("stop")
    assert len(bottleneck) == 3 and diffusion.unet.deep_cache is None


@pytest.mark.parametrize("interval,message", [(-1, "got -1"), (2.5, "got 2.5"), (True, "got True"), ("3", "got '3'")])
def test_deepcache_refuses_bad_intervals(models, interval, message):
    with pytest.raises(ValueError, match=f"deepcache_interval must be a whole number .*{message}"):
        with deep_cache(models["diffusion"], interval):
            pass


@torch.no_grad()
def test_token_merging_at_ratio_0_is_an_exact_no_op_and_on_changes_only_the_top_level(models):
    diffusion = models["diffusion"]
    latents, context = unet_inputs(models)
    plain = diffusion(latents, context, 500)
    with merged_tokens(diffusion, 0.0):
        assert torch.equal(diffusion(latents, context, 500), plain)
    blocks = [m for m in diffusion.modules() if isinstance(m, UNET_AttentionBlock)]
    with merged_tokens(diffusion, 0.5):
        ratios = [b.token_merge_ratio for b in blocks]
        merged = diffusion(latents, context, 500)
    assert sorted(set(ratios)) == [0.0, 0.5] and all(b.token_merge_ratio == 0 for b in blocks)
    assert not torch.equal(merged, plain) and torch.isfinite(merged).all()
    assert (merged - plain).abs().mean() < 0.5 * plain.abs().mean()


@torch.no_grad()
def test_sliced_attention_is_exact_with_one_slice_and_close_with_many(models):
    x = torch.randn(3, 50, 16)
    context = torch.randn(3, 7, 12)
    self_attention, cross_attention = SelfAttention(2, 16).eval(), CrossAttention(2, 16, 12).eval()
    plain = self_attention(x), cross_attention(x, context)
    for size, exact in ((50, True), (1000, True), (7, False), (1, False)):
        with sliced_attention([self_attention, cross_attention], size):
            sliced = self_attention(x), cross_attention(x, context)
        for a, b in zip(plain, sliced):
            assert torch.equal(a, b) if exact else torch.allclose(a, b, atol=1e-6)
    assert self_attention.slice_size is None and cross_attention.slice_size is None
    with pytest.raises(ValueError, match="attention_slice_size must be a positive number of query tokens"):
        with sliced_attention(self_attention, 0):
            pass


def run(models, **options):
    options = {"height": 32, "width": 32, **options}
    return generate(["a red circle", "a blue square"], models=models, seed=5, n_inference_steps=6,
                    sampler_name="dpmpp_2m_karras", progress=False, **options)


def test_generate_with_every_speedup_off_gives_the_same_image(models):
    """tome_ratio 0, deepcache_interval 1, one attention slice as large as the image, and a VAE tile that holds the
    whole image are exact no-ops."""
    plain = run(models)
    off = run(models, tome_ratio=0.0, deepcache_interval=1, attention_slice_size=32 * 32, vae_tiling=True)
    assert np.array_equal(plain, off)


def test_generate_with_the_speedups_on_stays_close_and_leaves_the_models_as_they_were(models):
    plain = run(models).astype(np.float64)
    fast = run(models, tome_ratio=0.5, deepcache_interval=3, attention_slice_size=64).astype(np.float64)
    assert 0 < np.abs(plain - fast).mean() < 40
    assert all(m.token_merge_ratio == 0 for m in models["diffusion"].modules() if isinstance(m, UNET_AttentionBlock))
    assert models["diffusion"].unet.deep_cache is None
    assert all(m.slice_size is None for model in models.values() for m in model.modules()
               if isinstance(m, (SelfAttention, CrossAttention)))


@pytest.mark.parametrize("options,message", [
    (dict(tome_ratio=1.0), r"tome_ratio must be a finite number in \[0, 1\)"),
    (dict(tome_ratio=float("nan")), r"tome_ratio must be a finite number in \[0, 1\)"),
    (dict(deepcache_interval=-2), "deepcache_interval must be a whole number"),
    (dict(attention_slice_size=0), "attention_slice_size must be a positive number"),
    (dict(vae_tiling="yes"), "vae_tiling must be True or False"),
])
def test_generate_refuses_bad_speedup_values_before_any_work(models, options, message, monkeypatch):
    import sd.pipeline

    monkeypatch.setattr(sd.pipeline, "Conditioning", lambda *a, **k: pytest.fail("the text encoder ran"))
    with pytest.raises(ValueError, match=message):
        run(models, **options)


def test_an_image_too_large_to_decode_at_once_is_accepted_in_tiles(models, monkeypatch):
    """The memory check knows the tiled VAE holds one tile's activations: a size refused untiled (with the advice
    to tile) passes with vae_tiling, and one too large even for the image itself is still refused."""
    import sd.pipeline

    monkeypatch.setattr(sd.pipeline, "device_memory", lambda device: 2**30)  # a 1 GB machine
    def encode_prompts(*args, **kwargs):
        raise RuntimeError("the text encoder ran")

    monkeypatch.setattr(sd.pipeline, "Conditioning", encode_prompts)  # generate's first model: the prompts' encoding
    big = dict(height=4096, width=4096)
    with pytest.raises(ValueError, match=r"need at least .* or decode in tiles \(vae_tiling=True, sd: --vae-tiling\)"):
        run(models, **big)
    with pytest.raises(RuntimeError, match="the text encoder ran"), pytest.warns(UserWarning, match="times the area"):
        run(models, vae_tiling=True, **big)  # past the memory check: the work would start
    with pytest.raises(ValueError, match=r"need at least 6 GB .* make the images smaller or fewer$"):
        run(models, vae_tiling=True, height=16384, width=16384)  # the float32 image alone: 2 x 3 GB
