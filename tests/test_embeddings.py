"""Textual-inversion embeddings: the three file layouts, parity with diffusers' load_textual_inversion, chunking,
two model sets side by side, and the errors."""

import pytest
import torch
from safetensors.torch import save_file

from sd import load_embedding
from sd.model_converter import to_standard_weights
from sd.pipeline import encode_prompt
from sd.prompt_parser import tokenize_chunks
from sd.tokenizer import VOCAB_SIZE, load_tokenizer

from reference import random_models, tiny_configs, transformers_clip

D = tiny_configs()["clip"].d_model


@pytest.fixture
def models():
    return random_models(tiny_configs(), seed=5)


def vectors(n: int, seed: int = 0, width: int = D) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def a1111_pt(path, v, parameter=False):
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(v) if parameter else v},
                "name": path.stem, "step": 100}, path)
    return path


@pytest.mark.parametrize("layout", ["a1111_pt", "a1111_pt_parameter", "a1111_safetensors", "diffusers_bin",
                                    "diffusers_single_vector"])
def test_every_layout_loads_its_vectors(models, tmp_path, layout):
    v = vectors(1 if layout == "diffusers_single_vector" else 3)
    if layout.startswith("a1111_pt"):
        path = a1111_pt(tmp_path / "sksstyle.pt", v, parameter=layout.endswith("parameter"))
    elif layout == "a1111_safetensors":
        save_file({"emb_params": v}, path := tmp_path / "sksstyle.safetensors")
    else:
        torch.save({"<sksstyle>": v[0] if layout.endswith("vector") else v}, path := tmp_path / "sksstyle.bin")
    assert load_embedding(models, path) == "sksstyle"
    assert torch.equal(models["clip"].embedding.embeddings["sksstyle"], v)
    ids, _ = tokenize_chunks("a sksstyle cat", embeddings=models["clip"].embedding.embedding_ids())
    assert ids[0, 2:2 + len(v)].tolist() == list(range(VOCAB_SIZE, VOCAB_SIZE + len(v)))


@torch.no_grad()
@pytest.mark.parametrize("n_vectors", [1, 3])
def test_the_context_equals_diffusers_load_textual_inversion(models, tmp_path, n_vectors):
    from diffusers.loaders import TextualInversionLoaderMixin
    from transformers import CLIPTokenizer

    from sd.tokenizer import TOKENIZER_DIR

    v = vectors(n_vectors, seed=n_vectors)
    save_file({"emb_params": v}, path := tmp_path / "skstoken.safetensors")

    class Loader(TextualInversionLoaderMixin):  # the part of a diffusers pipeline load_textual_inversion uses
        hf_device_map, components = None, {}

    loader = Loader()
    loader.tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)  # a copy it may change
    loader.text_encoder = transformers_clip(tiny_configs()["clip"], to_standard_weights({"clip": models["clip"]}))
    loader.load_textual_inversion(str(path), token="skstoken")
    prompt = "a photo of skstoken, red"
    ids = loader.tokenizer(loader.maybe_convert_prompt(prompt, loader.tokenizer), padding="max_length",
                           max_length=77, truncation=True, return_tensors="pt").input_ids
    expected = loader.text_encoder(ids).last_hidden_state

    load_embedding(models, path)
    ours = encode_prompt(models, prompt)
    assert torch.allclose(ours, expected, rtol=1e-5, atol=1e-5), (ours - expected).abs().max()
    assert len(load_tokenizer()) == VOCAB_SIZE  # ours never touched the shared tokenizer


def test_a_multi_vector_embedding_is_never_split_across_chunks(models, tmp_path):
    save_file({"emb_params": vectors(4)}, path := tmp_path / "skswide.safetensors")
    load_embedding(models, path)
    ids, weights = tokenize_chunks("a " * 73 + "(skswide:1.2)", embeddings=models["clip"].embedding.embedding_ids())
    assert ids.shape == (2, 77)
    assert ids[0, 1:74].tolist() == [ids[0, 1].item()] * 73 and set(ids[0, 74:].tolist()) == {49407}
    assert ids[1, 1:5].tolist() == list(range(VOCAB_SIZE, VOCAB_SIZE + 4))
    assert torch.allclose(weights[1, 1:5], torch.full((4,), 1.2))


@torch.no_grad()
def test_two_model_sets_hold_different_embeddings_in_one_process(tmp_path):
    a, b = random_models(tiny_configs(), seed=5), random_models(tiny_configs(), seed=5)
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    save_file({"emb_params": vectors(1, seed=1)}, one := tmp_path / "one" / "skstok.safetensors")
    save_file({"emb_params": vectors(1, seed=2)}, two := tmp_path / "two" / "skstok.safetensors")
    load_embedding(a, one)
    load_embedding(b, two)
    without = random_models(tiny_configs(), seed=5)
    ctx_a, ctx_b = encode_prompt(a, "a skstok"), encode_prompt(b, "a skstok")
    assert not torch.equal(ctx_a, ctx_b)
    assert torch.equal(encode_prompt(a, "a cat"), encode_prompt(b, "a cat"))
    assert not torch.equal(encode_prompt(without, "a skstok"), ctx_a)  # a set without it reads the word


def test_a_custom_token_name(models, tmp_path):
    save_file({"emb_params": vectors(2)}, path := tmp_path / "file.safetensors")
    assert load_embedding(models, path, token="my-style") == "my-style"
    ids, _ = tokenize_chunks("my-style dog", embeddings=models["clip"].embedding.embedding_ids())
    assert ids[0, 1:3].tolist() == [VOCAB_SIZE, VOCAB_SIZE + 1]


def test_bad_embeddings_are_refused_and_nothing_changes(models, tmp_path):
    save_file({"a": vectors(1), "b": vectors(1)}, layout := tmp_path / "two.safetensors")
    save_file({"emb_params": vectors(2, width=1024)}, sd2 := tmp_path / "sd2.safetensors")
    save_file({"clip_l": vectors(2), "clip_g": vectors(2, width=1280)}, sdxl := tmp_path / "sdxl.safetensors")
    save_file({"emb_params": torch.full((1, D), float("nan"))}, nan := tmp_path / "nan.safetensors")
    save_file({"emb_params": vectors(1)}, good := tmp_path / "skscat.safetensors")
    save_file({"emb_params": vectors(80)}, long := tmp_path / "long.safetensors")
    (text := tmp_path / "notes.pt").write_text("hello")
    cases = [
        (layout, {}, "not a textual-inversion embedding.*found 2 tensors"),
        (sd2, {}, "1024 wide, this text encoder's 32 .an SD 2.x embedding"),
        (sdxl, {}, "an SDXL embedding"),
        (nan, {}, "NaN or inf"),
        (long, {}, "1 to 75 vectors"),
        (text, {}, "not a checkpoint"),
        (good, {"token": "cat"}, "a word CLIP already knows"),
        (good, {"token": "\U0001f431"}, "a word CLIP already knows"),  # a cat emoji: one byte-level BPE word
        (tmp_path, {}, "is a folder; give an embedding file"),
        (good, {"token": "(x)"}, "without any of"),
        (good, {"token": ""}, "non-empty name"),
        (tmp_path / "missing.pt", {}, "embedding not found"),
    ]
    for path, kwargs, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            load_embedding(models, path, **kwargs)
    assert models["clip"].embedding.embeddings == {}
    load_embedding(models, good)
    with pytest.raises(ValueError, match="already loaded"):
        load_embedding(models, good)
    assert list(models["clip"].embedding.embeddings) == ["skscat"]
