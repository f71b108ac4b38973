"""diffusers' names for the original checkpoint's blocks, and folders in diffusers' layout (unet/, vae/, text_encoder/).
No tutorial counterpart. Mirrors diffusers.loaders.single_file_utils (convert_ldm_unet_checkpoint,
convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint) as a table per block type generated from our configs, as
sd.model_converter does; the folder is what ModelMixin / PreTrainedModel.save_pretrained write for each component.
Reference: huggingface.co/docs/diffusers/using-diffusers/other-formats (multifolder layout)."""

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from .checkpoint_io import Checkpoint, CheckpointError, open_checkpoint
from .checks import is_int
from .clip import CLIPConfig
from .decoder import VAEConfig
from .diffusion import DiffusionConfig
from .model_converter import (CLIP_PREFIXES, UNET_PREFIX, VAE_PREFIX, ConversionError, Rule, load_from_standard_weights,
                              make_rules)

UNET, VAE, TEXT_ENCODER = "unet", "vae", "text_encoder"  # the component folders, as StableDiffusionPipeline names them
COMPONENTS = (UNET, VAE, TEXT_ENCODER)
CONFIG_FILE = "config.json"
TEXT_MODEL = "text_model."  # CLIPTextModel's inner module; transformers >= 5 saves its keys without this level
VARIANT = "fp16"            # the variant hub folders carry beside (or instead of) the full-precision weights
# Weights files by library, preferred first: diffusers' (constants.py) and transformers' (utils/__init__.py) names.
_WEIGHTS_FILES = {UNET: ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
                  VAE: ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
                  TEXT_ENCODER: ("model.safetensors", "pytorch_model.bin")}
INDEX_SUFFIX = ".index.json"  # sharded weights: {"weight_map": {key: shard file}}
SD1_HINT = "sd loads Stable Diffusion 1.x models (SD 1.5, its inpainting model and their fine-tunes)"
SD2_CONTEXT, SDXL_CONTEXT = 1024, 2048  # cross_attention_dim: OpenCLIP ViT-H's width; SDXL's two text encoders'

# ---- the mapping -------------------------------------------------------------------------------------------------

# Per block type: the original's sub-module name -> diffusers'. Names not listed are the same in both.
_SAME: dict[str, str] = {}
_UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# The VAE attention's names in folders older diffusers releases wrote (ModelMixin._convert_deprecated_attention_blocks).
_DEPRECATED_VAE_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
_IGNORED = {(TEXT_ENCODER, TEXT_MODEL + "embeddings.position_ids")}  # a buffer older transformers saved


def _unet_layer(theirs: str, diffusers: str, j: int, attention: bool):
    """ldm's TimestepEmbedSequential (residual block, then attention) as diffusers' j-th resnet and attention."""
    yield f"{theirs}.0", f"{diffusers}.resnets.{j}", _UNET_RESNET
    if attention:
        yield f"{theirs}.1", f"{diffusers}.attentions.{j}", _SAME


def _unet_blocks(cfg: DiffusionConfig):
    """(original block, diffusers' block, leaf table) for every block of the UNet, input_blocks numbered on."""
    yield "time_embed.0", "time_embedding.linear_1", _SAME
    yield "time_embed.2", "time_embedding.linear_2", _SAME
    yield "input_blocks.0.0", "conv_in", _SAME
    levels, i = range(len(cfg.channel_mult)), 1
    for level in levels:
        for j in range(cfg.n_res_blocks):
            yield from _unet_layer(f"input_blocks.{i}", f"down_blocks.{level}", j, cfg.attention_levels[level])
            i += 1
        if level != levels[-1]:
            yield f"input_blocks.{i}.0.op", f"down_blocks.{level}.downsamplers.0.conv", _SAME
            i += 1
    yield "middle_block.0", "mid_block.resnets.0", _UNET_RESNET
    yield "middle_block.1", "mid_block.attentions.0", _SAME
    yield "middle_block.2", "mid_block.resnets.1", _UNET_RESNET
    i = 0
    for up, level in enumerate(reversed(levels)):  # both number the way up from the coarsest level
        attention = cfg.attention_levels[level]
        for j in range(cfg.n_res_blocks + 1):
            yield from _unet_layer(f"output_blocks.{i}", f"up_blocks.{up}", j, attention)
            if level != levels[0] and j == cfg.n_res_blocks:
                yield f"output_blocks.{i}.{1 + attention}.conv", f"up_blocks.{up}.upsamplers.0.conv", _SAME
            i += 1
    yield "out.0", "conv_norm_out", _SAME
    yield "out.2", "conv_out", _SAME


def _vae_ends(part: str):
    """The blocks the VAE's encoder and decoder share by name: conv_in, the middle, the output norm and conv."""
    yield f"{part}.conv_in", f"{part}.conv_in", _SAME
    yield f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", _VAE_RESNET
    yield f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", _VAE_ATTENTION
    yield f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", _VAE_RESNET
    yield f"{part}.norm_out", f"{part}.conv_norm_out", _SAME
    yield f"{part}.conv_out", f"{part}.conv_out", _SAME


def _vae_encoder_blocks(cfg: VAEConfig):
    levels = range(len(cfg.block_out_channels))
    yield from _vae_ends("encoder")
    for level in levels:
        for i in range(cfg.layers_per_block):
            yield f"encoder.down.{level}.block.{i}", f"encoder.down_blocks.{level}.resnets.{i}", _VAE_RESNET
        if level != levels[-1]:
            yield f"encoder.down.{level}.downsample.conv", f"encoder.down_blocks.{level}.downsamplers.0.conv", _SAME
    yield "quant_conv", "quant_conv", _SAME


def _vae_decoder_blocks(cfg: VAEConfig):
    levels = range(len(cfg.block_out_channels))
    yield "post_quant_conv", "post_quant_conv", _SAME
    yield from _vae_ends("decoder")
    for level in levels:
        up = levels[-1] - level  # the original numbers the decoder's levels from the finest, diffusers the other way
        for i in range(cfg.layers_per_block + 1):
            yield f"decoder.up.{level}.block.{i}", f"decoder.up_blocks.{up}.resnets.{i}", _VAE_RESNET
        if level != levels[0]:
            yield f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{up}.upsamplers.0.conv", _SAME


def _clip_blocks(cfg: CLIPConfig):
    yield TEXT_MODEL.rstrip("."), TEXT_MODEL.rstrip("."), _SAME  # transformers' CLIPTextModel in both


# Per model: the prefix the blocks are named under in the original checkpoint, the component, the blocks.
_LAYOUT = {"clip": (CLIP_PREFIXES[0].removesuffix(TEXT_MODEL), TEXT_ENCODER, _clip_blocks),
           "encoder": (VAE_PREFIX, VAE, _vae_encoder_blocks), "decoder": (VAE_PREFIX, VAE, _vae_decoder_blocks),
           "diffusion": (UNET_PREFIX, UNET, _unet_blocks)}


def _split(name: str, table: Mapping) -> tuple[str | None, str]:
    """The longest key of table that `name` starts with at a dot, and the rest of name; (None, name) if none."""
    parts = name.split(".")
    for n in range(len(parts) - 1, 0, -1):
        if (head := ".".join(parts[:n])) in table:
            return head, ".".join(parts[n:])
    return None, name


def _renamed(name: str, blocks: Mapping[str, tuple[str, dict]]) -> str:
    """One key (below its model's prefix) in diffusers' names: its block renamed, then the leaf by the block's table."""
    block, leaf = _split(name, blocks)
    assert block is not None, f"no diffusers block for {name!r}: the layout tables are out of step with the models"
    target, table = blocks[block]
    sub, rest = _split(leaf, table)
    return f"{target}.{leaf if sub is None else table[sub] + '.' + rest}"


def _renamed_rules(models: Mapping[str, nn.Module]) -> Iterator[tuple[Rule, str, str, str]]:
    """(rule, one checkpoint key it reads, diffusers component, key in that component) for every key of every model."""
    for name, model in models.items():
        if name not in _LAYOUT:
            raise ValueError(f"unknown model {name!r}; known: {', '.join(_LAYOUT)}")
        prefix, component, walk = _LAYOUT[name]
        blocks = {theirs: (diffusers, table) for theirs, diffusers, table in walk(model.config)}
        for rule in make_rules(name, model):
            for key in rule.theirs:
                yield rule, key, component, _renamed(key.removeprefix(prefix), blocks)


def ldm_to_diffusers(models: Mapping[str, nn.Module]) -> dict[str, tuple[str, str]]:
    """diffusers' name for every checkpoint key our converter reads: original (ldm) key -> (component folder, key in
    that component's state dict), e.g. "model.diffusion_model.input_blocks.1.1.proj_in.weight" ->
    ("unet", "down_blocks.0.attentions.0.proj_in.weight"). models: any of {"clip", "encoder", "decoder", "diffusion"}
    (on the meta device is enough); the layout follows their configs, so tiny models map as SD 1.5's do. The same
    tensor under both names, but for the VAE's attention q, k, v and proj_out weights: (C, C, 1, 1) convolutions in
    the original, (C, C) Linear layers in diffusers. kohya's LoRA names are these with "_" for ".":
    lora_unet_down_blocks_0_attentions_0_proj_in, lora_te_text_model_encoder_layers_0_self_attn_q_proj."""
    return {key: (component, name) for _, key, component, name in _renamed_rules(models)}


# ---- configs -----------------------------------------------------------------------------------------------------

# Fields of each config.json whose other values describe layers our models do not have: field -> the one value we
# build. An absent field has diffusers' (transformers') default, which is this value; a per-level list must repeat it.
_FIXED = {
    UNET: {"_class_name": "UNet2DConditionModel", "mid_block_type": "UNetMidBlock2DCrossAttn", "act_fn": "silu",
           "use_linear_projection": False, "transformer_layers_per_block": 1, "num_attention_heads": None,
           "addition_embed_type": None, "class_embed_type": None, "num_class_embeds": None, "encoder_hid_dim": None,
           "time_embedding_type": "positional", "time_embedding_dim": None, "time_cond_proj_dim": None,
           "timestep_post_act": None, "flip_sin_to_cos": True, "freq_shift": 0, "resnet_time_scale_shift": "default",
           "conv_in_kernel": 3, "conv_out_kernel": 3, "center_input_sample": False, "downsample_padding": 1,
           "mid_block_scale_factor": 1, "dual_cross_attention": False, "only_cross_attention": False,
           "attention_type": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1,
           "class_embeddings_concat": False, "cross_attention_norm": None},
    VAE: {"_class_name": "AutoencoderKL", "act_fn": "silu", "down_block_types": "DownEncoderBlock2D",
          "up_block_types": "UpDecoderBlock2D", "use_quant_conv": True, "use_post_quant_conv": True,
          "mid_block_add_attention": True, "latents_mean": None, "latents_std": None, "shift_factor": None},
    TEXT_ENCODER: {"model_type": "clip_text_model", "hidden_act": "quick_gelu"},
}
# Fields read into our configs: ours -> config.json's. Those in _DEFAULTED may be absent (then: our default, the same
# as the library's); the rest must be there (save_pretrained writes them).
_UNET_FIELDS = {"in_channels": "in_channels", "out_channels": "out_channels", "n_res_blocks": "layers_per_block",
                "d_context": "cross_attention_dim", "n_groups": "norm_num_groups", "norm_eps": "norm_eps",
                "sample_size": "sample_size"}
_VAE_FIELDS = {"image_channels": "in_channels", "latent_channels": "latent_channels",
               "block_out_channels": "block_out_channels", "layers_per_block": "layers_per_block",
               "n_groups": "norm_num_groups", "latent_scale": "scaling_factor"}
_CLIP_FIELDS = {"vocab_size": "vocab_size", "n_tokens": "max_position_embeddings", "d_model": "hidden_size",
                "n_heads": "num_attention_heads", "n_layers": "num_hidden_layers", "d_ff": "intermediate_size",
                "layer_norm_eps": "layer_norm_eps"}
_DEFAULTED = {"sample_size", "latent_scale", "layer_norm_eps"}
_DOWN_BLOCKS = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # diffusers' block type -> has attention
_UP_BLOCKS = {True: "CrossAttnUpBlock2D", False: "UpBlock2D"}


def _one_value(value):
    """A per-level list that repeats one value, as that value; anything else as it is."""
    return value[0] if isinstance(value, (list, tuple)) and value and all(v == value[0] for v in value) else value


def _read_config(folder: str | Path, component: str) -> tuple[dict, Path]:
    """A component's config.json as a dict, and its path; a CheckpointError if the folder or file is not there."""
    folder = Path(folder)
    if not (folder / component).is_dir():
        found = ", ".join(sorted(p.name + "/" for p in folder.iterdir() if p.is_dir())) or "no subfolders"
        raise CheckpointError(f"{folder}: has no {component}/ folder (found {found}). A model folder in diffusers' "
                              f"layout, as save_pretrained writes it, holds {', '.join(c + '/' for c in COMPONENTS)}, "
                              f"each with {CONFIG_FILE} and weights; or give one checkpoint file (.safetensors, .ckpt)")
    file = folder / component / CONFIG_FILE
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: not found; each component folder needs its {CONFIG_FILE}") from None
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable JSON config ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: expected a JSON object of config fields, got {type(config).__name__}")
    return config, file


def _check_fixed(config: dict, file: Path, component: str) -> None:
    """A CheckpointError naming the first field (and the model family, if known) our models cannot represent."""
    family = _family(config) if component == UNET else None
    if family:
        raise CheckpointError(f"{file}: this is {family}. {SD1_HINT}")
    for field, accepted in _FIXED[component].items():
        if field in config and _one_value(config[field]) != accepted:
            raise CheckpointError(f"{file}: {field}={config[field]!r} is not supported: {SD1_HINT}, whose "
                                  f"{component} has {field}={accepted!r}")


def _family(config: dict) -> str | None:
    """'an SD 2.x UNet' or 'an SDXL UNet' when the UNet's config says so, else None."""
    context = config.get("cross_attention_dim")
    if config.get("addition_embed_type") == "text_time" or context == SDXL_CONTEXT:
        return f"an SDXL UNet (cross_attention_dim={context!r}, addition_embed_type=" \
               f"{config.get('addition_embed_type')!r})"
    if context == SD2_CONTEXT or config.get("use_linear_projection"):
        return f"an SD 2.x UNet (cross_attention_dim={context!r}, use_linear_projection=" \
               f"{config.get('use_linear_projection')!r}; SD 1.x has 768 and false)"
    return None


def _fields(config: dict, file: Path, names: dict[str, str]) -> dict:
    """Our fields from config.json's (names: ours -> theirs), lists as tuples; a CheckpointError if one is missing."""
    missing = [theirs for ours, theirs in names.items() if config.get(theirs) is None and ours not in _DEFAULTED]
    if missing:
        raise CheckpointError(f"{file}: lacks {missing[0]!r}; sd reads {', '.join(names.values())}")
    return {ours: tuple(v) if isinstance(v := config[theirs], list) else v
            for ours, theirs in names.items() if config.get(theirs) is not None}


def _build(cls, fields: dict, file: Path):
    """Our config dataclass from fields, its checks' ValueError as a CheckpointError naming the file."""
    try:
        return cls(**fields)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{file}: describes a model sd cannot build: {e}") from None


def _unet_config(folder: Path) -> DiffusionConfig:
    config, file = _read_config(folder, UNET)
    _check_fixed(config, file, UNET)
    # block_out_channels and down_block_types become several of our fields: read under their own names first.
    fields = _fields(config, file, {**_UNET_FIELDS, "widths": "block_out_channels", "kinds": "down_block_types",
                                    "n_heads": "attention_head_dim"})
    widths, kinds, n_heads = fields.pop("widths"), fields.pop("kinds"), _one_value(fields.pop("n_heads"))
    if not (isinstance(widths, tuple) and widths and all(is_int(w) and w > 0 for w in widths)
            and all(w % widths[0] == 0 for w in widths)):
        raise CheckpointError(f"{file}: block_out_channels must be positive whole numbers, each a multiple of the "
                              f"first (our UNet's widths are model_channels x channel_mult), got {widths!r}")
    if not (isinstance(kinds, tuple) and set(kinds) <= set(_DOWN_BLOCKS)):
        raise CheckpointError(f"{file}: down_block_types must each be one of {', '.join(_DOWN_BLOCKS)}, got {kinds!r}")
    attention = tuple(_DOWN_BLOCKS[k] for k in kinds)
    up = tuple(_UP_BLOCKS[a] for a in reversed(attention))
    if config.get("up_block_types", list(up)) != list(up):
        raise CheckpointError(f"{file}: up_block_types must mirror down_block_types: expected {list(up)}, got "
                              f"{config['up_block_types']!r}")
    if isinstance(n_heads, tuple):  # SD 2.x's per-level head counts (5, 10, 20, 20): ours has one for all levels
        raise CheckpointError(f"{file}: attention_head_dim must be one number of heads for every level (SD 1.x: 8), "
                              f"got {list(n_heads)}")
    return _build(DiffusionConfig, {**fields, "model_channels": widths[0], "channel_mult": tuple(w // widths[0] for w
                  in widths), "attention_levels": attention, "n_heads": n_heads}, file)


def _vae_config(folder: Path) -> VAEConfig:
    config, file = _read_config(folder, VAE)
    _check_fixed(config, file, VAE)
    if config.get("out_channels", config.get("in_channels")) != config.get("in_channels"):
        raise CheckpointError(f"{file}: in_channels={config.get('in_channels')!r} and out_channels="
                              f"{config['out_channels']!r} must be the same (our VAE decodes the images it encodes)")
    return _build(VAEConfig, _fields(config, file, _VAE_FIELDS), file)


def _clip_config(folder: Path) -> CLIPConfig:
    config, file = _read_config(folder, TEXT_ENCODER)
    _check_fixed(config, file, TEXT_ENCODER)
    return _build(CLIPConfig, _fields(config, file, _CLIP_FIELDS), file)


def folder_configs(folder: str | Path) -> dict:
    """Our configs {"clip", "vae", "diffusion"} from a diffusers-format folder's text_encoder/, vae/ and unet/
    config.json (no weights read); a CheckpointError naming the file for anything our models cannot represent."""
    folder = Path(folder)
    return {"diffusion": _unet_config(folder), "vae": _vae_config(folder), "clip": _clip_config(folder)}


# ---- weights -----------------------------------------------------------------------------------------------------


def _with_variant(name: str, variant: str | None) -> str:
    """diffusers' _add_variant: the variant before the last extension (model.fp16.safetensors)."""
    head, dot, ext = name.rpartition(".")
    return f"{head}.{variant}{dot}{ext}" if variant else name


def _weights_names(component: str) -> list[tuple[str, bool]]:
    """(file name, is a shard index) for the weights a component may have, preferred first: full precision before
    the variant, safetensors before .bin, one file before shards."""
    return [(_with_variant(name + index, variant), bool(index)) for variant in (None, VARIANT)
            for name in _WEIGHTS_FILES[component] for index in ("", INDEX_SUFFIX)]


def _weights_files(folder: Path, component: str) -> list[Path]:
    """The file(s) holding a component's weights: the first of _weights_names there, or the shards its index names."""
    names = _weights_names(component)
    found, sharded = next(((folder / component / n, index) for n, index in names if (folder / component / n).is_file()),
                          (None, False))
    if found is None:
        raise CheckpointError(f"{folder / component}: has no weights; expected {names[0][0]} (or "
                              f"{', '.join(n for n, _ in names[1:])})")
    if not sharded:
        return [found]
    try:
        shards = sorted(set(json.loads(found.read_text())["weight_map"].values()))
    except (ValueError, OSError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{found}: not a shard index ({{\"weight_map\": {{key: file}}}}): {e!r}") from None
    for shard in shards:
        if not (isinstance(shard, str) and Path(shard).name == shard and (found.parent / shard).is_file()):
            raise CheckpointError(f"{found}: names shard {shard!r}, which is not a file beside it")
    return [found.parent / shard for shard in shards]


def _tensors(folder: Path, component: str) -> dict[str, torch.Tensor]:
    """A component's tensors by their names in its files, as views of the mapped files (nothing read yet)."""
    tensors = {}
    for file in _weights_files(folder, component):
        shard = open_checkpoint(file)  # .safetensors, or .bin through torch's weights-only unpickler
        if twice := sorted(tensors.keys() & shard.keys()):
            raise CheckpointError(f"{file}: tensor {twice[0]!r} is in more than one shard")
        tensors.update(shard)
    return tensors


def _stored_names(component: str, key: str) -> tuple[str, ...]:
    """The names a folder may keep diffusers' `key` under, preferred first: its own, then transformers >= 5's (no
    "text_model." level) or older diffusers' for the VAE's attention (query, key, value, proj_attn)."""
    if component == TEXT_ENCODER:
        return key, key.removeprefix(TEXT_MODEL)
    block, _, param = key.rpartition(".")
    for new, old in _DEPRECATED_VAE_ATTENTION.items() if component == VAE else ():
        if block.endswith(".attentions.0." + new):
            return key, f"{block.removesuffix(new)}{old}.{param}"
    return (key,)


def _folder_view(folder: Path, models: Mapping[str, nn.Module]) -> Checkpoint:
    """The folder's tensors under the original checkpoint's keys (those our converter reads); tensors that map to none
    stay, named "component/key", for the converter to report as unexpected. Missing ones are simply absent."""
    stored = {component: _tensors(folder, component) for component in COMPONENTS}
    used = {(c, n) for c, key in _IGNORED for n in _stored_names(c, key)}
    view = {}
    for rule, key, component, name in _renamed_rules(models):
        found = next((n for n in _stored_names(component, name) if n in stored[component]), None)
        if found is None:
            continue
        used.add((component, found))
        tensor = stored[component][found]
        # diffusers holds the VAE's attention projections as Linear (C, C), the original as conv1x1 (C, C, 1, 1): a
        # view with the two 1s, so the converter's shape check and copy see the original's layout.
        view[key] = tensor[:, :, None, None] if rule.conv1x1 and tensor.dim() == 2 else tensor
    for component, tensors in stored.items():
        view.update({f"{component}/{n}": t for n, t in tensors.items() if (component, n) not in used})
    return Checkpoint(folder, "diffusers", view, {})


def load_folder_weights(folder: str | Path, models: Mapping[str, nn.Module], **options) -> dict[str, dict]:
    """Our state dicts from a diffusers-format folder, through the same rules and strict checks as a single file
    (sd.model_converter.load_from_standard_weights; options: its dtype, device, memory_format). A mismatch is one
    ConversionError naming the folder's own keys ("unet/down_blocks.0..."): missing, unexpected, wrong shape."""
    folder = Path(folder)
    view = _folder_view(folder, models)
    try:
        return load_from_standard_weights(view, models, **options)
    except ConversionError as e:
        shown = {key: f"{component}/{name}" for key, (component, name) in ldm_to_diffusers(models).items()}
        raise ConversionError(re.sub(r"[\w.]+", lambda m: shown.get(m[0], m[0]), str(e))) from None
