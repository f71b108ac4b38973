"""Cross-attention maps (sd.inspect.attention_maps): the same probabilities as diffusers' UNet computes for the same weights,
one map per token that sums as documented, only the prompt half under guidance, and no hook left behind."""

import pytest
import torch
import torch.nn.functional as F

from reference import diffusers_unet, random_models, tiny_configs
from sd.inspect.attention_maps import AttentionMaps, record_cross_attention
from sd.model_converter import to_standard_weights
from sd.pipeline import generate
from sd.tokenizer import load_tokenizer, tokenize

H, W = 16, 24  # the tiny VAE halves once: latents 8 x 12


@pytest.fixture(scope="module")
def tiny():
    configs = tiny_configs()
    return random_models(configs, seed=31), configs


def hooks_of(models) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for model in models.values() for m in model.modules())


class StoreCrossAttention:
    """A diffusers attention processor that computes attention as diffusers' AttnProcessor does and keeps the
    cross-attention probabilities, averaged over heads: (B, H'W', T) per call."""

    def __init__(self, store: list):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        cross = encoder_hidden_states is not None
        context = encoder_hidden_states if cross else hidden_states
        query, key, value = (attn.head_to_batch_dim(p) for p in (attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)))
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B * heads, N, T)
        if cross:
            B = hidden_states.shape[0]
            self.store.append(probs.view(B, attn.heads, *probs.shape[1:]).mean(1))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))


@pytest.mark.parametrize("h,w", [(8, 12), (9, 13)])
def test_maps_equal_diffusers_attention_probabilities(tiny, h, w):
    models, configs = tiny
    diffusion = models["diffusion"]
    reference = diffusers_unet(configs["diffusion"], to_standard_weights(models))
    store = []
    reference.set_attn_processor({name: StoreCrossAttention(store) for name in reference.attn_processors})
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, h, w, generator=g)
    context = torch.randn(2, 77, configs["diffusion"].d_context, generator=g)
    with torch.no_grad():
        reference(latents, torch.tensor([500, 20]), encoder_hidden_states=context)
        with record_cross_attention(diffusion) as recorded:
            diffusion(latents, context, torch.tensor([500, 20]))

    def grid(n: int) -> tuple[int, int]:  # the feature map size that has n pixels: ceil(h / 2^k) x ceil(w / 2^k)
        for k in range(4):
            size = (-(-h // 2**k), -(-w // 2**k))
            if size[0] * size[1] == n:
                return size
        raise AssertionError(n)

    expected = torch.stack([
        F.interpolate(p.transpose(1, 2).reshape(2, 77, *grid(p.shape[1])), size=(h, w), mode="bilinear", align_corners=False)
        for p in store
    ]).mean(0)
    assert recorded.calls == len(store) == 7  # tiny UNet: 2 down, 1 middle, 4 up (2 blocks a level) attention layers
    assert torch.allclose(recorded.mean(), expected, atol=1e-6)
    assert hooks_of(models) == 0


def test_generate_fills_one_map_per_token_that_sums_to_one(tiny):
    models, _ = tiny
    maps = AttentionMaps()
    prompts = ["a red circle", "two blue squares on white"]
    plain = generate(prompts, models=models, seed=3, n_inference_steps=3, height=H, width=W, num_images=2, progress=False,
                     output_type="pil")
    images = generate(prompts, models=models, seed=3, n_inference_steps=3, height=H, width=W, num_images=2,
                      progress=False, attention_maps=maps, output_type="pil")
    assert [im.tobytes() for im in images] == [im.tobytes() for im in plain]  # recording changes nothing
    assert maps.maps.shape == (4, 77, H // 2, W // 2) and maps.maps.dtype == torch.float32 and len(maps) == 4
    assert (maps.maps >= 0).all()
    assert torch.allclose(maps.maps.sum(dim=1), torch.ones(4, H // 2, W // 2), atol=1e-5)
    assert maps.tokens[0] == ["<|startoftext|>", "a", "red", "circle", "<|endoftext|>"] == maps.tokens[1]
    assert maps.tokens[2] == ["<|startoftext|>", "two", "blue", "squares", "on", "white", "<|endoftext|>"]
    words = maps.words(2)
    assert [word for word, _ in words] == ["two", "blue", "squares", "on", "white"]
    assert all(torch.equal(m, maps.maps[2, j + 1]) for j, (_, m) in enumerate(words))
    assert hooks_of(models) == 0


def test_under_guidance_the_prompt_half_is_recorded(tiny):
    """The UNet's batch under classifier-free guidance is [negative prompts; prompts]; rows picks the second half,
    and a UNet row depends only on its own inputs, so those maps are the prompt-only run's."""
    models, configs = tiny
    diffusion = models["diffusion"]
    tokenizer = load_tokenizer()
    with torch.no_grad():
        context = models["clip"](tokenize(["", "a red circle"], tokenizer))
        latents = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(1))
        with record_cross_attention(diffusion, rows=slice(1, 2)) as both:
            diffusion(torch.cat([latents] * 2), context, 300)
        with record_cross_attention(diffusion) as prompt_only:
            diffusion(latents, context[1:], 300)
    assert both.mean().shape == (1, 77, 8, 12)
    assert torch.allclose(both.mean(), prompt_only.mean(), atol=1e-6)


def test_no_hook_is_left_behind_when_generation_fails(tiny):
    models, _ = tiny

    def stop(i, t, latents, pred_original):
        raise KeyboardInterrupt

    maps = AttentionMaps()
    with pytest.raises(KeyboardInterrupt):
        generate("a cat", models=models, seed=0, n_inference_steps=3, height=H, width=W, progress=False,
                 attention_maps=maps, callback=stop, output_type="pil")
    assert hooks_of(models) == 0
    assert maps.maps is None  # nothing half-filled
    with pytest.raises(RuntimeError, match="no maps yet"):
        maps.words(0)


def test_misuse_is_explained(tiny):
    models, _ = tiny
    with pytest.raises(ValueError, match="has no UNET_AttentionBlock"):
        with record_cross_attention(models["clip"]):
            pass
    with pytest.raises(RuntimeError, match="no cross-attention was recorded"):
        with record_cross_attention(models["diffusion"]) as recorded:
            pass
        recorded.mean()
    maps = AttentionMaps()
    generate("a cat", models=models, seed=0, n_inference_steps=1, height=H, width=W, progress=False, attention_maps=maps,
             output_type="pil")
    with pytest.raises(IndexError, match="image index 1 out of range: 1 images were generated"):
        maps.words(1)
