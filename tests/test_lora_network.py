"""sd.training.lora_network: the trainable LoRA. It starts as the base model exactly; only its own parameters train;
the kohya file it saves, merged by sd.apply_lora and by diffusers' load_lora_weights, gives the outputs the hooked
network gives."""

import pytest
import torch
from safetensors.torch import save_file

from sd.lora import apply_lora
from sd.training.lora_network import LoraNetwork

from reference import random_models, tiny_configs
from test_lora import close, diffusers_outputs, inputs

CFG = tiny_configs()


@pytest.fixture
def models():
    return random_models(CFG, seed=11)


@torch.no_grad()
def outputs(models):
    latents, context, t, ids = inputs()
    return models["diffusion"](latents, context, t), models["clip"](ids)


def randomise_up(network, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pair in network.pairs.values():
            pair.up.weight.copy_(torch.randn(pair.up.weight.shape, generator=g) * 0.1)


def test_it_starts_as_the_base_model_and_only_its_parameters_train(models):
    before = outputs(models)
    network = LoraNetwork(models, rank=4, text_encoder=True)
    after = outputs(models)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])  # up starts at zero
    assert all(not any(p is q for q in network.parameters()) for m in models.values() for p in m.parameters())
    network.remove()


@pytest.mark.parametrize("targets", [("attention",), ("attention", "feed_forward", "projection", "conv")])
def test_its_kohya_file_merged_gives_the_networks_outputs(models, tmp_path, targets):
    network = LoraNetwork(models, rank=4, alpha=2.0, targets=targets, text_encoder=True)
    randomise_up(network)
    hooked = outputs(models)
    network.remove()
    assert not close(outputs(models)[0], hooked[0], 1e-3)  # removed: the base model again
    save_file(network.kohya_state_dict(), path := tmp_path / "trained.safetensors")
    with apply_lora(models, path):
        merged = outputs(models)
    assert close(merged[0], hooked[0]) and close(merged[1], hooked[1])


def test_diffusers_loads_its_file_to_the_same_outputs(models, tmp_path):
    base = random_models(CFG, seed=11)
    network = LoraNetwork(models, rank=4, alpha=8.0, targets=("attention", "projection", "conv"), text_encoder=True)
    randomise_up(network, seed=1)
    hooked = outputs(models)
    save_file(network.kohya_state_dict(), path := tmp_path / "trained.safetensors")
    unet, clip = diffusers_outputs(base, path)
    assert close(unet, hooked[0]) and close(clip, hooked[1])


def test_gradients_reach_only_the_lora(models):
    network = LoraNetwork(models, rank=2)
    randomise_up(network)
    for m in models.values():
        m.requires_grad_(False)
    latents, context, t, _ = inputs()
    models["diffusion"](latents, context, t).square().mean().backward()
    assert all(p.grad is not None for p in network.parameters())
    assert all(p.grad is None for m in models.values() for p in m.parameters())


@pytest.mark.parametrize("kwargs, message", [({"rank": 0}, "rank must be a positive whole number"),
                                             ({"alpha": float("nan")}, "alpha must be a positive number"),
                                             ({"targets": ("everything",)}, "targets must be some of")])
def test_bad_settings(models, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraNetwork(models, **kwargs)


def test_save_lora_writes_kohyas_layout_and_metadata_whole(models, tmp_path):
    from sd.checkpoint_io import open_checkpoint
    from sd.training.lora_network import save_lora

    network = LoraNetwork(models, rank=4, alpha=2.0)
    randomise_up(network)
    hooked = outputs(models)
    network.remove()
    path = save_lora(network, tmp_path / "sks.safetensors", learning_rate=1e-4, max_train_steps=100, seed=0,
                     resolution=(16, 16))
    metadata = open_checkpoint(path).metadata
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_network_dim"] == "4"
    assert metadata["ss_network_alpha"] == "2" and metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_learning_rate"] == "0.0001" and metadata["ss_resolution"] == "[16, 16]"
    with apply_lora(models, path):
        assert close(outputs(models)[0], hooked[0])
    with pytest.raises(FileExistsError):
        save_lora(network, path)
    assert save_lora(network, path, overwrite=True) == path
    with pytest.raises(ValueError, match="written as .safetensors"):
        save_lora(network, tmp_path / "sks.pt")
