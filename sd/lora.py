"""LoRA files merged into the models' weights, and taken out again bit for bit.

No tutorial counterpart. Reference: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models":
W' = W + multiplier · (alpha / rank) · up @ down. Files as they are shared for SD 1.5:
- kohya-ss (sd-scripts networks/lora.py): `lora_unet_<diffusers module path, dots as _>` and `lora_te_<...>` with
  `.lora_down.weight`, `.lora_up.weight`, `.alpha`; linear layers and convolutions, 3x3 included ("LoCon");
- LyCORIS LoHa (Hyeon-Woo et al. 2022, "FedPara"): `.hada_w1_a/_b`, `.hada_w2_a/_b`, `.alpha`;
  ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / rank;
- diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight` (and `text_encoder.`), alpha = rank unless the
  file says otherwise.
Layers are named through the converter's rule table (sd.model_converter) and diffusers' names of the same blocks
(sd.diffusers_format), so every target is one of our parameters, or one of q, k, v in a fused in_proj.
"""

import json
import math
import os
import re
from collections.abc import Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint_io import CheckpointError, open_user_file
from .checks import check, is_finite_number
from .embeddings import SHORT_HASH, file_sha256
from .model_converter import CLIP_PREFIXES, UNET_PREFIX, make_rules

LORA_MODELS = {"clip": ("lora_te_", "text_encoder."), "diffusion": ("lora_unet_", "unet.")}  # kohya's, diffusers'
# The tensors of one layer, by kind: suffix -> its role.
KINDS = {
    "lora": {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"},
    "peft": {"lora_A.weight": "down", "lora_B.weight": "up", "alpha": "alpha",
             "lora.down.weight": "down", "lora.up.weight": "up"},  # PEFT, and diffusers' older own
    "loha": {"hada_w1_a": "w1_a", "hada_w1_b": "w1_b", "hada_w2_a": "w2_a", "hada_w2_b": "w2_b", "alpha": "alpha"},
}
UNSUPPORTED = {"lora_mid.weight": "LoCon with a Tucker core (lora_mid)", "hada_t1": "LoHa with Tucker cores",
               "hada_t2": "LoHa with Tucker cores", "lokr_w1": "LoKr", "lokr_w1_a": "LoKr", "dora_scale": "DoRA",
               "oft_blocks": "OFT", "diff": "a full weight difference (LyCORIS 'full')", "w_norm": "norm layers"}
LORA_LAYERS = (nn.Linear, nn.Conv2d)  # the layers LoRA adapts: not norms, nor embedding tables
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers writes PEFT's LoraConfig here (lora_alpha, r)
_SUFFIX = re.compile(r"^(.*?)\.(" + "|".join(re.escape(s) for s in sorted(
    {s for kind in KINDS.values() for s in kind} | set(UNSUPPORTED), key=len, reverse=True)) + r")$")


class LoraError(CheckpointError):
    """The file is not a LoRA for these models."""


@dataclass(frozen=True)
class Target:
    """One weight a LoRA may change: our model and parameter, and which of its dim-0 parts (q, k or v of a fused
    in_proj; part 0 of 1 for an ordinary layer)."""

    model: str
    param: str
    part: int
    parts: int


def lora_targets(models: Mapping[str, nn.Module]) -> dict[str, Target]:
    """Every name a LoRA file may give a layer of the text encoder or UNet -> the weight it changes: kohya's
    (lora_te_text_model_encoder_layers_0_self_attn_q_proj, lora_unet_down_blocks_0_..., and the older
    lora_unet_input_blocks_1_1_... of the original layout) and diffusers' (unet.down_blocks.0...)."""
    return {alias: target for target, aliases in _named_targets(models) for alias in aliases}


def kohya_names(models: Mapping[str, nn.Module]) -> dict[Target, str]:
    """Each weight a LoRA may change -> the name kohya-ss writes for it (what AUTOMATIC1111 and ComfyUI read)."""
    return {target: aliases[0] for target, aliases in _named_targets(models)}


def _named_targets(models: Mapping[str, nn.Module]):
    """(Target, [kohya's name, diffusers' name, kohya's name in the original layout]) for every linear and
    convolution weight of the text encoder and the UNet (one Target for each of q, k, v in a fused in_proj)."""
    from .diffusers_format import ldm_to_diffusers

    diffusers = ldm_to_diffusers(models)
    for name, (kohya, peft) in LORA_MODELS.items():
        for rule in make_rules(name, models[name]):
            owner = models[name].get_submodule(rule.ours.rpartition(".")[0])
            if not (isinstance(owner, LORA_LAYERS) and rule.ours.endswith(".weight")):  # norms, biases, embeddings
                continue
            for part, key in enumerate(rule.theirs):
                module = diffusers[key][1].removesuffix(".weight")
                original = _strip_prefix(key.removesuffix(".weight"))
                yield Target(name, rule.ours, part, len(rule.theirs)), [
                    kohya + module.replace(".", "_"), peft + module, kohya + original.replace(".", "_")]


def _strip_prefix(key: str) -> str:
    for prefix in (*CLIP_PREFIXES, UNET_PREFIX):
        if key.startswith(prefix):
            return ("text_model." if prefix in CLIP_PREFIXES else "") + key[len(prefix):]
    return key


@dataclass
class Layer:
    """One layer's tensors from the file."""

    name: str
    kind: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def rank(self) -> int:
        return self.tensors["w1_b" if self.kind == "loha" else "down"].shape[0]

    def check(self, path: Path) -> None:
        """The factors fit each other (ranks agree, one alpha), else a LoraError naming the layer."""
        t = self.tensors
        pairs = [("w1_a", "w1_b"), ("w2_a", "w2_b")] if self.kind == "loha" else [("up", "down")]
        for a, b in pairs:
            if t[a].dim() < 2 or t[b].dim() < 2 or t[a].flatten(1).shape[1] != t[b].shape[0]:
                raise LoraError(f"{path}: layer {self.name}: its {a} {tuple(t[a].shape)} and {b} {tuple(t[b].shape)} "
                                f"do not multiply (their ranks differ): a damaged file")
        if self.kind == "loha" and (t["w1_a"].shape[0], t["w1_b"].shape[1]) != (t["w2_a"].shape[0], t["w2_b"].shape[1]):
            raise LoraError(f"{path}: layer {self.name}: its two Hadamard factors have different shapes")
        if "alpha" in t and (t["alpha"].numel() != 1 or not t["alpha"].is_floating_point() and t["alpha"].dtype
                             not in (torch.int64, torch.int32)):
            raise LoraError(f"{path}: layer {self.name}: its alpha must be one number, got {tuple(t['alpha'].shape)}")

    def update_shape(self) -> tuple[int, int]:
        """The shape of ΔW as the factors make it: (out, in·kh·kw)."""
        t = self.tensors
        return (t["w1_a"].shape[0], t["w1_b"].shape[1]) if self.kind == "loha" else (t["up"].shape[0],
                                                                                      t["down"].flatten(1).shape[1])

    def check_fits(self, path: Path, shape: torch.Size) -> None:
        """ΔW fits a weight of `shape` and the factors are finite, else a LoraError naming the layer."""
        out, inp = self.update_shape()
        if out * inp != math.prod(shape):
            raise LoraError(f"{path}: layer {self.name}: its update is ({out}, {inp}), the layer's weight "
                            f"{tuple(shape)}: a LoRA for another model (SD 2.x or SDXL?)")
        if not all(torch.isfinite(t).all() for t in self.tensors.values()):
            raise LoraError(f"{path}: layer {self.name} holds NaN or inf")

    def delta(self, shape: torch.Size, alpha: float | None) -> torch.Tensor:
        """ΔW (float32) for a weight of `shape` (check_fits first), scale alpha / rank included."""
        if "alpha" in self.tensors:
            alpha = float(self.tensors["alpha"])
        scale = (alpha if alpha is not None else self.rank()) / self.rank()
        t = {k: v.float() for k, v in self.tensors.items() if k != "alpha"}
        if self.kind == "loha":
            delta = ((t["w1_a"] * scale) @ t["w1_b"]) * (t["w2_a"] @ t["w2_b"])  # (out, in·kh·kw)
        else:
            delta = (t["up"].flatten(1) * scale) @ t["down"].flatten(1)  # (out, r) @ (r, in·kh·kw)
        return delta.reshape(shape)


def read_lora(path: str | os.PathLike) -> tuple[dict[str, Layer], dict[str, str]]:
    """The file's layers by name, each with its kind's tensors, and the file's metadata; LoraError for anything else."""
    path = Path(path)
    ckpt = open_user_file(path, "a LoRA", ".safetensors, .pt; a folder of them is --lora-dir")
    found: dict[str, dict[str, torch.Tensor]] = {}
    other = []
    for key, tensor in ckpt.items():
        match = _SUFFIX.match(key)
        if match is None:
            other.append(key)
            continue
        name, suffix = match.groups()
        if suffix in UNSUPPORTED:
            raise LoraError(f"{path}: {UNSUPPORTED[suffix]} ({key}) is not supported; sd merges LoRA (kohya, "
                            f"LoCon, diffusers/PEFT) and LoHa files")
        found.setdefault(name, {})[suffix] = tensor.clone()  # small: merged again if a LoRA under it goes
    layers = {}
    for name, tensors in found.items():
        weights = set(tensors) - {"alpha"}  # alpha alone says nothing of the kind
        kind = next((k for k in ("loha", "peft") if weights and weights <= set(KINDS[k])), "lora")
        check(set(tensors) <= set(KINDS[kind]), f"{path}: layer {name} mixes tensors of different kinds: "
              f"{', '.join(sorted(tensors))}")
        layers[name] = Layer(name, kind, {KINDS[kind][suffix]: t for suffix, t in tensors.items()})
    _check_layers(path, ckpt, layers, other)
    return layers, dict(ckpt.metadata)


def _check_layers(path: Path, ckpt, layers: dict[str, Layer], other: list[str]) -> None:
    if not layers:
        what = "a full Stable Diffusion checkpoint (use it as --checkpoint)" if any(
            k.startswith(UNET_PREFIX) for k in ckpt) else f"{len(ckpt)} tensors, e.g. {', '.join(sorted(ckpt)[:3])}"
        raise LoraError(f"{path}: not a LoRA (no lora_down/lora_up, lora_A/lora_B or hada_ tensors): {what}")
    if other:
        raise LoraError(f"{path}: {len(other)} tensors are no LoRA layer's: {', '.join(sorted(other)[:4])}")
    for layer in layers.values():
        needed = {"loha": {"w1_a", "w1_b", "w2_a", "w2_b"}}.get(layer.kind, {"down", "up"})
        missing = needed - set(layer.tensors)
        names = {role: suffix for suffix, role in KINDS[layer.kind].items()}
        check(not missing, f"{path}: layer {layer.name} lacks its {', '.join(sorted(names[m] for m in missing))}")
        layer.check(path)


def _file_alpha(metadata: Mapping[str, str], model: str) -> float | None:
    """PEFT's lora_alpha for a model, from the metadata diffusers writes (None: alpha = rank)."""
    text = metadata.get(PEFT_METADATA_KEY)
    if not text:
        return None
    try:
        config = json.loads(text)
        prefix = LORA_MODELS[model][1]
        alpha = config.get(f"{prefix}lora_alpha", config.get("lora_alpha"))
        return None if alpha is None else float(alpha)
    except (ValueError, TypeError, AttributeError):
        return None


def lora_hash(path: Path) -> str:
    """AUTOMATIC1111's short hash of a LoRA: a .safetensors file's sha256 after its header (kohya's "addnet" hash,
    which does not change with the metadata), any other file's whole sha256; the first 12 hex digits."""
    start = 0
    with open(path, "rb") as f:
        head = f.read(8)
    if path.suffix == ".safetensors" and len(head) == 8:
        start = 8 + int.from_bytes(head, "little")
    return file_sha256(path, start)[:SHORT_HASH]


@dataclass(eq=False)  # two handles of the same file are two merges: compared by identity
class LoraHandle:
    """A LoRA merged into models' weights; remove() puts back the weights it changed, bit for bit."""

    name: str
    path: Path
    multipliers: dict  # per model ("clip", "diffusion")
    short_hash: str
    models: dict
    changes: list = field(default_factory=list)  # (Target, Layer, the file's alpha or None): ΔW made when merged
    saved: list = field(default_factory=list)    # (Target, the original part) while applied
    applied: bool = False

    def _parts(self):
        """(the part of the weight a layer changes, that layer, its alpha, its model's multiplier), the part a view:
        writing it writes the weight."""
        params = {name: dict(self.models[name].named_parameters()) for name in LORA_MODELS}
        for target, layer, alpha in self.changes:
            weight = params[target.model][target.param]
            yield weight.data.chunk(target.parts)[target.part], layer, alpha, self.multipliers[target.model]

    @property
    def multiplier(self) -> float:
        return self.multipliers["diffusion"]

    @torch.no_grad()
    def _merge(self) -> None:
        """W += multiplier · ΔW, computed in float32 and rounded once to W's dtype; W's old values kept first. A
        merged weight that is not finite (a huge multiplier) puts every weight back and raises."""
        self.saved = []
        for part, layer, alpha, multiplier in self._parts():
            if multiplier == 0:
                self.saved.append(None)
                continue
            delta = layer.delta(part.shape, alpha).to(part.device)
            merged = part.to(torch.float32, copy=True).add_(delta, alpha=multiplier)  # a copy even when W is fp32
            if not torch.linalg.vector_norm(merged, float("inf")) <= torch.finfo(part.dtype).max:  # NaN fails too
                self.applied = True
                self._restore()
                raise LoraError(f"{self.path}: at multiplier {multiplier:g}, layer {layer.name}'s weights become "
                                f"inf or NaN in {str(part.dtype).removeprefix('torch.')}: use a smaller multiplier")
            self.saved.append(part.clone())
            part.copy_(merged)  # rounded once, to the weight's dtype
        self.applied = True

    @torch.no_grad()
    def _restore(self) -> None:
        for (part, *_), original in zip(self._parts(), self.saved):
            if original is not None:
                part.copy_(original)
        self.saved, self.applied = [], False

    def remove(self) -> None:
        """Take this LoRA out. LoRAs applied after it are taken out first and merged again after, so each weight
        ends as the remaining LoRAs make it."""
        if not self.applied:
            return
        stack = _stack(self.models)
        later = stack[stack.index(self) + 1:]
        for handle in reversed(later):
            handle._restore()
        self._restore()
        stack.remove(self)
        for handle in later:
            handle._merge()

    def __enter__(self) -> "LoraHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _stack(models) -> list:
    """The LoRAs applied to these models, oldest first (kept on the UNet, which every set of models has)."""
    diffusion = models["diffusion"]
    if not hasattr(diffusion, "applied_loras"):
        diffusion.applied_loras = []
    return diffusion.applied_loras


def apply_lora(models: Mapping[str, nn.Module], path: str | os.PathLike, multiplier: float = 1.0,
               name: str | None = None, *, unet_multiplier: float | None = None) -> LoraHandle:
    """Merge a LoRA file into models["clip"] and models["diffusion"]: W += multiplier · alpha / rank · ΔW for every
    layer it names. Returns a handle; handle.remove() restores the weights exactly (or use it in a with block).
    Everything is checked before any weight changes: layers that match none of the models', shapes that differ (an
    SD 2.x or SDXL LoRA), a file that is not a LoRA. multiplier 0 changes nothing. name: for the image's
    parameters (default: the file's stem). unet_multiplier: the UNet's, when it differs from the text encoder's
    (AUTOMATIC1111's <lora:name:te:unet>)."""
    handle = plan_lora(models, path, multiplier, name, unet_multiplier=unet_multiplier)
    if any(handle.multipliers.values()):
        handle._merge()
        _stack(models).append(handle)
    return handle


def plan_lora(models: Mapping[str, nn.Module], path: str | os.PathLike, multiplier: float = 1.0,
              name: str | None = None, *, unet_multiplier: float | None = None) -> LoraHandle:
    """Every check apply_lora makes, and the handle it would merge, without changing a weight. The models may be
    on the meta device (their structure is enough): the sd command checks a LoRA so before loading a checkpoint."""
    path = Path(path)
    unet_multiplier = multiplier if unet_multiplier is None else unet_multiplier
    for value in (multiplier, unet_multiplier):
        check(is_finite_number(value), f"LoRA multiplier must be a finite number, got {value!r}")
    layers, metadata = read_lora(path)
    _refuse_other_models(path, layers, metadata)
    targets = lora_targets(models)
    unknown = sorted(n for n in layers if n not in targets)
    if unknown:
        raise LoraError(f"{path}: {len(unknown)} of its {len(layers)} layers match no layer of these models: "
                        f"{', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''} (an SD 2.x or SDXL LoRA, or "
                        f"one for another model?)")
    multipliers = {"clip": float(multiplier), "diffusion": float(unet_multiplier)}
    handle = LoraHandle(name or path.stem, path, multipliers, lora_hash(path), dict(models))
    seen: dict[Target, str] = {}
    params = {name: dict(models[name].named_parameters()) for name in LORA_MODELS}
    for layer_name, layer in layers.items():
        target = targets[layer_name]
        check(target not in seen, f"{path}: layers {seen.get(target)} and {layer_name} name the same weight")
        seen[target] = layer_name
        layer.check_fits(path, params[target.model][target.param].chunk(target.parts)[target.part].shape)
        handle.changes.append((target, layer, _file_alpha(metadata, target.model)))
    return handle


def _refuse_other_models(path: Path, layers: Mapping[str, Layer], metadata: Mapping[str, str]) -> None:
    """An SDXL or SD 2.x LoRA named as such, before its layers are matched one by one."""
    base = metadata.get("ss_base_model_version", "")
    if base.startswith("sdxl") or any(n.startswith(("lora_te1_", "lora_te2_")) for n in layers):
        raise LoraError(f"{path}: an SDXL LoRA; sd loads SD 1.x LoRAs")
    if base.startswith("sd_v2") or metadata.get("ss_v2") == "True":
        raise LoraError(f"{path}: an SD 2.x LoRA; sd loads SD 1.x LoRAs")


def applied_loras(models) -> list[LoraHandle]:
    """The LoRAs merged into these models now, oldest first."""
    return list(_stack(models))


# --- <lora:name:multiplier> in a prompt ------------------------------------------------------------------------

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")


def find_lora(lora_dir: str | os.PathLike, name: str) -> Path:
    """The file a <lora:name> tag means: lora_dir/name.safetensors (.pt, .ckpt, .bin), or a file of that stem in a
    folder below, as AUTOMATIC1111 finds them; never a file outside lora_dir."""
    lora_dir = Path(lora_dir)
    check(lora_dir.is_dir(), f"lora_dir {lora_dir} is not a folder (sd: --lora-dir DIR, where the LoRA files are)")
    check(not any(part in ("..", "") for part in Path(name).parts) and not Path(name).is_absolute(),
          f"<lora:{name}> in the prompt: a LoRA's name is a file name in lora_dir, not a path out of it")
    candidates = [lora_dir / f"{name}{suffix}" for suffix in LORA_SUFFIXES]
    candidates += sorted(p for p in lora_dir.rglob("*") if p.stem == Path(name).name and p.suffix in LORA_SUFFIXES)
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        known = sorted({p.stem for p in lora_dir.rglob("*") if p.suffix in LORA_SUFFIXES})
        raise FileNotFoundError(f"<lora:{name}> in the prompt: no {name}.safetensors (or .pt, .ckpt) in {lora_dir}; "
                                f"it has {', '.join(known[:10]) or 'no LoRA files'}{', ...' if len(known) > 10 else ''}")
    return found


def prompt_loras(prompts: list[str], negatives: list[str], lora_dir) -> tuple[list[str], list[tuple]]:
    """(the prompts without their <lora:...> tags, [(file, text-encoder multiplier, UNet multiplier), ...]): every
    prompt of one call must name the same LoRAs (they are merged into the weights, which all prompts share);
    negative prompts name none."""
    from .prompt_parser import extra_networks

    for negative in negatives:
        check(not extra_networks(negative)[1], f"<lora:...> in the negative prompt {negative!r:.60}: LoRAs are "
              f"merged into the model for the whole image; name them in the prompt")
    parsed = [extra_networks(p) for p in prompts]
    tags = parsed[0][1]
    check(all(sorted(found) == sorted(tags) for _, found in parsed), "the prompts of one call name different "
          "<lora:...> tags; they are merged into the weights all prompts share: give each set its own call")
    check(not tags or lora_dir is not None, f"the prompt names <lora:{tags[0][0] if tags else ''}:...>: give lora_dir "
          f"(sd: --lora-dir DIR), the folder of the LoRA files")
    return [text for text, _ in parsed], [(find_lora(lora_dir, name), te, unet) for name, te, unet in tags]


@contextmanager
def loras_applied(models, loras: list[tuple]):
    """The LoRAs [(file, multiplier[, UNet multiplier])] merged for the length of a block, and taken out after it,
    also when it fails."""
    with ExitStack() as stack:
        for path, multiplier, *unet in loras:
            stack.enter_context(apply_lora(models, path, multiplier, unet_multiplier=(unet or [None])[0]))
        yield


# --- a LoRA from two models: kohya's extract_lora_from_models ---------------------------------------------------


@torch.no_grad()
def extract_lora(base: Mapping[str, nn.Module], tuned: Mapping[str, nn.Module], rank: int = 8,
                 tolerance: float = 0.0) -> dict[str, torch.Tensor]:
    """A kohya-format LoRA (name -> tensor, for safetensors' save_file) of rank `rank` that turns base's text encoder
    and UNet into tuned's as nearly as that rank allows: for each weight that differs by more than `tolerance`, the
    truncated SVD of ΔW = U S Vᵀ gives up = U S (out, r) and down = Vᵀ (r, in[, kh, kw]), alpha = r (scale 1)."""
    check(isinstance(rank, int) and not isinstance(rank, bool) and rank > 0, f"rank must be a positive whole number, "
          f"got {rank!r}")
    tensors = {}
    for target, name in kohya_names(base).items():
        before, after = (dict(m[target.model].named_parameters())[target.param].chunk(target.parts)[target.part]
                         for m in (base, tuned))
        delta = (after.float() - before.float()).cpu()
        if delta.abs().max() <= tolerance:
            continue
        u, s, vh = torch.linalg.svd(delta.flatten(1), full_matrices=False)
        r = min(rank, s.numel())
        up, down = u[:, :r] * s[:r], vh[:r]  # (out, r), (r, in·kh·kw)
        if delta.dim() == 4:
            up, down = up[..., None, None], down.reshape(r, *delta.shape[1:])
        tensors |= {f"{name}.lora_up.weight": up.contiguous(), f"{name}.lora_down.weight": down.contiguous(),
                    f"{name}.alpha": torch.tensor(float(r))}
    return tensors
