"""Load the four models from one Stable Diffusion 1.x checkpoint file (.safetensors or .ckpt), or a folder in
diffusers' layout (sd.diffusers_format), and save them back as one file.
Tutorial part: "Loading the weights" (hkproj model_loader.py: preload_models_from_standard_weights). The file is mapped,
not read (sd.checkpoint_io), and each parameter is filled from it once (sd.model_converter), in the dtype asked for.
"""

import dataclasses
import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .checkpoint_io import CKPT_TENSORS_KEY, Checkpoint, CheckpointError, open_checkpoint
from .checks import check
from .clip import CLIP, CLIPConfig
from .decoder import VAE_Decoder, VAEConfig
from .devices import fast_dtype, fast_memory_format
from .diffusers_format import folder_configs, load_folder_weights
from .diffusion import Diffusion, DiffusionConfig
from .encoder import VAE_Encoder
from .files import atomic_output
from .model_converter import UNET_PREFIX, load_from_standard_weights, to_standard_weights

# Metadata key under which save_standard_weights records the model configs as JSON (in a .safetensors header, or as a
# string beside a .ckpt's "state_dict"), so a checkpoint of non-standard size (a tiny test model, our embedded model)
# loads like any other.
CONFIG_METADATA_KEY = "sd_configs"
IMAGE_SIZE_METADATA_KEY = "sd_image_size"  # the image size a model was trained at, in pixels ("64"; SD 1.x: "512")
MAX_IMAGE_SIZE = 16384  # pixels per side; SD 1.x models are trained at 512, so anything larger is a damaged file
CONFIG_CLASSES = {"clip": CLIPConfig, "vae": VAEConfig, "diffusion": DiffusionConfig}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SAVED_SUFFIXES = (".safetensors", ".ckpt")


def build_models(configs: dict, device: torch.device | str | None = None) -> dict[str, nn.Module]:
    """The tutorial's four models from configs {"clip", "vae", "diffusion"} (missing ones: SD 1.5 defaults)."""
    vae = configs.get("vae", VAEConfig())
    with torch.device(device or "cpu"):
        return {"clip": CLIP(configs.get("clip", CLIPConfig())), "encoder": VAE_Encoder(vae),
                "decoder": VAE_Decoder(vae), "diffusion": Diffusion(configs.get("diffusion", DiffusionConfig()))}


def configs_to_json(configs: dict) -> str:
    return json.dumps({name: dataclasses.asdict(cfg) for name, cfg in configs.items()}, sort_keys=True)


def configs_from_json(text: str, path: str | os.PathLike | None = None) -> dict:
    """Configs {"clip", "vae", "diffusion"} (any of them) from configs_to_json's text, each checked by its dataclass.
    Anything else: a one-line CheckpointError naming `path` (the file the text came from) and what was wrong."""
    try:
        values = json.loads(text)
        if not isinstance(values, dict):
            raise ValueError(f'expected an object {{"clip": {{...}}, "vae": {{...}}, "diffusion": {{...}}}}, '
                             f'got {type(values).__name__} {values!r:.80}')
        return {name: _config_from_values(name, fields) for name, fields in values.items()}
    except (ValueError, TypeError, RecursionError) as e:
        where = f"{path}: its" if path is not None else "the checkpoint's"
        raise CheckpointError(f"{where} {CONFIG_METADATA_KEY!r} metadata is not a valid model config: {e}") from None


def _config_from_values(name: str, values: object):
    """One model's config from its JSON object; its dataclass checks the values (ValueError naming the field)."""
    check(name in CONFIG_CLASSES, f"unknown model {name!r}; known: {', '.join(CONFIG_CLASSES)}")
    cls = CONFIG_CLASSES[name]
    if not isinstance(values, dict):
        raise ValueError(f"{name!r} must be an object of {cls.__name__} fields, got {type(values).__name__} "
                         f"{values!r:.80}")
    fields = [f.name for f in dataclasses.fields(cls)]
    if unknown := sorted(set(values) - set(fields)):
        raise ValueError(f"{cls.__name__} has no field {unknown[0]!r}; its fields: {', '.join(fields)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})  # JSON has no tuples


def check_configs_fit(configs: dict) -> None:
    """What no single config can check: the three models work together (missing configs: SD 1.5's). ValueError."""
    clip, vae, unet = (configs.get(name, cls()) for name, cls in CONFIG_CLASSES.items())
    check(unet.d_context == clip.d_model, f"diffusion d_context={unet.d_context} must equal clip d_model="
          f"{clip.d_model} (the UNet attends to the text encoder's output)")
    check(unet.out_channels == vae.latent_channels, f"diffusion out_channels={unet.out_channels} must equal vae "
          f"latent_channels={vae.latent_channels} (the UNet predicts the noise in the VAE's latents)")
    inpainting = 2 * vae.latent_channels + 1  # latents, mask, masked-image latents
    check(unet.in_channels in (vae.latent_channels, inpainting), f"diffusion in_channels={unet.in_channels} must be "
          f"vae latent_channels={vae.latent_channels}, or {inpainting} for an inpainting UNet")


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
    configs = _metadata_configs(ckpt) if CONFIG_METADATA_KEY in ckpt.metadata else _configs_from_tensors(ckpt)
    return _with_recorded_size(ckpt, configs)


def _metadata_configs(ckpt: Checkpoint) -> dict:
    """The configs the file records (none: {}), checked each on its own and together; else a CheckpointError."""
    if CONFIG_METADATA_KEY not in ckpt.metadata:
        return {}
    configs = configs_from_json(ckpt.metadata[CONFIG_METADATA_KEY], ckpt.path)
    try:
        check_configs_fit(configs)
    except ValueError as e:
        raise CheckpointError(f"{ckpt.path}: its {CONFIG_METADATA_KEY!r} metadata describes models that do not "
                              f"fit together: {e}") from None
    return configs


def _configs_from_tensors(ckpt: Checkpoint) -> dict:
    """SD 1.5's configs with the UNet's input and output channels from its first and last convolutions."""
    def channels(key: str, dim: int) -> int:
        weight = ckpt.get(UNET_PREFIX + key)  # (out, in, 3, 3); absent or odd: the converter names the mismatch
        return weight.shape[dim] if weight is not None and weight.dim() == 4 and weight.shape[dim] > 0 else 4

    unet = DiffusionConfig(in_channels=channels("input_blocks.0.0.weight", 1), out_channels=channels("out.2.weight", 0))
    return {"clip": CLIPConfig(), "vae": VAEConfig(), "diffusion": unet}


def _with_recorded_size(ckpt: Checkpoint, configs: dict) -> dict:
    """configs with the UNet's sample_size (latents) from the image size the file records (pixels), if it does."""
    vae = configs.get("vae", VAEConfig())
    size = _recorded_image_size(ckpt, vae.downscale)
    if size is None:
        return configs
    unet = dataclasses.replace(configs.get("diffusion", DiffusionConfig()), sample_size=size // vae.downscale)
    return {**configs, "diffusion": unet}


def _recorded_image_size(ckpt: Checkpoint, downscale: int) -> int | None:
    """The file's IMAGE_SIZE_METADATA_KEY in pixels, or None if it has none; a CheckpointError naming the file if
    it is not a whole number, a multiple of the VAE's downscale, from downscale to MAX_IMAGE_SIZE."""
    text = ckpt.metadata.get(IMAGE_SIZE_METADATA_KEY)
    if text is None:
        return None
    size = int(text) if re.fullmatch(r"[0-9]{1,9}", text) else 0  # digits only: not "1e9", " 64", "６４"
    if not (0 < size <= MAX_IMAGE_SIZE and size % downscale == 0):
        raise CheckpointError(f"{ckpt.path}: its {IMAGE_SIZE_METADATA_KEY!r} metadata must be a positive whole number "
                              f"of pixels, a multiple of {downscale} (the VAE's downscale) and at most "
                              f"{MAX_IMAGE_SIZE}, got {text!r}")
    return size


def checkpoint_image_size(ckpt: Checkpoint | str | os.PathLike) -> int:
    """The image size the checkpoint's model was trained at, in pixels: what its metadata records (our files), else
    its configs' (the UNet's sample_size latents; a diffusers folder's config.json), else SD's 512. Reads the metadata
    only, no tensors."""
    if not isinstance(ckpt, Checkpoint) and Path(ckpt).is_dir():
        configs = _fitting_folder_configs(ckpt)
    else:
        ckpt = ckpt if isinstance(ckpt, Checkpoint) else open_checkpoint(ckpt)
        configs = _with_recorded_size(ckpt, _metadata_configs(ckpt))
    return configs.get("diffusion", DiffusionConfig()).sample_size * configs.get("vae", VAEConfig()).downscale


def _fitting_folder_configs(folder: str | os.PathLike) -> dict:
    """A diffusers folder's configs (sd.diffusers_format.folder_configs), checked to work together (CheckpointError)."""
    configs = folder_configs(folder)
    try:
        check_configs_fit(configs)
    except ValueError as e:
        raise CheckpointError(f"{folder}: its components' config.json describe models that do not fit together: "
                              f"{e}") from None
    return configs


def model_configs(ckpt_path: str | os.PathLike) -> dict:
    """The configs {"clip", "vae", "diffusion"} of the models a checkpoint file or diffusers folder holds, from its
    metadata and shapes alone (no weights read): build_models(configs, device="meta") gives their structure, enough
    to check a LoRA or an embedding against them before the weights load."""
    if Path(ckpt_path).is_dir():
        return _fitting_folder_configs(ckpt_path)
    ckpt = open_checkpoint(ckpt_path)
    identify(ckpt)
    return configs_from_checkpoint(ckpt)


def preload_models_from_standard_weights(ckpt_path: str | os.PathLike, device: torch.device | str = "cpu",
                                         dtype: torch.dtype | str = torch.float32, use_ema: bool = True,
                                         configs: dict | None = None) -> dict[str, nn.Module]:
    """Load {"clip", "encoder", "decoder", "diffusion"} from one SD 1.x checkpoint, in eval mode. ckpt_path:
    .safetensors or .ckpt (with or without the "state_dict" wrapper; v1-5-pruned.ckpt's EMA weights are used when
    use_ema), or a folder in diffusers' layout (unet/, vae/, text_encoder/ as save_pretrained writes them, the
    configs from their config.json). dtype: float32 (the default, as the tutorial), float16/bfloat16 for half the
    memory, or "auto": the fast one for the device (sd.devices.fast_dtype: bf16 on a CPU with native bf16, fp16 on a
    GPU); bf16 on a CPU loads the convolutions channels_last (sd.devices.fast_memory_format). configs: override those
    the file implies."""
    if isinstance(dtype, str) and dtype == "auto":
        dtype = fast_dtype(device)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(str, FLOAT_DTYPES))} or 'auto', got {dtype!r}")
    options = {"dtype": dtype, "device": device, "memory_format": fast_memory_format(device, dtype)}
    if Path(ckpt_path).is_dir():
        models = build_models({**_fitting_folder_configs(ckpt_path), **(configs or {})}, device="meta")
        state_dicts = load_folder_weights(ckpt_path, models, **options)  # no EMA copies in a folder
    else:
        models, state_dicts = _load_file(ckpt_path, configs, use_ema, options)
    for name, model in models.items():
        model.load_state_dict(state_dicts[name], strict=True, assign=True)
        model.eval()
    return models


def _load_file(path: str | os.PathLike, configs: dict | None, use_ema: bool, options: dict):
    """(models on the meta device, their state dicts) from one checkpoint file; options: load_from_standard_weights'."""
    ckpt = open_checkpoint(path)
    identify(ckpt)
    configs = {**configs_from_checkpoint(ckpt), **(configs or {})}
    models = build_models(configs, device="meta")  # structure only: no memory until the weights arrive
    state_dicts = load_from_standard_weights(ckpt, models, use_ema=use_ema, **options)
    return models, state_dicts  # the parameters are fresh memory: with the checkpoint goes the file's mapping


def save_standard_weights(models: dict[str, nn.Module], path: str | os.PathLike,
                          metadata: dict[str, str] | None = None) -> Path:
    """Save the four models as one checkpoint in the original layout, with their configs and image size in the
    metadata: .safetensors (recommended) or .ckpt ({"state_dict": ...} as the released files, the metadata as strings
    beside it). metadata: more string entries (an IMAGE_SIZE_METADATA_KEY given here is recorded instead of the
    models'). Both load with preload_models_from_standard_weights and other tools that read SD 1.x files. The file
    is written whole or not at all (sd.files.atomic_output): a Ctrl-C or a full disk leaves what was there before."""
    path = Path(path)
    check(path.suffix in SAVED_SUFFIXES, f"save_standard_weights writes {' or '.join(SAVED_SUFFIXES)}, "
          f"got {path.name!r}")
    metadata = _file_metadata(models, metadata or {})
    tensors = to_standard_weights(models)
    with atomic_output(path, overwrite=True) as tmp:
        if path.suffix == ".safetensors":
            save_file(tensors, str(tmp), metadata=metadata)
        else:
            torch.save({**metadata, CKPT_TENSORS_KEY: tensors}, tmp)
    return path


def _file_metadata(models: dict[str, nn.Module], metadata: dict[str, str]) -> dict[str, str]:
    """What a saved file records beside its tensors: the image size the models were trained at (their UNet's
    sample_size latents, in pixels), the entries given, and the models' configs (configs_to_json)."""
    for key, value in metadata.items():
        check(isinstance(key, str) and isinstance(value, str) and key != CKPT_TENSORS_KEY, f"metadata must map "
              f"names to strings (not {CKPT_TENSORS_KEY!r}, where a .ckpt keeps its tensors), got {key!r}: {value!r}")
    vae = models["decoder"].config
    check(models["encoder"].config == vae, f"the encoder's and decoder's configs must be the same (the file records "
          f"one VAEConfig), got {models['encoder'].config} and {vae}")
    configs = {"clip": models["clip"].config, "vae": vae, "diffusion": models["diffusion"].config}
    image_size = str(models["diffusion"].config.sample_size * vae.downscale)
    return {IMAGE_SIZE_METADATA_KEY: image_size, **metadata, CONFIG_METADATA_KEY: configs_to_json(configs)}
