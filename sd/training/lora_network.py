"""LoRA layers to train: small down/up pairs beside the frozen UNet's (and text encoder's) layers, saved as kohya files.

No tutorial counterpart. Reference: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models": a frozen
layer W gets W x + (alpha / rank) · up(down(x)), down initialised as nn.Linear is (Kaiming uniform), up at zero, so
training starts from the base model exactly. Layout and names as kohya-ss's sd-scripts (networks/lora.py) writes
them, through sd.lora.kohya_names, so AUTOMATIC1111, ComfyUI, diffusers and sd.apply_lora load the file.
The base model is never changed: each LoRA adds its output through a forward hook, removed by remove().
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..checks import check, is_int
from ..files import atomic_output
from ..lora import kohya_names

# Which of our layers each target group holds, by the names of our modules (sd.diffusion, sd.clip).
TARGET_GROUPS = {
    "attention": ("attention_1.", "attention_2."),        # the UNet's self- and cross-attention projections
    "feed_forward": ("linear_geglu_1", "linear_geglu_2"),  # the UNet's GEGLU feed-forward
    "projection": ("conv_input", "conv_output"),          # the UNet's 1x1 proj_in / proj_out around each transformer
    "conv": ("conv_feature", "conv_merged", "residual_layer"),  # the UNet's residual blocks (LoCon)
}
DEFAULT_TARGETS = ("attention", "feed_forward", "projection")  # kohya's default: everything in the transformer blocks
TEXT_ENCODER_LAYERS = ("attention.", "linear_1", "linear_2")  # CLIP's attention and MLP


class LoraPair(nn.Module):
    """down then up for one target (a layer, or its q, k or v part), scaled by alpha / rank."""

    def __init__(self, layer: nn.Module, out_features: int, rank: int, alpha: float):
        super().__init__()
        if isinstance(layer, nn.Conv2d):
            self.down = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, bias=False)
            self.up = nn.Conv2d(rank, out_features, 1, bias=False)
        else:
            self.down = nn.Linear(layer.in_features, rank, bias=False)
            self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))  # nn.Linear's own initialisation
        nn.init.zeros_(self.up.weight)
        self.rank, self.alpha = rank, float(alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x.to(self.down.weight.dtype))) * (self.alpha / self.rank)


@dataclass(frozen=True)
class LoraConfig:
    """What a LoRA network is: its rank, alpha (the scale is alpha / rank), target groups and whether CLIP has pairs."""
    rank: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    text_encoder: bool = False


class LoraNetwork(nn.Module):
    """The trainable LoRA of models' UNet (targets: groups of TARGET_GROUPS) and, with text_encoder, of its CLIP.
    Attached by hooks while it lives; remove() detaches it. kohya_state_dict() is what a LoRA file holds."""

    def __init__(self, models: Mapping[str, nn.Module], rank: int = 8, alpha: float | None = None,
                 targets: tuple[str, ...] = DEFAULT_TARGETS, text_encoder: bool = False):
        super().__init__()
        check(is_int(rank) and rank > 0, f"rank must be a positive whole number, got {rank!r}")
        alpha = float(rank) if alpha is None else alpha
        check(isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0,
              f"alpha must be a positive number, got {alpha!r}")
        unknown = [t for t in targets if t not in TARGET_GROUPS]
        check(targets and not unknown, f"targets must be some of {', '.join(TARGET_GROUPS)}, got {targets!r}")
        self.models = dict(models)  # a plain dict: the models are not the network's parameters
        self.config = LoraConfig(rank, float(alpha), tuple(targets), bool(text_encoder))
        chosen = [name for group in targets for name in TARGET_GROUPS[group]]
        self.names: dict[str, str] = {}  # our pair's key in self.pairs -> the kohya name it is saved under
        self.pairs = nn.ModuleDict()
        by_layer: dict[tuple[str, str], list[tuple[int, int, str]]] = {}
        for target, kohya in kohya_names(models).items():
            patterns = chosen if target.model == "diffusion" else TEXT_ENCODER_LAYERS if text_encoder else ()
            if not any(p in target.param for p in patterns):
                continue
            key = kohya.replace(".", "_")
            layer = models[target.model].get_submodule(target.param.removesuffix(".weight"))
            out = layer.weight.shape[0] // target.parts
            self.pairs[key] = LoraPair(layer, out, rank, alpha).to(layer.weight.device)
            self.names[key] = kohya
            by_layer.setdefault((target.model, target.param), []).append((target.part, target.parts, key))
        check(self.pairs, "no layer matches the LoRA's targets")
        self._hooks = [self._attach(model, param, parts) for (model, param), parts in by_layer.items()]

    @property
    def rank(self) -> int:
        return self.config.rank

    @property
    def alpha(self) -> float:
        return self.config.alpha

    def _attach(self, model: str, param: str, parts: list[tuple[int, int, str]]):
        """A forward hook on the layer adding each pair's output to its part of the layer's output channels."""
        layer = self.models[model].get_submodule(param.removesuffix(".weight"))
        n_parts = parts[0][1]
        channel_dim = 1 if isinstance(layer, nn.Conv2d) else -1

        def hook(module, args, output):
            x = args[0]
            deltas = {part: self.pairs[key](x) for part, _, key in parts}
            if n_parts == 1:
                return output + deltas[0].to(output.dtype)
            zeros = torch.zeros_like(output.chunk(n_parts, dim=channel_dim)[0])
            full = torch.cat([deltas.get(p, zeros).to(output.dtype) for p in range(n_parts)], dim=channel_dim)
            return output + full

        return layer.register_forward_hook(hook)

    def remove(self) -> None:
        """Detach from the models: they compute as before the network was made."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @contextlib.contextmanager
    def swapped(self, pairs: nn.ModuleDict) -> Iterator[None]:
        """The network computes with the weights of `pairs` (its EMA copy, say) inside the block, its own after."""
        own = {k: v.clone() for k, v in self.pairs.state_dict().items()}
        self.pairs.load_state_dict(pairs.state_dict())
        try:
            yield
        finally:
            self.pairs.load_state_dict(own)

    def kohya_state_dict(self, pairs: nn.ModuleDict | None = None) -> dict[str, torch.Tensor]:
        """name -> tensor as kohya-ss saves a LoRA: <name>.lora_down.weight, <name>.lora_up.weight, <name>.alpha;
        the weights of `pairs` (a copy of self.pairs, such as its EMA) if given."""
        tensors = {}
        for key, pair in (self.pairs if pairs is None else pairs).items():
            name = self.names[key]
            tensors[f"{name}.lora_down.weight"] = pair.down.weight.detach().float().cpu().contiguous()
            tensors[f"{name}.lora_up.weight"] = pair.up.weight.detach().float().cpu().contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(self.alpha)
        return tensors



# --- the file: kohya's layout and its ss_* metadata ---------------------------------------------------------------

KOHYA_NETWORK_MODULE = "networks.lora"  # what kohya writes in ss_network_module for a plain LoRA
SD1_BASE = "sd_v1"  # kohya's ss_base_model_version for SD 1.x


def kohya_metadata(network: LoraNetwork, **settings) -> dict[str, str]:
    """The ss_* entries kohya-ss writes that describe this network (ss_network_module, _dim, _alpha,
    ss_base_model_version, ss_v2), plus any training settings given as ss_<name>=value (ss_learning_rate,
    ss_max_train_steps, ss_seed, ss_resolution, ...), every value a string as safetensors metadata must be."""
    metadata = {"ss_network_module": KOHYA_NETWORK_MODULE, "ss_network_dim": str(network.rank),
                "ss_network_alpha": f"{network.alpha:g}", "ss_base_model_version": SD1_BASE, "ss_v2": "False"}
    for name, value in settings.items():
        metadata[f"ss_{name}"] = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return metadata


def save_lora(network: LoraNetwork, path: str | os.PathLike, overwrite: bool = False,
              pairs: nn.ModuleDict | None = None, **settings) -> Path:
    """Write the network (with the weights of `pairs`, if given) as a kohya-format .safetensors LoRA with its ss_*
    metadata (kohya_metadata), whole or not at all (sd.files.atomic_output); an existing file is kept unless
    overwrite."""
    path = Path(path)
    check(path.suffix == ".safetensors", f"a LoRA is written as .safetensors, got {path.name!r}")
    with atomic_output(path, overwrite=overwrite) as tmp:
        save_file(network.kohya_state_dict(pairs), str(tmp), metadata=kohya_metadata(network, **settings))
    return path
