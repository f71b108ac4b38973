"""Test helpers: random tiny models, and the independent implementations (diffusers, transformers) built to match.

The references are loaded from a checkpoint in the original layout through diffusers' own
single-file conversion (diffusers.loaders.single_file_utils), never through our converter's map.
"""

import torch
from torch import nn

from sd.clip import CLIPConfig
from sd.decoder import VAEConfig
from sd.diffusion import DiffusionConfig
from sd.model_loader import build_models


def tiny_configs(in_channels: int = 4) -> dict:
    return {"clip": CLIPConfig.tiny(), "vae": VAEConfig.tiny(), "diffusion": DiffusionConfig.tiny(in_channels)}


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter random (norm scales near 1, weights ~ 1/sqrt(fan_in)), so that no layer is an identity
    and a wrong mapping of any single tensor changes the output."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            noise = torch.randn(p.shape, generator=g)
            if isinstance(module, (nn.GroupNorm, nn.LayerNorm)) and name == "weight":
                p.copy_(1 + 0.2 * noise)
            elif p.dim() >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                p.copy_(0.2 * noise)
    return model


def random_models(configs: dict, seed: int = 0) -> dict[str, nn.Module]:
    models = build_models(configs)
    for i, model in enumerate(models.values()):
        randomize_(model, seed + i).eval()
    return models


def diffusers_unet(cfg: DiffusionConfig, checkpoint: dict):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels)),
        block_out_channels=cfg.widths,
        layers_per_block=cfg.n_res_blocks,
        cross_attention_dim=cfg.d_context,
        attention_head_dim=cfg.n_heads,  # diffusers' name for SD 1.x's number of heads
        norm_num_groups=cfg.n_groups,
        norm_eps=cfg.norm_eps,
    )
    unet.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, unet.config), strict=True)
    return unet.eval()


def diffusers_vae(cfg: VAEConfig, checkpoint: dict):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    n = len(cfg.block_out_channels)
    vae = AutoencoderKL(
        in_channels=cfg.image_channels,
        out_channels=cfg.image_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.n_groups,
        scaling_factor=cfg.latent_scale,
    )
    vae.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, vae.config), strict=True)
    return vae.eval()


def transformers_clip(cfg: CLIPConfig, checkpoint: dict):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        max_position_embeddings=cfg.n_tokens,
        hidden_act="quick_gelu",
        layer_norm_eps=cfg.layer_norm_eps,
        attn_implementation="eager",
    ))
    state = convert_ldm_clip_checkpoint(checkpoint)  # text_model.* keys
    if not any(k.startswith("text_model.") for k in model.state_dict()):
        # transformers >= 5 treats "text_model." as a prefix added when loading from the hub.
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert all("position_ids" in k for k in result.missing_keys), result.missing_keys
    return model.eval()
