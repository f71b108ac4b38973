"""Parity: tiny random checkpoints in the original layout, loaded by our model_loader and by diffusers /
transformers (through their own key conversion), give the same outputs to 1e-5 of the output scale in fp32."""

import pytest
import torch

from reference import diffusers_unet, diffusers_vae, random_models, tiny_configs, transformers_clip
from sd.model_converter import to_standard_weights
from sd.model_loader import preload_models_from_standard_weights, save_standard_weights

RTOL = 1e-5


def assert_close(ours: torch.Tensor, ref: torch.Tensor):
    assert ours.shape == ref.shape
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= RTOL * scale, f"max abs difference {err:.3g} > {RTOL} x output scale {scale:.3g}"


@pytest.fixture(scope="module", params=[4, 9], ids=["txt2img-unet", "inpainting-unet"])
def loaded(request, tmp_path_factory):
    """(our models loaded from a .safetensors file, the same weights as an original-layout state dict)."""
    configs = tiny_configs(in_channels=request.param)
    original = random_models(configs, seed=request.param)
    path = save_standard_weights(original, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")
    ours = preload_models_from_standard_weights(path)
    return ours, to_standard_weights(original), configs


def test_loading_reproduces_every_weight_exactly(loaded, tmp_path):
    ours, checkpoint, _ = loaded
    assert to_standard_weights(ours).keys() == checkpoint.keys()
    for key, value in to_standard_weights(ours).items():
        assert torch.equal(value, checkpoint[key]), key


@pytest.mark.parametrize("batch,h,w", [(1, 8, 8), (3, 8, 12), (2, 9, 13)])
@torch.no_grad()
def test_unet_matches_diffusers(loaded, batch, h, w):
    ours, checkpoint, configs = loaded
    cfg = configs["diffusion"]
    ref = diffusers_unet(cfg, checkpoint)
    g = torch.Generator().manual_seed(batch)
    latent = torch.randn(batch, cfg.in_channels, h, w, generator=g)
    context = torch.randn(batch, 77, cfg.d_context, generator=g)
    timesteps = torch.tensor([981, 500, 1][:batch]) if batch > 1 else torch.tensor(981)
    latent_before, context_before = latent.clone(), context.clone()

    out = ours["diffusion"](latent, context, timesteps)
    expected = ref(latent, timesteps, encoder_hidden_states=context).sample
    assert_close(out, expected)
    assert torch.equal(latent, latent_before) and torch.equal(context, context_before), "forward changed its inputs"


@pytest.mark.parametrize("batch", [1, 3])
@torch.no_grad()
def test_vae_matches_diffusers(loaded, batch):
    ours, checkpoint, configs = loaded
    cfg = configs["vae"]
    ref = diffusers_vae(cfg, checkpoint)
    g = torch.Generator().manual_seed(batch)
    image = torch.rand(batch, 3, 16, 24, generator=g) * 2 - 1  # non-square
    noise = torch.randn(batch, cfg.latent_channels, 16 // cfg.downscale, 24 // cfg.downscale, generator=g)
    image_before = image.clone()

    dist = ref.encode(image).latent_dist
    assert_close(ours["encoder"](image, noise), (dist.mean + dist.std * noise) * cfg.latent_scale)
    assert_close(ours["encoder"](image), dist.mode() * cfg.latent_scale)
    assert torch.equal(image, image_before)

    latents = torch.randn(batch, cfg.latent_channels, 8, 12, generator=g)
    latents_before = latents.clone()
    assert_close(ours["decoder"](latents), ref.decode(latents / cfg.latent_scale).sample)
    assert torch.equal(latents, latents_before)


@pytest.mark.parametrize("batch", [1, 3])
@torch.no_grad()
def test_clip_matches_transformers(loaded, batch):
    ours, checkpoint, configs = loaded
    cfg = configs["clip"]
    ref = transformers_clip(cfg, checkpoint)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.n_tokens), generator=torch.Generator().manual_seed(batch))
    assert_close(ours["clip"](tokens), ref(input_ids=tokens).last_hidden_state)


@pytest.mark.parametrize("clip_skip", [1, 2])
@torch.no_grad()
def test_clip_skip_matches_transformers_hidden_states_and_diffusers_reading(loaded, clip_skip):
    """AUTOMATIC1111's clip_skip N: the output of the N-th layer from the end, then the final LayerNorm. diffusers'
    clip_skip counts one less: its StableDiffusionPipeline.encode_prompt takes hidden_states[-(clip_skip + 1)] and
    the final LayerNorm, so its clip_skip=1 is our clip_skip=2 (its own encode_prompt: the next test)."""
    ours, checkpoint, configs = loaded
    cfg = configs["clip"]
    ref = transformers_clip(cfg, checkpoint)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.n_tokens), generator=torch.Generator().manual_seed(5))
    hidden_states = ref(input_ids=tokens, output_hidden_states=True).hidden_states
    final_layer_norm = ref.text_model.final_layer_norm if hasattr(ref, "text_model") else ref.final_layer_norm
    a1111 = final_layer_norm(hidden_states[-clip_skip])
    assert_close(ours["clip"](tokens, clip_skip=clip_skip), a1111)  # = diffusers' clip_skip=clip_skip - 1
    assert not torch.allclose(ours["clip"](tokens, clip_skip=2), ours["clip"](tokens))


@torch.no_grad()
def test_clip_skip_2_is_diffusers_encode_prompt_clip_skip_1(loaded):
    """diffusers' own StableDiffusionPipeline.encode_prompt, run on the same text encoder: its clip_skip=1 is our
    clip_skip=2 (and its None our 1). It reads text_encoder.text_model.final_layer_norm, a level transformers 5's
    CLIPTextModel no longer has: the text encoder stands in for it (set outside nn.Module's registry)."""
    from types import SimpleNamespace

    from diffusers import StableDiffusionPipeline

    from sd.pipeline import encode_prompt
    from sd.tokenizer import load_tokenizer

    ours, checkpoint, configs = loaded
    ref = transformers_clip(configs["clip"], checkpoint)
    if not hasattr(ref, "text_model"):
        object.__setattr__(ref, "text_model", ref)
    pipe = SimpleNamespace(tokenizer=load_tokenizer(), text_encoder=ref, unet=None)
    prompt = ["a red fox in the snow", "two blue squares"]
    for theirs, clip_skip in ((None, 1), (1, 2)):
        expected, _ = StableDiffusionPipeline.encode_prompt(pipe, prompt, torch.device("cpu"), 1, False,
                                                            clip_skip=theirs)
        assert_close(encode_prompt(ours, prompt, clip_skip=clip_skip), expected)


@pytest.mark.parametrize("clip_skip", [0, 3, 1.5, True, None])
def test_bad_clip_skip_is_refused(loaded, clip_skip):
    ours, _, configs = loaded
    with pytest.raises(ValueError, match=r"clip_skip must be a whole number from 1 \(the last layer\) to 2, got"):
        ours["clip"](torch.zeros(1, 77, dtype=torch.long), clip_skip=clip_skip)


@torch.no_grad()
def test_unet_batch_entries_are_independent(loaded):
    """Each entry of a batch gives what it gives alone: nothing leaks across the batch."""
    ours, _, configs = loaded
    cfg = configs["diffusion"]
    g = torch.Generator().manual_seed(7)
    latent = torch.randn(3, cfg.in_channels, 8, 12, generator=g)
    context = torch.randn(3, 77, cfg.d_context, generator=g)
    t = torch.tensor([10, 400, 900])
    batched = ours["diffusion"](latent, context, t)
    for i in range(3):
        assert_close(batched[i:i + 1], ours["diffusion"](latent[i:i + 1], context[i:i + 1], t[i]))
