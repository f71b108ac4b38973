"""What merging a LoRA costs at full SD 1.5 size: apply_lora and remove against diffusers' load_lora_weights +
fuse_lora (and unfuse + unload) on the same kohya file, interleaved, medians; and the memory a handle keeps to
restore the weights exactly, beside the models' size.

Not in CI. Random weights (the cost does not depend on them), the models in bf16 on a CPU with native bf16, else
fp32. The LoRA has kohya's default targets (the UNet's transformer blocks: attention, feed-forward, proj_in/out; the
text encoder's attention and MLP), rank 16.
Run: python benchmarks/lora.py [--reps 3] [--rank 16]   (a few minutes on 2 CPU cores, about 8 GB of RAM)
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from sd.clip import CLIP, CLIPConfig
from sd.devices import fast_dtype
from sd.diffusion import Diffusion, DiffusionConfig
from sd.lora import apply_lora, kohya_names
from sd.model_converter import to_standard_weights

KOHYA_UNET_BLOCKS = "_attentions_"  # kohya's default: the Transformer2DModel blocks (and all of the text encoder)


def kohya_file(models, rank: int, path: Path) -> int:
    """A random kohya LoRA of `rank` on kohya's default targets; how many layers it has."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for target, name in kohya_names(models).items():
        if target.model == "diffusion" and KOHYA_UNET_BLOCKS not in name:
            continue
        weight = dict(models[target.model].named_parameters())[target.param]
        out, inp, *kernel = weight.chunk(target.parts)[target.part].shape
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, inp, *kernel, generator=g) * 0.01
        tensors[f"{name}.lora_up.weight"] = torch.randn(out, rank, *([1, 1] if kernel else []), generator=g) * 0.01
        tensors[f"{name}.alpha"] = torch.tensor(float(rank) / 2)
    save_file(tensors, str(path))
    return len(tensors) // 3


def diffusers_models(models, dtype):
    """diffusers' UNet and transformers' CLIP with the same weights, through diffusers' own single-file conversion."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from reference import diffusers_unet, transformers_clip

    checkpoint = to_standard_weights(models)
    unet = diffusers_unet(DiffusionConfig(), checkpoint).to(dtype)
    text = transformers_clip(CLIPConfig(), checkpoint).to(dtype)
    return unet, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    dtype = fast_dtype("cpu")
    torch.manual_seed(0)
    models = {"clip": CLIP(CLIPConfig()).eval().to(dtype), "diffusion": Diffusion(DiffusionConfig()).eval().to(dtype)}
    unet, text = diffusers_models(models, dtype)

    class Pipeline(StableDiffusionLoraLoaderMixin):  # what diffusers' LoRA loader needs of a pipeline
        unet_name, text_encoder_name, hf_device_map = "unet", "text_encoder", None

        def __init__(self):
            self.unet, self.text_encoder = unet, text

        @property
        def components(self):
            return {"unet": self.unet, "text_encoder": self.text_encoder}

    pipe = Pipeline()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lora.safetensors"
        layers = kohya_file(models, args.rank, path)
        ours_apply, ours_remove, theirs_apply, theirs_remove, kept = [], [], [], [], 0
        for _ in range(args.reps):
            start = time.perf_counter()
            handle = apply_lora(models, path, 0.8)
            ours_apply.append(time.perf_counter() - start)
            kept = sum(t.numel() * t.element_size() for t in handle.saved if t is not None)
            start = time.perf_counter()
            handle.remove()
            ours_remove.append(time.perf_counter() - start)

            start = time.perf_counter()
            pipe.load_lora_weights(str(path))
            pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=0.8)
            theirs_apply.append(time.perf_counter() - start)
            start = time.perf_counter()
            pipe.unfuse_lora(components=["unet", "text_encoder"])
            pipe.unload_lora_weights()
            theirs_remove.append(time.perf_counter() - start)
    size = sum(p.numel() * p.element_size() for m in models.values() for p in m.parameters())
    med = statistics.median
    print(f"SD 1.5 text encoder + UNet in {str(dtype).removeprefix('torch.')}, kohya LoRA rank {args.rank}, "
          f"{layers} layers, {args.reps} reps, medians:")
    print(f"  apply: ours {med(ours_apply):.2f} s, diffusers load_lora_weights + fuse_lora {med(theirs_apply):.2f} s "
          f"(ratio {med(ours_apply) / med(theirs_apply):.2f})")
    print(f"  remove: ours {med(ours_remove):.2f} s, diffusers unfuse_lora + unload_lora_weights "
          f"{med(theirs_remove):.2f} s (ratio {med(ours_remove) / med(theirs_remove):.2f})")
    print(f"  kept to restore exactly: {kept / 2**20:.0f} MB, {kept / size:.0%} of the models' {size / 2**20:.0f} MB")


if __name__ == "__main__":
    main()
