"""Map the original Stable Diffusion checkpoint layout onto our models' parameters, and back.

Tutorial part: "Loading the weights" (hkproj model_converter.py, there a 1,055-line hand-written map).
Here the map is generated from the block structure: each model is walked block by block beside the
original's names (ldm UNetModel input_blocks/middle_block/output_blocks, the VAE's Encoder/Decoder,
transformers' CLIPTextModel), and each block type has a short table of its own parameter names.
Reference layout: the keys of v1-5-pruned-emaonly (see shared/sd15_ldm_keys.json in the project).
"""

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .clip import CLIP, CLIPEmbedding, CLIPLayer
from .decoder import VAE_AttentionBlock, VAE_Decoder, VAE_ResidualBlock
from .diffusion import Diffusion, TimeEmbedding, UNET_AttentionBlock, UNET_OutputLayer, UNET_ResidualBlock
from .encoder import VAE_Encoder

MODEL_NAMES = ("clip", "encoder", "decoder", "diffusion")

# Where each model lives in the checkpoint. Older SD 1.x files (saved with transformers < 4.19)
# lack the "text_model." level; _clip_prefix() picks whichever the file has.
CLIP_PREFIXES = ("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")
VAE_PREFIX = "first_stage_model."
UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."

# Keys a real checkpoint carries that no model needs: the DDPM schedule it was trained with
# (our samplers compute it), CLIP's constant position ids, and the EMA's bookkeeping scalars.
IGNORED_KEYS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "model_ema.decay", "model_ema.num_updates",
    *(p + "embeddings.position_ids" for p in CLIP_PREFIXES),
})

# Per block type: our sub-module (or parameter) path -> the original's. A tuple means the original
# keeps separate q, k, v projections that we hold fused in one `in_proj`, concatenated along dim 0.
_LEAVES: dict[type, dict[str, str | tuple[str, ...]]] = {
    CLIPEmbedding: {"token_embedding": "token_embedding", "position_embedding": "position_embedding.weight"},
    CLIPLayer: {
        "layernorm_1": "layer_norm1",
        "attention.in_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "attention.out_proj": "self_attn.out_proj",
        "layernorm_2": "layer_norm2",
        "linear_1": "mlp.fc1",
        "linear_2": "mlp.fc2",
    },
    VAE_ResidualBlock: {"groupnorm_1": "norm1", "conv_1": "conv1", "groupnorm_2": "norm2", "conv_2": "conv2",
                        "residual_layer": "nin_shortcut"},
    VAE_AttentionBlock: {"groupnorm": "norm", "attention.in_proj": ("q", "k", "v"), "attention.out_proj": "proj_out"},
    TimeEmbedding: {"linear_1": "0", "linear_2": "2"},
    UNET_ResidualBlock: {"groupnorm_feature": "in_layers.0", "conv_feature": "in_layers.2", "linear_time": "emb_layers.1",
                         "groupnorm_merged": "out_layers.0", "conv_merged": "out_layers.3", "residual_layer": "skip_connection"},
    UNET_AttentionBlock: {
        "groupnorm": "norm",
        "conv_input": "proj_in",
        "layernorm_1": "transformer_blocks.0.norm1",
        "attention_1.in_proj": tuple(f"transformer_blocks.0.attn1.to_{n}" for n in "qkv"),
        "attention_1.out_proj": "transformer_blocks.0.attn1.to_out.0",
        "layernorm_2": "transformer_blocks.0.norm2",
        "attention_2.q_proj": "transformer_blocks.0.attn2.to_q",
        "attention_2.k_proj": "transformer_blocks.0.attn2.to_k",
        "attention_2.v_proj": "transformer_blocks.0.attn2.to_v",
        "attention_2.out_proj": "transformer_blocks.0.attn2.to_out.0",
        "layernorm_3": "transformer_blocks.0.norm3",
        "linear_geglu_1": "transformer_blocks.0.ff.net.0.proj",
        "linear_geglu_2": "transformer_blocks.0.ff.net.2",
        "conv_output": "proj_out",
    },
    UNET_OutputLayer: {"groupnorm": "0", "conv": "2"},
}

# The VAE's attention uses 1x1 convolutions for q, k, v and proj_out; ours are Linear layers.
# Same numbers: the original's weight is (C, C, 1, 1) where ours is (C, C).
_CONV1X1_AS_LINEAR = (VAE_AttentionBlock,)


class ConversionError(ValueError):
    """The checkpoint's keys or shapes do not match the models."""


@dataclass(frozen=True)
class Rule:
    ours: str                  # our parameter name, e.g. "unet.encoders.1.0.conv_feature.weight"
    theirs: tuple[str, ...]    # its checkpoint key(s); several are concatenated along dim 0
    shape: tuple[int, ...]     # our parameter's shape
    conv1x1: bool = False      # each checkpoint tensor has two extra trailing 1s

    def their_shape(self) -> tuple[int, ...]:
        part = (self.shape[0] // len(self.theirs), *self.shape[1:])
        return part + (1, 1) if self.conv1x1 else part


def _module_rules(module: nn.Module, ours: str, theirs: str) -> list[Rule]:
    """Rules for all parameters of one block, using its type's table (plain layers keep their names)."""
    table = _LEAVES.get(type(module), {})
    rules = []
    for name, p in module.named_parameters():
        match = max((k for k in table if name == k or name.startswith(k + ".")), key=len, default=None)
        if match is None:
            targets: tuple[str, ...] = (name,)
        else:
            suffix = name[len(match):]
            target = table[match]
            targets = tuple(t + suffix for t in (target if isinstance(target, tuple) else (target,)))
        conv1x1 = isinstance(module, _CONV1X1_AS_LINEAR) and p.dim() == 2
        rules.append(Rule(f"{ours}.{name}", tuple(f"{theirs}.{t}" for t in targets), tuple(p.shape), conv1x1))
    return rules


def _vae_encoder_names(encoder: VAE_Encoder) -> list[str | None]:
    """The original's name for each layer of our nn.Sequential encoder (None: no parameters)."""
    cfg = encoder.config
    names: list[str | None] = ["encoder.conv_in"]
    for level in range(len(cfg.block_out_channels)):
        names += [f"encoder.down.{level}.block.{i}" for i in range(cfg.layers_per_block)]
        if level != len(cfg.block_out_channels) - 1:
            names.append(f"encoder.down.{level}.downsample.conv")
    return names + ["encoder.mid.block_1", "encoder.mid.attn_1", "encoder.mid.block_2",
                    "encoder.norm_out", None, "encoder.conv_out", "quant_conv"]


def _vae_decoder_names(decoder: VAE_Decoder) -> list[str | None]:
    cfg = decoder.config
    names: list[str | None] = ["post_quant_conv", "decoder.conv_in",
                               "decoder.mid.block_1", "decoder.mid.attn_1", "decoder.mid.block_2"]
    for level in reversed(range(len(cfg.block_out_channels))):  # the original numbers levels from the finest
        names += [f"decoder.up.{level}.block.{i}" for i in range(cfg.layers_per_block + 1)]
        if level != 0:
            names += [None, f"decoder.up.{level}.upsample.conv"]  # nn.Upsample has no parameters
    return names + ["decoder.norm_out", None, "decoder.conv_out"]


def _unet_blocks(diffusion: Diffusion):
    """(our module path, module, original path) for every block of the UNet."""
    yield "time_embedding", diffusion.time_embedding, "time_embed"
    groups = [("unet.encoders", "input_blocks", diffusion.unet.encoders),
              ("unet.decoders", "output_blocks", diffusion.unet.decoders)]
    for ours, theirs, blocks in groups:
        for i, seq in enumerate(blocks):
            for j, layer in enumerate(seq):
                # ldm wraps its stride-2 conv in a Downsample module whose conv is called `op`.
                op = ".op" if isinstance(layer, nn.Conv2d) and layer.stride == (2, 2) else ""
                yield f"{ours}.{i}.{j}", layer, f"{theirs}.{i}.{j}{op}"
    for j, layer in enumerate(diffusion.unet.bottleneck):
        yield f"unet.bottleneck.{j}", layer, f"middle_block.{j}"
    yield "final", diffusion.final, "out"


def make_rules(name: str, model: nn.Module, clip_prefix: str = CLIP_PREFIXES[0]) -> list[Rule]:
    """All rules for one model: every parameter, with its full checkpoint key(s)."""
    if name == "clip":
        assert isinstance(model, CLIP)
        blocks = [("embedding", model.embedding, "embeddings")]
        blocks += [(f"layers.{i}", layer, f"encoder.layers.{i}") for i, layer in enumerate(model.layers)]
        blocks += [("layernorm", model.layernorm, "final_layer_norm")]
        prefix = clip_prefix
    elif name in ("encoder", "decoder"):
        assert isinstance(model, (VAE_Encoder, VAE_Decoder))
        names = _vae_encoder_names(model) if name == "encoder" else _vae_decoder_names(model)
        assert len(names) == len(model), f"VAE {name} layout out of step with the model"
        blocks = [(str(i), layer, n) for i, (layer, n) in enumerate(zip(model, names)) if n is not None]
        prefix = VAE_PREFIX
    elif name == "diffusion":
        assert isinstance(model, Diffusion)
        blocks = list(_unet_blocks(model))
        prefix = UNET_PREFIX
    else:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")
    rules = [r for ours, module, theirs in blocks for r in _module_rules(module, ours, prefix + theirs)]
    assert len(rules) == sum(1 for _ in model.parameters()), f"{name}: some parameters have no rule"
    return rules


def ema_key(key: str) -> str:
    """Where the full (non-pruned) checkpoint keeps the EMA copy of a UNet weight: LitEma drops the dots,
    model.diffusion_model.input_blocks.0.0.weight -> model_ema.diffusion_modelinput_blocks00weight."""
    return EMA_PREFIX + key.split(".", 1)[1].replace(".", "")


def has_ema(keys) -> bool:
    return any(k.startswith(EMA_PREFIX + "diffusion_model") for k in keys)


def _clip_prefix(keys) -> str:
    for prefix in CLIP_PREFIXES:
        if prefix + "embeddings.token_embedding.weight" in keys:
            return prefix
    return CLIP_PREFIXES[0]


def _owned(name: str, key: str) -> bool:
    """Whether a checkpoint key belongs to the named model's part of the file."""
    if name == "clip":
        return key.startswith("cond_stage_model.")
    if name == "encoder":
        return key.startswith((VAE_PREFIX + "encoder.", VAE_PREFIX + "quant_conv."))
    if name == "decoder":
        return key.startswith((VAE_PREFIX + "decoder.", VAE_PREFIX + "post_quant_conv."))
    return key.startswith((UNET_PREFIX, EMA_PREFIX))


def _read_into(src, dst: torch.Tensor) -> None:
    """Copy one checkpoint tensor into `dst` (same number of elements): in-memory tensors or file records."""
    if isinstance(src, torch.Tensor):
        dst.copy_(src.reshape(dst.shape))
    else:
        src.read(out=dst)  # sd.checkpoint_io.TensorRecord: straight from disk into dst's memory


def _summarise(title: str, items: list[str], limit: int = 12) -> str:
    shown = "\n".join(f"    {s}" for s in items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n{shown}{more}"


def plan_conversion(
    checkpoint: Mapping,
    models: Mapping[str, nn.Module],
    use_ema: bool = True,
) -> dict[str, list[tuple[Rule, tuple[str, ...]]]]:
    """Match a checkpoint's keys and shapes to the models' parameters, reading no tensor data.

    checkpoint: key -> anything with a `.shape` (tensors, meta tensors, sd.checkpoint_io.TensorRecord).
    Returns, per model, each rule with the checkpoint keys it reads. Raises ConversionError listing
    every missing key, unexpected key and shape mismatch. With use_ema and a full checkpoint that
    keeps EMA weights (v1-5-pruned.ckpt), the UNet reads the EMA copy.
    """
    unknown = set(models) - set(MODEL_NAMES)
    if unknown:
        raise ValueError(f"unknown model names {sorted(unknown)}; known: {', '.join(MODEL_NAMES)}")
    keys = set(checkpoint.keys())
    clip_prefix = _clip_prefix(keys)
    ema = use_ema and has_ema(keys)

    plans: dict[str, list[tuple[Rule, tuple[str, ...]]]] = {}
    missing, mismatched, used = [], [], set()
    for name, model in models.items():
        plans[name] = []
        for rule in make_rules(name, model, clip_prefix):
            sources = tuple(ema_key(k) for k in rule.theirs) if ema and name == "diffusion" else rule.theirs
            plans[name].append((rule, sources))
            for src in sources:
                used.add(src)
                if src not in keys:
                    missing.append(src)
                elif tuple(checkpoint[src].shape) != rule.their_shape():
                    mismatched.append(f"{src}: checkpoint {tuple(checkpoint[src].shape)}, model expects {rule.their_shape()}")
    # The UNet copy not chosen (training weights beside the EMA ones, or the other way) is known, not unexpected.
    other_copy = {k for k in keys if k.startswith((EMA_PREFIX, UNET_PREFIX))} if "diffusion" in plans else set()
    everything = set(plans) == set(MODEL_NAMES)
    unexpected = sorted(
        k for k in keys - used - IGNORED_KEYS - other_copy
        if everything or any(_owned(name, k) for name in plans)
    )
    if missing or mismatched or unexpected:
        parts = [f"checkpoint does not match the models ({', '.join(plans)})"]
        if missing:
            parts.append(_summarise("missing keys", sorted(missing)))
        if unexpected:
            parts.append(_summarise("unexpected keys", unexpected))
        if mismatched:
            parts.append(_summarise("shape mismatches", mismatched))
        raise ConversionError("\n".join(parts))
    return plans


def load_from_standard_weights(
    checkpoint: Mapping,
    models: Mapping[str, nn.Module],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    use_ema: bool = True,
) -> dict[str, dict[str, torch.Tensor]]:
    """Build our state dicts from a checkpoint in the original layout.

    checkpoint: key -> torch.Tensor, or key -> sd.checkpoint_io.TensorRecord (read lazily from disk).
    models: some of "clip", "encoder", "decoder", "diffusion" (they may live on the meta device: only
    their structure is used). Every check runs first (plan_conversion); then each parameter is
    allocated once, in `dtype`, and filled in place, so no second copy of the weights is ever held.
    """
    plans = plan_conversion(checkpoint, models, use_ema)
    state_dicts = {}
    for name, plan in plans.items():
        sd = {}
        for rule, sources in plan:
            tensor = torch.empty(rule.shape, dtype=dtype)
            for part, src in zip(tensor.chunk(len(sources)), sources):
                _read_into(checkpoint[src], part)
            sd[rule.ours] = tensor.to(device)  # one tensor at a time: a GPU load never holds the CPU copy of more
        state_dicts[name] = sd
    return state_dicts


def to_standard_weights(models: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The inverse: our models' weights as a checkpoint in the original layout (what v1-5-pruned-emaonly holds).

    Save the result with safetensors.torch.save_file (or torch.save({"state_dict": ...})) and any
    tool that reads SD 1.5 checkpoints, this library included, loads it.
    """
    out: dict[str, torch.Tensor] = {}
    for name, model in models.items():
        params = dict(model.named_parameters())
        for rule in make_rules(name, model):
            value = params[rule.ours].detach()
            for part, key in zip(value.chunk(len(rule.theirs)), rule.theirs):
                out[key] = part.reshape(rule.their_shape()).contiguous().clone()
    return out
