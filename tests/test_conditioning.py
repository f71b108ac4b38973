"""Prompts to context: AUTOMATIC1111's emphasis and chunks through CLIP, padding, prompt editing and clip skip in
generate(), on random tiny models."""

import pytest
import torch

from sd.conditioning import Conditioning, emphasize
from sd.pipeline import encode_prompt, generate
from sd.prompt_parser import tokenize_chunks
from sd.tokenizer import tokenize

from reference import random_models, tiny_configs

H = W = 16


@pytest.fixture(scope="module")
def models():
    return random_models(tiny_configs(), seed=3)


@torch.no_grad()
def test_a_plain_prompt_is_encoded_exactly_as_before(models):
    """Seed compatibility with diffusers: no syntax and at most 75 tokens gives clip(tokenize(prompt)), bit for bit,
    in both syntaxes."""
    prompts = ["a red circle on a blue background", ""]
    expected = models["clip"](tokenize(prompts))
    assert torch.equal(encode_prompt(models, prompts), expected)
    assert torch.equal(encode_prompt(models, prompts, prompt_syntax="plain"), expected)


def test_emphasis_scales_tokens_then_restores_the_chunks_mean():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 77, 8, generator=g) + 0.5
    weights = torch.ones(2, 77)
    weights[0, 3], weights[1, 5:9] = 1.5, 1 / 1.1
    out = emphasize(z, weights)
    for k in range(2):
        scaled = z[k] * weights[k][:, None]
        assert torch.allclose(out[k], scaled * (z[k].mean() / scaled.mean()), rtol=1e-5)
        assert torch.allclose(out[k].mean(), z[k].mean(), rtol=1e-5)
    assert emphasize(z, torch.ones(2, 77)) is z


@torch.no_grad()
def test_weighted_prompt_is_clip_output_times_weights_mean_restored(models):
    ids, weights = tokenize_chunks("a (red:1.5) [fox]")
    z = models["clip"](ids)[0]  # (77, d)
    scaled = z * weights[0][:, None]
    expected = scaled * (z.mean() / scaled.mean())
    assert torch.allclose(encode_prompt(models, "a (red:1.5) [fox]")[0], expected, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_long_prompts_are_chunks_encoded_alone_and_laid_end_to_end(models):
    prompt = ", ".join(["red fox"] * 40)  # 119 tokens: two chunks
    ids, _ = tokenize_chunks(prompt)
    context = encode_prompt(models, prompt)
    assert ids.shape == (2, 77) and context.shape == (1, 154, 32)
    for k in range(2):
        assert torch.allclose(context[0, 77 * k:77 * (k + 1)], models["clip"](ids[k:k + 1])[0], atol=1e-6)


@torch.no_grad()
def test_shorter_prompts_are_padded_with_the_empty_prompts_chunk(models):
    long = "a cat " * 50  # 100 tokens: two chunks
    context = encode_prompt(models, [long, "a dog"])
    assert context.shape == (2, 154, 32)
    assert torch.equal(context[1, :77], encode_prompt(models, "a dog")[0])
    assert torch.equal(context[1, 77:], encode_prompt(models, "")[0])


@torch.no_grad()
def test_clip_skip_uses_an_earlier_layer(models):
    ids = tokenize("a red fox")
    assert torch.equal(encode_prompt(models, "a red fox", clip_skip=2), models["clip"](ids, clip_skip=2))
    assert not torch.equal(models["clip"](ids, clip_skip=2), models["clip"](ids))


def _unet_contexts(models, prompt, steps, **kw):
    """The context the UNet gets at each of its calls in a generate() run (without CFG: one call per step)."""
    seen = []
    hook = models["diffusion"].register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    try:
        generate(prompt, models=models, seed=0, n_inference_steps=steps, height=H, width=W, progress=False,
                 do_cfg=False, sampler_name="ddim", **kw)
    finally:
        hook.remove()
    return seen


def test_prompt_editing_changes_the_context_during_sampling_each_text_encoded_once(models):
    calls = []
    hook = models["clip"].register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    try:
        seen = _unet_contexts(models, "a [red:blue:3] fox", 10)
    finally:
        hook.remove()
    red, blue = encode_prompt(models, "a red fox"), encode_prompt(models, "a blue fox")
    assert [torch.equal(c, red) for c in seen] == [True] * 3 + [False] * 7
    assert all(torch.equal(c, blue) for c in seen[3:])
    assert len(calls) == 3  # "a red fox", "a blue fox" and the empty prompt (for padding): once each


def test_alternation_switches_every_step(models):
    seen = _unet_contexts(models, "[a|(b:1.1)]", 4)
    a, b = encode_prompt(models, "a"), encode_prompt(models, "(b:1.1)")
    assert [torch.equal(c, a) for c in seen] == [True, False, True, False]
    assert all(torch.equal(c, b) for c in seen[1::2])


def test_prompt_editing_counts_the_steps_img2img_runs(models):
    from PIL import Image

    image = Image.new("RGB", (W, H), (200, 30, 30))
    seen = _unet_contexts(models, "a [red:blue:0.5] fox", 10, input_image=image, strength=0.4)  # 4 steps run
    red = encode_prompt(models, "a red fox")
    assert [torch.equal(c, red) for c in seen] == [True, True, False, False]


def test_plain_syntax_reads_brackets_as_text(models):
    seen = _unet_contexts(models, "a [red:blue:3] fox", 4, prompt_syntax="plain")
    assert all(torch.equal(c, seen[0]) for c in seen)
    assert torch.equal(seen[0], models["clip"](tokenize("a [red:blue:3] fox")))


def test_conditioning_schedule_texts(models):
    c = Conditioning(models["clip"], ["a [b:3]", "c"], 10)
    assert [c.texts_at(s)[0] for s in (1, 3, 4, 10)] == ["a ", "a ", "a b", "a b"]
    assert c.texts_at(5)[1] == "c" and not Conditioning(models["clip"], ["c"], 10).changes


@pytest.mark.parametrize("kwargs, message", [
    ({"clip_skip": 0}, "clip_skip must be a whole number from 1"),
    ({"clip_skip": 3}, "clip_skip must be a whole number from 1 .the last layer. to 2"),
    ({"clip_skip": 1.5}, "clip_skip"),
    ({"clip_skip": True}, "clip_skip"),
    ({"prompt_syntax": "compel"}, "prompt_syntax must be one of a1111, plain"),
])
def test_bad_prompt_options_are_refused_before_any_model_runs(models, kwargs, message):
    calls = []
    hook = models["clip"].register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=message):
            generate("a cat", models=models, seed=0, n_inference_steps=2, height=H, width=W, progress=False, **kwargs)
    finally:
        hook.remove()
    assert calls == []


def test_a_prompt_too_long_for_any_use_is_refused(models):
    with pytest.raises(ValueError, match="chunks of 75 tokens; at most 32"):
        encode_prompt(models, "cat " * 2500)


def test_attention_maps_cover_every_chunk_and_name_each_token(models):
    from sd import AttentionMaps

    maps = AttentionMaps()
    prompt = "red fox, " * 30  # 90 tokens: two chunks
    generate(prompt, models=models, seed=0, n_inference_steps=2, height=H, width=W, progress=False,
             attention_maps=maps)
    assert maps.maps.shape[:2] == (1, 154)
    words = maps.words(0)
    assert [w for w, _ in words] == ["red", "fox", ","] * 30
    assert maps.tokens[0].count("<|startoftext|>") == 2 and maps.positions[0][-1] < 154
    assert torch.allclose(maps.maps[0].sum(0), torch.ones(H // 2, W // 2), atol=1e-4)


def test_brackets_nested_or_unclosed_are_cheap_and_bounded(models):
    import time

    from sd.prompt_parser import prompt_schedules

    start = time.perf_counter()
    assert prompt_schedules("(" * 60 + "x", 10) == [[10, "(" * 60 + "x"]]
    assert prompt_schedules("[" * 60 + "x", 10) == [[10, "[" * 60 + "x"]]
    assert time.perf_counter() - start < 1  # each bracket tried once: exponential before
    with pytest.raises(ValueError, match="nests brackets 600 deep; at most 64"):
        encode_prompt(models, "(" * 600 + "x" + ")" * 600)


@pytest.mark.parametrize("prompt, message", [("(x:1" + "0" * 46 + ")", "weights must be finite numbers"),
                                             ("(" * 40 + "x:1" + "0" * 37 + ")" * 40, "must be finite numbers"),
                                             ("(x:3" + "0" * 38 + ")", "encoding overflow in float32")])
def test_an_infinite_emphasis_weight_is_refused(models, prompt, message):
    with pytest.raises(ValueError, match=message):
        encode_prompt(models, prompt)


def test_unknown_extra_networks_are_dropped_with_a_warning_as_automatic1111_does(models):
    common = dict(models=models, seed=0, n_inference_steps=1, height=H, width=W, progress=False)
    with pytest.warns(UserWarning, match="not an extra network sd knows"):
        dropped = generate("i <3:love> you", **common)
    assert (dropped == generate("i  you", **common)).all()


def test_encode_prompt_refuses_lora_tags_it_cannot_apply(models):
    with pytest.raises(ValueError, match="encode_prompt does not merge LoRAs"):
        encode_prompt(models, "a cat <lora:style:0.5>")
