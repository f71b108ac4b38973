"""Key set at full size: the SD 1.5 models, built on the meta device, consume every key of the real
v1-5-pruned-emaonly layout (shared/sd15_ldm_keys.json) and get every parameter with the right shape."""

import json
from pathlib import Path

import pytest
import torch

from sd.diffusion import DiffusionConfig
from sd.model_converter import (
    IGNORED_KEYS, UNET_PREFIX, ConversionError, ema_key, plan_conversion, to_standard_weights,
)
from sd.model_loader import build_models

# Every key of v1-5-pruned-emaonly with shape and dtype, read off the original CompVis model.
KEYS_FILE = Path(__file__).parent / "data" / "sd15_ldm_keys.json"


class Shaped:
    """Stands in for a tensor: the converter's checks read nothing but .shape."""

    def __init__(self, shape):
        self.shape = tuple(shape)


@pytest.fixture(scope="module")
def sd15_keys() -> dict[str, tuple[int, ...]]:
    data = json.loads(KEYS_FILE.read_text())
    assert data["count"] == len(data["keys"]) == 1145
    return {k: tuple(v["shape"]) for k, v in data["keys"].items()}


def full_models(in_channels: int = 4):
    return build_models({"diffusion": DiffusionConfig(in_channels=in_channels)}, device="meta")


def check_consumes_everything(keys: dict[str, tuple[int, ...]], models, use_ema=True):
    plans = plan_conversion({k: Shaped(s) for k, s in keys.items()}, models, use_ema=use_ema)
    consumed = [src for plan in plans.values() for _, sources in plan for src in sources]
    assert len(consumed) == len(set(consumed)), "a checkpoint key was read twice"
    for name, plan in plans.items():
        params = dict(models[name].named_parameters())
        assert sorted(rule.ours for rule, _ in plan) == sorted(params), f"{name}: parameters without a rule"
        for rule, sources in plan:
            assert rule.shape == tuple(params[rule.ours].shape)
            for src in sources:  # plan_conversion checked shapes; check again from the file's side
                assert keys[src] == rule.their_shape(), src
    return set(consumed)


@pytest.mark.parametrize("in_channels", [4, 9], ids=["sd-v1-5", "sd-v1-5-inpainting"])
def test_full_size_checkpoint_fills_every_parameter(sd15_keys, in_channels):
    keys = dict(sd15_keys)
    keys[UNET_PREFIX + "input_blocks.0.0.weight"] = (320, in_channels, 3, 3)
    models = full_models(in_channels)
    consumed = check_consumes_everything(keys, models)
    assert consumed | (IGNORED_KEYS & keys.keys()) == keys.keys()
    assert len(consumed) == 1145 - 15  # 12 schedule buffers, position_ids, the EMA's decay and num_updates


def test_inverse_gives_the_real_layout(sd15_keys):
    out = to_standard_weights(full_models())
    expected = {k: s for k, s in sd15_keys.items() if k not in IGNORED_KEYS}
    assert {k: tuple(v.shape) for k, v in out.items()} == expected


def test_full_checkpoint_with_ema_uses_the_ema_copy(sd15_keys):
    """v1-5-pruned.ckpt keeps training weights and EMA weights (keys without dots) side by side."""
    keys = dict(sd15_keys)
    keys.update({ema_key(k): s for k, s in sd15_keys.items() if k.startswith(UNET_PREFIX)})
    models = full_models()
    consumed = check_consumes_everything(keys, models, use_ema=True)
    assert all(not k.startswith(UNET_PREFIX) for k in consumed)
    assert ema_key(UNET_PREFIX + "input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"
    consumed = check_consumes_everything(keys, models, use_ema=False)
    assert all(not k.startswith("model_ema.diffusion_model") for k in consumed)


def test_mismatches_are_all_named(sd15_keys):
    keys = {k: Shaped(s) for k, s in sd15_keys.items()}
    del keys[UNET_PREFIX + "out.2.bias"]
    keys["first_stage_model.encoder.extra.weight"] = Shaped((3,))
    keys["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = Shaped((1024,))
    with pytest.raises(ConversionError) as info:
        plan_conversion(keys, full_models())
    message = str(info.value)
    assert "missing keys (1)" in message and "model.diffusion_model.out.2.bias" in message
    assert "unexpected keys (1)" in message and "first_stage_model.encoder.extra.weight" in message
    assert "shape mismatches (1)" in message and "checkpoint (1024,), model expects (768,)" in message


def test_old_clip_prefix_is_understood(sd15_keys):
    """SD 1.x files saved with transformers < 4.19 have no "text_model." level."""
    old = "cond_stage_model.transformer.text_model."
    keys = {k.replace(old, "cond_stage_model.transformer."): s for k, s in sd15_keys.items()}
    check_consumes_everything(keys, full_models())


def test_meta_models_take_no_memory():
    models = full_models()
    assert all(p.device.type == "meta" for m in models.values() for p in m.parameters())
    n = sum(p.numel() for m in models.values() for p in m.parameters())
    assert n == 859_520_964 + 123_060_480 + 83_653_863  # UNet, CLIP ViT-L/14 text, VAE: SD 1.5's counts
    assert all(p.dtype == torch.float32 for m in models.values() for p in m.parameters())
