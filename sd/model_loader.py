"""Load the four models from one Stable Diffusion 1.x checkpoint file (.safetensors or .ckpt), and save them back.
Tutorial part: "Loading the weights" (hkproj model_loader.py: preload_models_from_standard_weights). The file is mapped,
not read (sd.checkpoint_io), and each parameter is filled from it once (sd.model_converter), in the dtype asked for.
"""

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .checkpoint_io import Checkpoint, CheckpointError, open_checkpoint
from .clip import CLIP, CLIPConfig
from .decoder import VAE_Decoder, VAEConfig
from .diffusion import Diffusion, DiffusionConfig
from .encoder import VAE_Encoder
from .model_converter import UNET_PREFIX, load_from_standard_weights, to_standard_weights

# safetensors metadata key under which save_standard_weights records the model configs as JSON,
# so a checkpoint of non-standard size (a tiny test model, our embedded model) loads like any other.
CONFIG_METADATA_KEY = "sd_configs"
IMAGE_SIZE_METADATA_KEY = "sd_image_size"  # the image size a model was trained at ("64"), when it is not SD's 512
SD_IMAGE_SIZE = 512  # what SD 1.x was trained at, for files that do not record a size
CONFIG_CLASSES = {"clip": CLIPConfig, "vae": VAEConfig, "diffusion": DiffusionConfig}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def build_models(configs: dict, device: torch.device | str | None = None) -> dict[str, nn.Module]:
    """The tutorial's four models from configs {"clip", "vae", "diffusion"} (missing ones: SD 1.5 defaults)."""
    vae = configs.get("vae", VAEConfig())
    with torch.device(device or "cpu"):
        return {"clip": CLIP(configs.get("clip", CLIPConfig())), "encoder": VAE_Encoder(vae),
                "decoder": VAE_Decoder(vae), "diffusion": Diffusion(configs.get("diffusion", DiffusionConfig()))}


def configs_to_json(configs: dict) -> str:
    return json.dumps({name: dataclasses.asdict(cfg) for name, cfg in configs.items()}, sort_keys=True)


def configs_from_json(text: str) -> dict:
    try:
        configs = {}
        for name, values in json.loads(text).items():
            cls = CONFIG_CLASSES[name]
            tuples = {f.name for f in dataclasses.fields(cls) if isinstance(f.default, tuple)}  # JSON has no tuples
            configs[name] = cls(**{k: tuple(v) if k in tuples else v for k, v in values.items()})
        return configs
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"the checkpoint's {CONFIG_METADATA_KEY!r} metadata is not a valid model config: "
                              f"{e}") from None


def identify(ckpt: Checkpoint) -> None:
    """Raise a CheckpointError naming what the file is, unless it is a Stable Diffusion 1.x checkpoint."""
    keys = set(ckpt.keys())
    hint = "sd loads Stable Diffusion 1.x checkpoints (v1-5-pruned-emaonly, sd-v1-5-inpainting and SD 1.x fine-tunes)."

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    to_k = ckpt.get(UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    lacking = [name for prefix, name in (("first_stage_model.", "VAE"), ("cond_stage_model.", "text encoder"))
               if not has(prefix)]
    found = None
    if any("lora" in k.lower() for k in keys):
        found = "a LoRA adapter, not a full model"
    elif has("conditioner.embedders."):
        found = "an SDXL checkpoint"
    elif has("cond_stage_model.model."):
        found = "an SD 2.x checkpoint (its text encoder is OpenCLIP ViT-H)"
    elif "conv_in.weight" in keys and has("down_blocks."):
        found = "a single model in diffusers' layout (conv_in, down_blocks...), not an original SD checkpoint"
    elif has("text_model."):
        found = "a transformers CLIP text model on its own, not an SD checkpoint"
    elif "encoder.conv_in.weight" in keys and "decoder.conv_in.weight" in keys:
        found = "a VAE on its own (e.g. vae-ft-mse), not a full SD checkpoint"
    elif UNET_PREFIX + "input_blocks.0.0.weight" not in keys:
        found = f"not a Stable Diffusion checkpoint ({len(keys)} tensors, e.g. {', '.join(sorted(keys)[:4])})"
    elif to_k is not None and tuple(to_k.shape[1:2]) == (1024,):
        found = "an SD 2.x UNet (cross-attention context 1024, SD 1.x has 768)"
    elif lacking:
        found = f"an SD 1.x UNet without its {' and '.join(lacking)}"
    if found:
        raise CheckpointError(f"{ckpt.path}: this is {found}. {hint}")


def configs_from_checkpoint(ckpt: Checkpoint) -> dict:
    """Configs from the file's metadata when it has them, else SD 1.5's, with the UNet's channels read
    from its tensors (9 input channels for the inpainting model); the UNet's sample_size (generate()'s default
    size) from the image size the file records, if it records one."""
    if CONFIG_METADATA_KEY in ckpt.metadata:
        configs = configs_from_json(ckpt.metadata[CONFIG_METADATA_KEY])
    else:
        conv_in = ckpt[UNET_PREFIX + "input_blocks.0.0.weight"].shape   # (320, in_channels, 3, 3)
        conv_out = ckpt[UNET_PREFIX + "out.2.weight"].shape             # (out_channels, 320, 3, 3)
        configs = {"clip": CLIPConfig(), "vae": VAEConfig(),
                   "diffusion": DiffusionConfig(in_channels=conv_in[1], out_channels=conv_out[0])}
    if IMAGE_SIZE_METADATA_KEY in ckpt.metadata:  # a model of ours trained at another size (the embedded one: 64)
        latent_size = checkpoint_image_size(ckpt) // configs.get("vae", VAEConfig()).downscale
        configs["diffusion"] = dataclasses.replace(configs.get("diffusion", DiffusionConfig()), sample_size=latent_size)
    return configs


def checkpoint_image_size(ckpt: Checkpoint | str | os.PathLike) -> int:
    """The image size the checkpoint's model was trained at: from its metadata (our files), else SD's 512."""
    ckpt = ckpt if isinstance(ckpt, Checkpoint) else open_checkpoint(ckpt)
    size = ckpt.metadata.get(IMAGE_SIZE_METADATA_KEY, str(SD_IMAGE_SIZE))
    if not size.isdigit() or int(size) == 0:
        raise CheckpointError(f"{ckpt.path}: its {IMAGE_SIZE_METADATA_KEY!r} metadata must be a positive whole number "
                              f"of pixels, got {size!r}")
    return int(size)


def preload_models_from_standard_weights(ckpt_path: str | os.PathLike, device: torch.device | str = "cpu",
                                         dtype: torch.dtype = torch.float32, use_ema: bool = True,
                                         configs: dict | None = None) -> dict[str, nn.Module]:
    """Load {"clip", "encoder", "decoder", "diffusion"} from one SD 1.x checkpoint, in eval mode. ckpt_path:
    .safetensors or .ckpt (with or without the "state_dict" wrapper; v1-5-pruned.ckpt's EMA weights are used when
    use_ema). dtype: float32, or float16/bfloat16 for half the memory. configs: override those the file implies."""
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(str, FLOAT_DTYPES))}, got {dtype!r}")
    ckpt = open_checkpoint(ckpt_path)
    identify(ckpt)
    configs = {**configs_from_checkpoint(ckpt), **(configs or {})}
    models = build_models(configs, device="meta")  # structure only: no memory until the weights arrive
    state_dicts = load_from_standard_weights(ckpt, models, dtype=dtype, device=device, use_ema=use_ema)
    del ckpt  # the parameters are fresh memory: with the checkpoint goes the file's mapping
    for name, model in models.items():
        model.load_state_dict(state_dicts[name], strict=True, assign=True)
        model.eval()
    return models


def save_standard_weights(models: dict[str, nn.Module], path: str | os.PathLike,
                          metadata: dict[str, str] | None = None) -> Path:
    """Save the four models as one checkpoint in the original layout, with their configs in the metadata: .safetensors
    (recommended; metadata: more string entries, e.g. IMAGE_SIZE_METADATA_KEY) or .ckpt ({"state_dict": ...}, as the
    released files). Both load with preload_models_from_standard_weights and other tools that read SD 1.x files."""
    path = Path(path)
    tensors = to_standard_weights(models)
    configs = {"clip": models["clip"].config, "vae": models["encoder"].config, "diffusion": models["diffusion"].config}
    if path.suffix == ".safetensors":
        save_file(tensors, str(path), metadata={**(metadata or {}), CONFIG_METADATA_KEY: configs_to_json(configs)})
    elif path.suffix == ".ckpt":
        torch.save({"state_dict": tensors}, path)
    else:
        raise ValueError(f"save_standard_weights writes .safetensors or .ckpt, got {path.name!r}")
    return path
