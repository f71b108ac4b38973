"""The sd command with what AUTOMATIC1111 users bring: --clip-skip, --plain-prompt, --embedding, --lora, --lora-dir
and <lora:...> tags, each recorded in the image's parameters as AUTOMATIC1111 writes them; and their errors."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from reference import random_models, tiny_configs
from sd.cli import main, parse_a1111_parameters
from test_cli import no_model_load  # noqa: F401  (a fixture: every check before the checkpoint is read)
from sd.model_loader import IMAGE_SIZE_METADATA_KEY, save_standard_weights

LORA_LAYER = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    return save_standard_weights(random_models(tiny_configs(), seed=8), path, metadata={IMAGE_SIZE_METADATA_KEY: "16"})


@pytest.fixture(scope="module")
def extras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("extras")
    g = torch.Generator().manual_seed(0)
    save_file({"emb_params": torch.randn(2, 32, generator=g)}, folder / "sksstyle.safetensors")
    (folder / "loras").mkdir()
    save_file({f"{LORA_LAYER}.lora_down.weight": torch.randn(4, 32, generator=g),
               f"{LORA_LAYER}.lora_up.weight": torch.randn(32, 4, generator=g)}, folder / "loras" / "glow.safetensors")
    return folder


def run(checkpoint, out, prompt="a cat", *extra):
    return main(["generate", prompt, "-o", str(out), "--checkpoint", str(checkpoint), "--steps", "3", "--seed", "3",
                 "--quiet", "--dtype", "float32", *extra])


def params(path):
    return parse_a1111_parameters(Image.open(path).text["parameters"])


def pixels(path):
    return np.asarray(Image.open(path)).astype(int)


def test_clip_skip_and_plain_prompt(checkpoint, tmp_path):
    assert run(checkpoint, tmp_path / "a.png", "a (cat:1.4)") == 0
    assert run(checkpoint, tmp_path / "b.png", "a (cat:1.4)", "--clip-skip", "2") == 0
    assert run(checkpoint, tmp_path / "c.png", "a (cat:1.4)", "--plain-prompt") == 0
    assert "Clip skip" not in params(tmp_path / "a.png") and params(tmp_path / "b.png")["Clip skip"] == "2"
    assert not np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))
    assert not np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "c.png"))


def test_an_embedding_is_used_and_its_hash_recorded(checkpoint, tmp_path, extras):
    from sd.embeddings import file_sha256

    emb = extras / "sksstyle.safetensors"
    assert run(checkpoint, tmp_path / "with.png", "a sksstyle cat", "--embedding", str(emb)) == 0
    assert run(checkpoint, tmp_path / "without.png", "a sksstyle cat") == 0
    assert params(tmp_path / "with.png")["TI hashes"] == f"sksstyle: {file_sha256(emb)[:12]}"
    assert "TI hashes" not in params(tmp_path / "without.png")
    assert not np.array_equal(pixels(tmp_path / "with.png"), pixels(tmp_path / "without.png"))
    assert run(checkpoint, tmp_path / "unused.png", "a cat", "--embedding", str(emb)) == 0
    assert "TI hashes" not in params(tmp_path / "unused.png")


def test_lora_by_option_and_by_tag_give_the_same_image(checkpoint, tmp_path, extras):
    from sd.lora import lora_hash

    lora = extras / "loras" / "glow.safetensors"
    assert run(checkpoint, tmp_path / "opt.png", "a cat", "--lora", f"{lora}:0.6") == 0
    assert run(checkpoint, tmp_path / "tag.png", "a cat <lora:glow:0.6>", "--lora-dir", str(extras / "loras")) == 0
    assert run(checkpoint, tmp_path / "zero.png", "a cat <lora:glow:0>", "--lora-dir", str(extras / "loras")) == 0
    assert run(checkpoint, tmp_path / "none.png", "a cat") == 0
    assert np.array_equal(pixels(tmp_path / "opt.png"), pixels(tmp_path / "tag.png"))
    assert np.array_equal(pixels(tmp_path / "zero.png"), pixels(tmp_path / "none.png"))
    assert not np.array_equal(pixels(tmp_path / "opt.png"), pixels(tmp_path / "none.png"))
    for name in ("opt.png", "tag.png"):
        p = params(tmp_path / name)
        assert p["Lora hashes"] == f"glow: {lora_hash(lora)}" and p["prompt"] == "a cat <lora:glow:0.6>"


@pytest.mark.parametrize("extra,message", [
    (["--clip-skip", "0"], "--clip-skip must be 1"),
    (["--clip-skip", "3"], "--clip-skip must be from 1 to 2 (this text encoder's layers), got 3"),
    (["--embedding", "nowhere.pt"], "embedding not found: nowhere.pt"),
    (["--lora", "nowhere.safetensors:0.5"], "LoRA not found: nowhere.safetensors"),
    (["--lora", "{extras}/loras/glow.safetensors:nan"], "multiplier must be a finite number"),
    (["--lora", "{extras}/sksstyle.safetensors"], "not a LoRA"),
    (["--embedding", "{extras}/loras/glow.safetensors"], "not a textual-inversion embedding"),
    (["--lora-dir", "{extras}/nowhere"], "is not a folder"),
])
def test_bad_extras_are_one_line_before_the_model_loads(checkpoint, tmp_path, extras, capsys, no_model_load, extra,
                                                         message):
    extra = [e.format(extras=extras) for e in extra]
    assert run(checkpoint, tmp_path / "x.png", "a cat", *extra) == 1
    err = capsys.readouterr().err
    assert err.startswith("sd: error: ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("prompt,extra,message", [
    ("a <lora:glow>", [], "give lora_dir (sd: --lora-dir DIR)"),
    ("a <lora:nope:1>", ["--lora-dir", "{extras}/loras"], "no nope.safetensors (or .pt, .ckpt) in"),
    ("a <hypernet:x:1>", [], "hypernetworks are not supported"),
    ("a <lora:glow:lots>", [], "write <lora:NAME>, <lora:NAME:MULTIPLIER> or <lora:NAME:TE:UNET> with numbers"),
])
def test_bad_tags_are_one_line_before_the_model_loads(checkpoint, tmp_path, extras, capsys, no_model_load, prompt,
                                                       extra, message):
    assert run(checkpoint, tmp_path / "x.png", prompt, *[e.format(extras=extras) for e in extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sd: error: ") and message in err and len(err.splitlines()) == 1


def test_a_layer_the_model_lacks_is_one_line_before_the_model_loads(checkpoint, tmp_path, capsys, no_model_load):
    save_file({"lora_unet_nowhere_to_q.lora_down.weight": torch.ones(4, 32),
               "lora_unet_nowhere_to_q.lora_up.weight": torch.ones(32, 4)}, bad := tmp_path / "bad.safetensors")
    assert run(checkpoint, tmp_path / "x.png", "a cat", "--lora", str(bad)) == 1
    err = capsys.readouterr().err
    assert err.startswith("sd: error: ") and len(err.splitlines()) == 1
    assert "match no layer of these models: lora_unet_nowhere_to_q" in err
