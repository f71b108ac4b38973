"""LoRA: kohya (linear + 3x3 conv, alpha != rank) and diffusers/PEFT files against diffusers' load_lora_weights +
fuse_lora on the same random tiny base; LoHa against its formula; exact removal; <lora:...> tags; the errors."""

import json

import pytest
import torch
from safetensors.torch import save_file

from sd import apply_lora
from sd.lora import LoraError, applied_loras, lora_hash
from sd.model_converter import to_standard_weights
from sd.tokenizer import tokenize

from reference import diffusers_unet, random_models, tiny_configs, transformers_clip

CFG = tiny_configs()
RANK, ALPHA = 4, 2.0
# (diffusers module in the UNet, or in the text encoder): linear attention and feed-forward, 1x1 and 3x3 convolutions
UNET_LAYERS = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
               "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v",
               "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
               "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
               "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
               "down_blocks.1.attentions.0.proj_in",
               "down_blocks.0.resnets.0.conv1", "up_blocks.0.resnets.1.conv2"]
TEXT_LAYERS = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.self_attn.out_proj",
               "text_model.encoder.layers.1.mlp.fc1"]


@pytest.fixture
def models():
    return random_models(CFG, seed=11)


def weight_shapes(models) -> dict[str, torch.Size]:
    """diffusers module name -> its weight's shape, from the references built on the same weights."""
    checkpoint = to_standard_weights(models)
    unet = diffusers_unet(CFG["diffusion"], checkpoint).state_dict()
    text = transformers_clip(CFG["clip"], checkpoint).state_dict()
    text = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in text.items()}
    return {**{f"unet:{k[:-7]}": v.shape for k, v in unet.items() if k.endswith(".weight")},
            **{f"te:{k[:-7]}": v.shape for k, v in text.items() if k.endswith(".weight")}}


def factors(shape: torch.Size, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) for a weight (out, in) or (out, in, kh, kw), as kohya shapes them."""
    out, inp, *kernel = shape
    down = torch.randn(RANK, inp, *kernel, generator=g) * 0.3
    up = torch.randn(out, RANK, *([1, 1] if kernel else []), generator=g) * 0.3
    return down, up


def kohya_file(path, models, seed=0, alpha=ALPHA):
    shapes, g, tensors = weight_shapes(models), torch.Generator().manual_seed(seed), {}
    for prefix, layers, kind in (("lora_unet_", UNET_LAYERS, "unet"), ("lora_te_", TEXT_LAYERS, "te")):
        for layer in layers:
            name = prefix + layer.replace(".", "_")
            down, up = factors(shapes[f"{kind}:{layer}"], g)
            tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                        f"{name}.alpha": torch.tensor(alpha)}
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


def peft_file(path, models, seed=0):
    shapes, g, tensors = weight_shapes(models), torch.Generator().manual_seed(seed), {}
    for prefix, layers, kind in (("unet.", UNET_LAYERS[:5], "unet"), ("text_encoder.", TEXT_LAYERS, "te")):
        for layer in layers:
            down, up = factors(shapes[f"{kind}:{layer}"], g)
            tensors |= {f"{prefix}{layer}.lora_A.weight": down, f"{prefix}{layer}.lora_B.weight": up}
    save_file(tensors, str(path))
    return path


def inputs():
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 77, CFG["clip"].d_model, generator=g)
    return latents, context, torch.tensor(500), tokenize(["a red fox", "two blue squares"])


@torch.no_grad()
def outputs(models):
    latents, context, t, ids = inputs()
    return models["diffusion"](latents, context, t), models["clip"](ids)


@torch.no_grad()
def diffusers_outputs(base, path):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    class Loader(StableDiffusionLoraLoaderMixin):  # the part of a diffusers pipeline the LoRA loader uses
        unet_name, text_encoder_name, hf_device_map = "unet", "text_encoder", None

        @property
        def components(self):
            return {"unet": self.unet, "text_encoder": self.text_encoder}

    checkpoint = to_standard_weights(base)
    loader = Loader()
    loader.unet = diffusers_unet(CFG["diffusion"], checkpoint)
    loader.text_encoder = transformers_clip(CFG["clip"], checkpoint)
    loader.load_lora_weights(str(path))
    loader.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0)
    latents, context, t, ids = inputs()
    return loader.unet(latents, t, encoder_hidden_states=context).sample, loader.text_encoder(ids).last_hidden_state


def close(a, b, rtol=1e-5):
    return (a - b).abs().max() <= rtol * b.abs().max()


@pytest.mark.parametrize("make", [kohya_file, peft_file])
def test_merged_outputs_equal_diffusers_load_lora_weights_and_fuse(models, tmp_path, make):
    path = make(tmp_path / "style.safetensors", models)
    expected_unet, expected_clip = diffusers_outputs(random_models(CFG, seed=11), path)
    before = outputs(models)
    apply_lora(models, path)
    unet, clip = outputs(models)
    assert close(unet, expected_unet) and close(clip, expected_clip)
    assert not close(unet, before[0], 1e-3) and not close(clip, before[1], 1e-3)  # the LoRA did change both


def test_remove_restores_every_weight_bit_for_bit_and_multiplier_0_changes_nothing(models, tmp_path):
    original = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in models.items()}

    def unchanged():
        return all(torch.equal(v, original[n][k]) for n, m in models.items() for k, v in m.state_dict().items())

    one, two = kohya_file(tmp_path / "one.safetensors", models, 1), kohya_file(tmp_path / "two.safetensors", models, 2)
    twice = apply_lora(models, one, 0.7), apply_lora(models, one, 0.7)  # the same file twice: two merges
    twice[0].remove()
    twice[1].remove()
    assert unchanged() and applied_loras(models) == []
    first = apply_lora(models, one, 0.7)
    second = apply_lora(models, two, -1.3)
    assert not unchanged() and applied_loras(models) == [first, second]
    first.remove()  # out of order: the second is taken out, the first, and the second merged again
    only_second = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in models.items()}
    second.remove()
    assert unchanged() and applied_loras(models) == []
    again = apply_lora(models, two, -1.3)
    assert all(torch.equal(v, only_second[n][k]) for n, m in models.items() for k, v in m.state_dict().items())
    again.remove()
    with apply_lora(models, one, 0.0):
        assert unchanged()
    assert unchanged()


def test_remove_is_exact_in_bfloat16(tmp_path):
    models = {n: m.to(torch.bfloat16) for n, m in random_models(CFG, seed=11).items()}
    original = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in models.items()}
    apply_lora(models, kohya_file(tmp_path / "s.safetensors", models)).remove()
    assert all(torch.equal(v, original[n][k]) for n, m in models.items() for k, v in m.state_dict().items())


@torch.no_grad()
def test_loha_merges_its_hadamard_product(models, tmp_path):
    g = torch.Generator().manual_seed(3)
    w1a, w1b, w2a, w2b = (torch.randn(s, generator=g) for s in [(32, 4), (4, 32), (32, 4), (4, 32)])
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q"
    save_file({f"{name}.hada_w1_a": w1a, f"{name}.hada_w1_b": w1b, f"{name}.hada_w2_a": w2a,
               f"{name}.hada_w2_b": w2b, f"{name}.alpha": torch.tensor(2.0)}, path := tmp_path / "loha.safetensors")
    weight = models["diffusion"].unet.encoders[1][1].attention_2.q_proj.weight
    expected = weight + 0.5 * (w1a @ w1b) * (w2a @ w2b) * (2.0 / 4)
    apply_lora(models, path, 0.5)
    assert torch.allclose(weight, expected, atol=1e-6)


def test_the_original_layouts_kohya_names_reach_the_same_weights(models, tmp_path):
    """Older kohya files name UNet layers by the original checkpoint's modules (lora_unet_input_blocks_1_1_...)."""
    g = torch.Generator().manual_seed(4)
    down, up = torch.randn(RANK, 32, generator=g), torch.randn(32, RANK, generator=g)
    for i, name in enumerate(["lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_k",
                              "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"]):
        save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}, tmp_path / f"{i}.safetensors")
    with apply_lora(models, tmp_path / "0.safetensors"):
        a = outputs(models)[0]
    with apply_lora(models, tmp_path / "1.safetensors"):
        b = outputs(models)[0]
    assert torch.equal(a, b) and not torch.equal(a, outputs(models)[0])


def test_peft_alpha_from_diffusers_metadata(models, tmp_path):
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    g = torch.Generator().manual_seed(5)
    tensors = {f"{name}.lora_A.weight": torch.randn(RANK, 32, generator=g),
               f"{name}.lora_B.weight": torch.randn(32, RANK, generator=g)}
    save_file(tensors, plain := tmp_path / "plain.safetensors")
    save_file(tensors, scaled := tmp_path / "scaled.safetensors",
              metadata={"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 2 * RANK, "unet.r": RANK})})
    weight = models["diffusion"].unet.encoders[1][1].attention_1.in_proj.weight
    base = weight.detach().clone()
    with apply_lora(models, plain):
        once = weight.detach() - base
    with apply_lora(models, scaled):
        assert torch.allclose(weight.detach() - base, 2 * once, atol=1e-6)


def test_bad_files_are_refused_before_any_weight_changes(models, tmp_path):
    original = {k: v.clone() for k, v in models["diffusion"].state_dict().items()}
    good = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    d, u = torch.ones(RANK, 32), torch.ones(32, RANK)
    files = {
        "unknown": ({f"{good}.lora_down.weight": d, f"{good}.lora_up.weight": u,
                     "lora_unet_nowhere_to_q.lora_down.weight": d, "lora_unet_nowhere_to_q.lora_up.weight": u},
                    "1 of its 2 layers match no layer of these models: lora_unet_nowhere_to_q"),
        "embedding": ({"lora_te_text_model_embeddings_position_embedding.lora_down.weight": d,
                       "lora_te_text_model_embeddings_position_embedding.lora_up.weight": torch.ones(77, RANK)},
                      "match no layer of these models: lora_te_text_model_embeddings_position_embedding"),
        "sdxl": ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": d,
                  "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": u}, "an SDXL LoRA"),
        "wide": ({f"{good}.lora_down.weight": torch.ones(RANK, 1024), f"{good}.lora_up.weight": u},
                 r"its update is \(32, 1024\), the layer's weight \(32, 32\)"),
        "model": ({"model.diffusion_model.input_blocks.0.0.weight": d}, "not a LoRA.*full Stable Diffusion checkpoint"),
        "lonely": ({f"{good}.lora_down.weight": d}, "lacks its lora_up.weight"),
        "alpha": ({f"{good}.alpha": torch.tensor(1.0)}, "lacks its lora_down.weight, lora_up.weight"),
        "ranks": ({f"{good}.lora_down.weight": torch.ones(3, 32), f"{good}.lora_up.weight": u},
                  r"its up \(32, 4\) and down \(3, 32\) do not multiply"),
        "alphas": ({f"{good}.lora_down.weight": d, f"{good}.lora_up.weight": u, f"{good}.alpha": torch.ones(2)},
                   "its alpha must be one number"),
        "extra": ({f"{good}.lora_down.weight": d, f"{good}.lora_up.weight": u, "something.else": d},
                  "no LoRA layer's: something.else"),
        "tucker": ({f"{good}.lora_down.weight": d, f"{good}.lora_up.weight": u, f"{good}.lora_mid.weight": d},
                   "Tucker core"),
        "nan": ({f"{good}.lora_down.weight": d * float("nan"), f"{good}.lora_up.weight": u}, "NaN or inf"),
    }
    for name, (tensors, message) in files.items():
        save_file({k: v.clone() for k, v in tensors.items()}, path := tmp_path / f"{name}.safetensors")
        with pytest.raises(ValueError, match=message):
            apply_lora(models, path)
    save_file({f"{good}.lora_down.weight": d, f"{good}.lora_up.weight": u}, ok := tmp_path / "ok.safetensors")
    with pytest.raises(ValueError, match="finite number"):
        apply_lora(models, ok, float("inf"))
    with pytest.raises(FileNotFoundError, match="LoRA not found"):
        apply_lora(models, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="is a folder; give a LoRA file"):
        apply_lora(models, tmp_path)
    with pytest.raises(ValueError, match="become inf or NaN in float32: use a smaller multiplier"):
        apply_lora(models, ok, 1e38)
    assert all(torch.equal(v, original[k]) for k, v in models["diffusion"].state_dict().items())
    assert applied_loras(models) == []
    assert issubclass(LoraError, ValueError)


def test_prompt_tags_merge_for_the_call_only(models, tmp_path):
    from sd.pipeline import generate

    (tmp_path / "loras").mkdir()
    kohya_file(tmp_path / "loras" / "style.safetensors", models)
    common = dict(models=models, seed=0, n_inference_steps=3, height=16, width=16, progress=False)
    plain = generate("a cat", **common)
    tagged_0 = generate("a cat <lora:style:0>", lora_dir=tmp_path / "loras", **common)
    tagged = generate("a cat <lora:style:0.8>", lora_dir=tmp_path / "loras", **common)
    with apply_lora(models, tmp_path / "loras" / "style.safetensors", 0.8):
        merged = generate("a cat", **common)
    assert (plain == tagged_0).all() and (tagged == merged).all() and not (tagged == plain).all()
    assert (generate("a cat", **common) == plain).all()  # taken out after the call
    with pytest.raises(ValueError, match="give lora_dir"):
        generate("a cat <lora:style>", **common)
    with pytest.raises(FileNotFoundError, match="no missing.safetensors .* it has style"):
        generate("a cat <lora:missing>", lora_dir=tmp_path / "loras", **common)
    with pytest.raises(ValueError, match="hypernetworks"):
        generate("a cat <hypernet:x:1>", lora_dir=tmp_path / "loras", **common)
    with pytest.raises(ValueError, match="negative prompt"):
        generate("a cat", negative_prompt="<lora:style>", lora_dir=tmp_path / "loras", **common)
    with pytest.raises(ValueError, match="name different"):
        generate(["a <lora:style>", "b"], lora_dir=tmp_path / "loras", **common)
    with pytest.raises(ValueError, match="not a path out of it"):
        generate("a <lora:../loras/style>", lora_dir=tmp_path / "loras", **common)
    with pytest.warns(UserWarning, match="reads as text: no LoRA is applied"):
        generate("a cat <lora:style:0.8>", lora_dir=tmp_path / "loras", prompt_syntax="plain", **common)
    # <lora:name:te:unet>: the text encoder's and the UNet's multipliers apart
    with apply_lora(models, tmp_path / "loras" / "style.safetensors", 0.8, unet_multiplier=0.3):
        split = generate("a cat", **common)
    assert (generate("a cat <lora:style:0.8:0.3>", lora_dir=tmp_path / "loras", **common) == split).all()
    assert (generate("a cat <lora:style:te=0.8:unet=0.3>", lora_dir=tmp_path / "loras", **common) == split).all()
    assert applied_loras(models) == []


def test_lora_hash_is_automatic1111s_addnet_hash(tmp_path, models):
    import hashlib

    path = kohya_file(tmp_path / "x.safetensors", models)
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    assert lora_hash(path) == hashlib.sha256(data[header:]).hexdigest()[:12]


def test_end_to_end_on_the_embedded_model_with_a_lora_extracted_from_a_fine_tune(tmp_path):
    """A copy of the embedded model fine-tuned for a few steps; its difference from the original, cut to rank 4 by
    SVD, saved as a kohya LoRA: `sd generate --lora` gives the image of the merged weights, <lora:...:0> the
    original's."""
    import numpy as np
    import torch.nn.functional as F
    from PIL import Image

    from sd.cli import EMBEDDED_CHECKPOINT, main
    from sd.lora import extract_lora
    from sd.model_loader import preload_models_from_standard_weights
    from sd.pipeline import generate

    base = preload_models_from_standard_weights(EMBEDDED_CHECKPOINT)
    tuned = preload_models_from_standard_weights(EMBEDDED_CHECKPOINT)
    trained = [p for n, p in tuned["diffusion"].named_parameters() if "attention_2" in n and p.dim() == 2]
    optimizer = torch.optim.Adam(trained, lr=1e-3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        context = tuned["clip"](tokenize(["a sks shape"] * 2))
    for _ in range(4):
        noise, latents = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        loss = F.mse_loss(tuned["diffusion"](latents, context, torch.tensor(500)), noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    (tmp_path / "loras").mkdir()
    save_file(extract_lora(base, tuned, rank=4), lora := tmp_path / "loras" / "sks.safetensors")

    merged = preload_models_from_standard_weights(EMBEDDED_CHECKPOINT)
    apply_lora(merged, lora)
    for (name, w), w0, w1 in zip(merged["diffusion"].named_parameters(), base["diffusion"].parameters(),
                                 tuned["diffusion"].parameters()):
        if "attention_2" in name and w.dim() == 2:  # the best rank-4 approximation of the fine-tune's change
            u, s, vh = torch.linalg.svd((w1 - w0).detach())
            assert torch.allclose(w, w0 + (u[:, :4] * s[:4]) @ vh[:4], atol=1e-6)
        else:
            assert torch.equal(w, w0)

    def cli(out, prompt, *extra):
        assert main(["generate", prompt, "-o", str(out), "--steps", "4", "--seed", "5", "--quiet", "--dtype",
                     "float32", *extra]) == 0
        return np.asarray(Image.open(out))

    expected = generate("a sks shape", models=merged, seed=5, n_inference_steps=4, sampler_name="dpmpp_2m_karras",
                        progress=False)
    original = generate("a sks shape", models=base, seed=5, n_inference_steps=4, sampler_name="dpmpp_2m_karras",
                        progress=False)
    assert np.array_equal(cli(tmp_path / "a.png", "a sks shape", "--lora", str(lora)), expected)
    assert np.array_equal(cli(tmp_path / "b.png", "a sks shape <lora:sks:0>", "--lora-dir", str(tmp_path / "loras")),
                          original)
    assert np.abs(expected.astype(int) - original).mean() > 1  # the LoRA changed the image
