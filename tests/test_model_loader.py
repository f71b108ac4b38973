"""model_loader: every file form the released checkpoints come in, dtypes, EMA, and clear errors for the rest."""

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import sd.model_loader
from reference import random_models, tiny_configs
from sd.checkpoint_io import CheckpointError, UnsafeCheckpointError, open_checkpoint
from sd.clip import CLIPConfig
from sd.decoder import VAEConfig
from sd.diffusion import DiffusionConfig
from sd.model_converter import UNET_PREFIX, ema_key, to_standard_weights
from sd.model_loader import (CONFIG_METADATA_KEY, IMAGE_SIZE_METADATA_KEY, checkpoint_image_size,
                             configs_from_checkpoint, preload_models_from_standard_weights, save_standard_weights)

EMBEDDED = Path(__file__).parent.parent / "weights" / "sd-shapes.safetensors"


@pytest.fixture(scope="module")
def tiny():
    configs = tiny_configs()
    models = random_models(configs, seed=3)
    return configs, models, to_standard_weights(models)


def weights_equal(models, checkpoint) -> bool:
    got = to_standard_weights(models)
    return got.keys() == checkpoint.keys() and all(torch.equal(got[k], checkpoint[k].to(got[k].dtype)) for k in got)


@pytest.mark.parametrize("form", ["state_dict wrapper", "flat"])
def test_ckpt_files_load(tmp_path, tiny, form):
    configs, _, checkpoint = tiny
    path = tmp_path / "tiny.ckpt"
    # Released .ckpt files also carry schedule buffers and training counters beside the weights.
    extras = {"betas": torch.linspace(0.00085, 0.012, 1000), "model_ema.num_updates": torch.tensor(1, dtype=torch.int32)}
    weights = {**checkpoint, **extras}
    torch.save({"state_dict": weights, "global_step": 470000} if form != "flat" else weights, path)
    models = preload_models_from_standard_weights(path, configs=configs)
    assert weights_equal(models, checkpoint)
    assert all(not m.training for m in models.values())


def test_safetensors_carries_its_configs(tmp_path, tiny):
    _, models, checkpoint = tiny
    path = save_standard_weights(models, tmp_path / "tiny.safetensors")
    loaded = preload_models_from_standard_weights(path)  # no configs given: read from the file's metadata
    assert loaded["diffusion"].config == models["diffusion"].config
    assert weights_equal(loaded, checkpoint)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_loads_in_that_dtype(tmp_path, tiny, dtype):
    _, models, checkpoint = tiny
    path = save_standard_weights(models, tmp_path / "tiny.safetensors")
    loaded = preload_models_from_standard_weights(path, dtype=dtype)
    assert all(p.dtype == dtype for m in loaded.values() for p in m.parameters())
    assert weights_equal(loaded, {k: v.to(dtype) for k, v in checkpoint.items()})


def test_full_checkpoint_uses_ema_weights_by_default(tmp_path, tiny):
    """v1-5-pruned.ckpt: training weights under model.diffusion_model.*, EMA under model_ema.* without dots."""
    configs, _, checkpoint = tiny
    ema_models = random_models(configs, seed=99)
    ema = {ema_key(k): v for k, v in to_standard_weights(ema_models).items() if k.startswith(UNET_PREFIX)}
    path = tmp_path / "full.ckpt"
    torch.save({"state_dict": {**checkpoint, **ema, "model_ema.decay": torch.tensor(0.9999)}}, path)

    with_ema = preload_models_from_standard_weights(path, configs=configs)
    for (_, ours), (_, theirs) in zip(with_ema["diffusion"].named_parameters(), ema_models["diffusion"].named_parameters()):
        assert torch.equal(ours, theirs)
    without = preload_models_from_standard_weights(path, configs=configs, use_ema=False)
    assert weights_equal(without, checkpoint)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_models_keep_nothing_of_the_file(tmp_path, tiny, suffix):
    """Both formats are mapped while loading; the parameters must be fresh memory. A model still reading the
    file's mapping would crash (SIGBUS) once the file is truncated."""
    _, models, checkpoint = tiny
    path = save_standard_weights(models, tmp_path / f"tiny{suffix}")
    loaded = preload_models_from_standard_weights(path, configs=tiny_configs())
    path.write_bytes(b"")  # truncated in place, as an interrupted re-download would
    assert weights_equal(loaded, checkpoint)


def test_inpainting_channels_are_read_from_the_checkpoint(tmp_path):
    """No metadata (as the released sd-v1-5-inpainting): the UNet's input width comes from its first conv."""
    path = tmp_path / "inpaint.safetensors"
    save_file({UNET_PREFIX + "input_blocks.0.0.weight": torch.zeros(320, 9, 3, 3),
               UNET_PREFIX + "out.2.weight": torch.zeros(4, 320, 3, 3)}, str(path))
    configs = configs_from_checkpoint(open_checkpoint(path))
    assert configs["diffusion"] == DiffusionConfig(in_channels=9)
    assert configs["clip"] == CLIPConfig() and configs["vae"] == VAEConfig()

    models = random_models(tiny_configs(in_channels=9), seed=5)
    path = tmp_path / "tiny-inpaint.ckpt"
    torch.save({"state_dict": to_standard_weights(models)}, path)
    loaded = preload_models_from_standard_weights(path, configs=tiny_configs(in_channels=9))
    assert loaded["diffusion"].config.in_channels == 9
    assert weights_equal(loaded, to_standard_weights(models))


# --- bad input: each a clear message, raised before any weights are read --------------------------------


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="weights"):
        preload_models_from_standard_weights("weights/no-such-model.safetensors")


@pytest.mark.parametrize("content", [b"", b"hello, I am a text file\n" * 10, os.urandom(4096)], ids=["empty", "text", "random"])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "model.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        preload_models_from_standard_weights(path)


def test_truncated_file(tmp_path, tiny):
    _, models, _ = tiny
    path = save_standard_weights(models, tmp_path / "tiny.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        preload_models_from_standard_weights(path)


def _other(kind: str) -> dict[str, torch.Tensor]:
    t = torch.zeros(2, 2)
    files = {
        "SD 2.x": {"cond_stage_model.model.token_embedding.weight": t, UNET_PREFIX + "input_blocks.0.0.weight": t},
        "SDXL": {"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": t},
        "LoRA": {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": t},
        "diffusers' layout": {"conv_in.weight": t, "down_blocks.0.resnets.0.conv1.weight": t},
        "VAE on its own": {"encoder.conv_in.weight": t, "decoder.conv_in.weight": t},
        "not a Stable Diffusion checkpoint": {"fc.weight": t, "fc.bias": t[0]},
        "without its VAE and text encoder": {UNET_PREFIX + "input_blocks.0.0.weight": t},
    }
    return {k: v.clone() for k, v in files[kind].items()}  # safetensors refuses tensors that share memory


@pytest.mark.parametrize("kind", ["SD 2.x", "SDXL", "LoRA", "diffusers' layout", "VAE on its own",
                                  "not a Stable Diffusion checkpoint", "without its VAE and text encoder"])
def test_other_architectures_are_named(tmp_path, kind):
    path = tmp_path / "other.safetensors"
    save_file(_other(kind), str(path))
    with pytest.raises(CheckpointError, match=kind.replace(".", r"\.")) as info:
        preload_models_from_standard_weights(path)
    assert "Stable Diffusion 1.x" in str(info.value)


def test_sd2_context_width_is_named(tmp_path, tiny):
    _, _, checkpoint = tiny
    bad = dict(checkpoint)
    bad[UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] = torch.zeros(32, 1024)
    path = tmp_path / "sd2.safetensors"
    save_file(bad, str(path))
    with pytest.raises(CheckpointError, match="context 1024"):
        preload_models_from_standard_weights(path)


def test_unsafe_ckpt_is_refused(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Exploit()}, path)
    with pytest.raises(UnsafeCheckpointError, match="os.system|posix.system"):
        preload_models_from_standard_weights(path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("dtype", [torch.int8, "float16", None])
def test_bad_dtype(tmp_path, dtype):
    with pytest.raises(ValueError, match="dtype must be one of"):
        preload_models_from_standard_weights(tmp_path / "never-opened.safetensors", dtype=dtype)


def test_recorded_image_size_is_the_default_size(tmp_path, tiny):
    """A file of ours trained at another size records it: the UNet's sample_size, generate()'s default, follows."""
    _, models, _ = tiny
    path = save_standard_weights(models, tmp_path / "m.safetensors", metadata={IMAGE_SIZE_METADATA_KEY: "40"})
    assert preload_models_from_standard_weights(path)["diffusion"].config.sample_size == 20  # the tiny VAE halves
    bad = save_standard_weights(models, tmp_path / "bad.safetensors", metadata={IMAGE_SIZE_METADATA_KEY: "abc"})
    with pytest.raises(CheckpointError, match="bad.safetensors: its 'sd_image_size' metadata must be a positive"):
        preload_models_from_standard_weights(bad)


# --- metadata a file records: crafted values are refused in one line naming the file; .ckpt keeps it too -----------


def rewrite_metadata(path: Path, edit) -> Path:
    """The same tensors with edit(metadata) as the file's metadata: how a crafted or damaged file looks."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file(safetensors.torch.load_file(str(path)), str(path), metadata=edit(dict(metadata)))
    return path


def with_config_value(model: str, field: str, value):
    def edit(metadata):
        configs = json.loads(metadata[CONFIG_METADATA_KEY])
        configs[model][field] = value
        return {**metadata, CONFIG_METADATA_KEY: json.dumps(configs)}  # NaN is written as JSON's NaN
    return edit


@pytest.mark.parametrize("model,field,value", [
    ("vae", "block_out_channels", [-32, 64]),        # a negative width
    ("diffusion", "model_channels", -5),
    ("clip", "n_heads", 0),
    ("clip", "d_model", 30),                          # not divisible by its 4 heads
    ("vae", "n_groups", 7),                           # group norm groups that do not divide 32 and 64
    ("diffusion", "n_groups", 5),
    ("diffusion", "n_heads", "2"),                    # a string where an int belongs
    ("clip", "n_layers", True),
    ("vae", "latent_scale", float("nan")),
    ("clip", "layer_norm_eps", float("-inf")),
    ("diffusion", "attention_levels", [True, True]),  # one entry short of channel_mult
    ("diffusion", "channel_mult", "122"),
    ("diffusion", "sample_size", 8.5),
    ("diffusion", "d_context", 16),                   # the UNet would attend to a 16-wide text encoder; CLIP is 32
    ("diffusion", "no_such_field", 1),
])
def test_crafted_configs_are_refused_naming_file_and_field(tmp_path, tiny, model, field, value):
    _, models, _ = tiny
    path = rewrite_metadata(save_standard_weights(models, tmp_path / "crafted.safetensors"),
                            with_config_value(model, field, value))
    for load in (preload_models_from_standard_weights, checkpoint_image_size):
        with pytest.raises(CheckpointError) as info:
            load(path)
        message = str(info.value)
        assert str(path) in message and field in message and "\n" not in message, message


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"unet": {}}', '{"clip": 5}', "[" * 100_000])
def test_config_metadata_that_is_not_configs(tmp_path, tiny, text):
    _, models, _ = tiny
    path = rewrite_metadata(save_standard_weights(models, tmp_path / "odd.safetensors"),
                            lambda m: {**m, CONFIG_METADATA_KEY: text})
    with pytest.raises(CheckpointError, match=f"{path}: its 'sd_configs' metadata is not a valid model config"):
        preload_models_from_standard_weights(path)


@pytest.mark.parametrize("size", ["abc", "0", "-3", "1e9", "99999999999", "32768", "15", " 64", "\uff16\uff14", ""])
def test_crafted_image_size_is_refused_naming_the_file(tmp_path, tiny, size):
    """Not digits, zero, absurd (over 16384 px) or not a multiple of the VAE's downscale (2 for the tiny VAE)."""
    _, models, _ = tiny
    path = save_standard_weights(models, tmp_path / "sized.safetensors", metadata={IMAGE_SIZE_METADATA_KEY: size})
    for load in (preload_models_from_standard_weights, checkpoint_image_size):
        with pytest.raises(CheckpointError, match=f"{path}: its 'sd_image_size' metadata must be a positive whole "
                                                  f"number of pixels, a multiple of 2"):
            load(path)


def test_ckpt_carries_its_configs_and_metadata(tmp_path, tiny):
    """A .ckpt of a non-SD-1.5-size model loads back alone: configs and image size as strings beside state_dict."""
    _, models, checkpoint = tiny
    path = save_standard_weights(models, tmp_path / "tiny.ckpt", metadata={"sd_note": "trained on shapes"})
    metadata = open_checkpoint(path).metadata
    assert metadata["sd_note"] == "trained on shapes" and metadata[IMAGE_SIZE_METADATA_KEY] == "16"
    loaded = preload_models_from_standard_weights(path)  # no configs given
    assert all(loaded[name].config == models[name].config for name in models)
    assert weights_equal(loaded, checkpoint)
    assert checkpoint_image_size(path) == 16


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_resaving_keeps_the_image_size(tmp_path, suffix):
    """The embedded model (64 px images, 16 latents) saved again, in either format, keeps its default size."""
    original = preload_models_from_standard_weights(EMBEDDED)
    path = save_standard_weights(original, tmp_path / f"again{suffix}")
    loaded = preload_models_from_standard_weights(path)
    assert loaded["diffusion"].config.sample_size == original["diffusion"].config.sample_size == 16
    assert checkpoint_image_size(path) == checkpoint_image_size(EMBEDDED) == 64
    assert all(loaded[name].config == original[name].config for name in original)


def test_given_metadata_is_checked(tmp_path, tiny):
    _, models, _ = tiny
    for bad in ({"sd_steps": 1000}, {"state_dict": "x"}):
        with pytest.raises(ValueError, match="metadata must map names to strings"):
            save_standard_weights(models, tmp_path / "m.ckpt", metadata=bad)
    with pytest.raises(ValueError, match="writes .safetensors or .ckpt"):
        save_standard_weights(models, tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []


def _interrupted_writer(calls):
    """A writer that gets some bytes out, then is stopped (Ctrl-C): what a full disk or a kill looks like."""
    def write(obj, path, *args, **kwargs):
        calls.append(Path(path))
        Path(path).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt
    return write


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_interrupted_save_leaves_the_old_file(tmp_path, tiny, monkeypatch, suffix):
    _, models, checkpoint = tiny
    path = save_standard_weights(models, tmp_path / f"model{suffix}")
    before = path.read_bytes()
    calls = []
    if suffix == ".safetensors":
        monkeypatch.setattr(sd.model_loader, "save_file", _interrupted_writer(calls))
    else:
        monkeypatch.setattr(torch, "save", _interrupted_writer(calls))
    with pytest.raises(KeyboardInterrupt):
        save_standard_weights(random_models(tiny_configs(), seed=42), path)
    assert calls and calls[0] != path  # written beside it, under another name
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left
    monkeypatch.undo()
    assert weights_equal(preload_models_from_standard_weights(path), checkpoint)
