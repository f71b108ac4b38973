"""Prompt adherence of a checkpoint on the shapes prompts: does the picture show the asked shape, colour and background?

Generates one image per prompt of sd.training.datasets.ADHERENCE_PROMPTS (24 shape x colour x background triples) with and
without classifier-free guidance, reads each back with sd.training.datasets.describe, and prints the rates and a table
(the README's). Default checkpoint: the embedded model. Not run in CI (tests/test_embedded_model.py asserts the rate).
Run: python benchmarks/adherence.py [--checkpoint weights/sd-shapes.safetensors] [--seeds 0 1 2]
"""

import argparse
import time
from pathlib import Path

import torch

from sd.cli import EMBEDDED_CHECKPOINT
from sd.training.datasets import ADHERENCE_PROMPTS, caption, describe
from sd.model_loader import preload_models_from_standard_weights
from sd.pipeline import generate
from sd.speedups import DEEPCACHE_INTERVAL, TOME_RATIO


def adherence(models, prompts, seed: int, cfg_scale: float | None, steps: int = 20, sampler: str = "dpmpp_2m_karras",
              size: int = 64, **options) -> list[dict]:
    """One image per (shape, colour, background) prompt, all in one batch; cfg_scale None: no guidance; options go
    to generate() (tome_ratio=..., deepcache_interval=...). Returns, per prompt, what was asked, what was seen, and
    whether each part matches."""
    texts = [caption(*p) for p in prompts]
    images = generate(texts, models=models, seed=seed, n_inference_steps=steps, sampler_name=sampler, height=size,
                      width=size, do_cfg=cfg_scale is not None, cfg_scale=cfg_scale or 1.0, progress=False,
                      output_type="pil", **options)
    rows = []
    for (shape, colour, background), image in zip(prompts, images):
        seen = describe(image)
        rows.append({"asked": (shape, colour, background), "seen": (seen["shape"], seen["colour"], seen["background"]),
                     "shape": seen["shape"] == shape, "colour": seen["colour"] == colour,
                     "background": seen["background"] == background, "image": image})
    for row in rows:
        row["all"] = row["shape"] and row["colour"] and row["background"]
    return rows


def rate(rows: list[dict], key: str = "all") -> float:
    return sum(r[key] for r in rows) / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=EMBEDDED_CHECKPOINT)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cfg-scale", type=float, default=7.5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--grid", type=Path, default=None, help="save the with-CFG images of the first seed as a PNG grid")
    args = parser.parse_args()
    torch.set_num_threads(2)
    models = preload_models_from_standard_weights(args.checkpoint)
    bf16 = preload_models_from_standard_weights(args.checkpoint, dtype=torch.bfloat16)
    prompts = list(ADHERENCE_PROMPTS)
    print(f"{args.checkpoint}: {len(prompts)} prompts x {len(args.seeds)} seeds, {args.steps} steps dpmpp_2m_karras\n")
    print("| guidance | shape | colour | background | all three |")
    print("|---|---|---|---|---|")
    first = None
    cfg = f"CFG {args.cfg_scale}"
    variants = [(cfg, args.cfg_scale, models, {}), ("none", None, models, {}), (f"{cfg}, bfloat16", args.cfg_scale, bf16, {}),
                (f"{cfg}, ToMe {TOME_RATIO}", args.cfg_scale, models, {"tome_ratio": TOME_RATIO}),
                (f"{cfg}, DeepCache {DEEPCACHE_INTERVAL}", args.cfg_scale, models,
                 {"deepcache_interval": DEEPCACHE_INTERVAL}),
                (f"{cfg}, ToMe + DeepCache, bfloat16", args.cfg_scale, bf16,
                 {"tome_ratio": TOME_RATIO, "deepcache_interval": DEEPCACHE_INTERVAL})]
    for label, scale, chosen, options in variants:
        t0 = time.perf_counter()
        rows = [r for seed in args.seeds for r in adherence(chosen, prompts, seed, scale, args.steps, **options)]
        first = first or rows[: len(prompts)]
        cells = " | ".join(f"{rate(rows, k):.0%}" for k in ("shape", "colour", "background", "all"))
        print(f"| {label} | {cells} |  ({time.perf_counter() - t0:.1f} s)")
    if args.grid:
        from PIL import Image

        from sd.files import save_image

        size = first[0]["image"].size[0]
        grid = Image.new("RGB", (size * 8, size * ((len(first) + 7) // 8)))
        for k, row in enumerate(first):
            grid.paste(row["image"], ((k % 8) * size, (k // 8) * size))
        save_image(grid, args.grid, overwrite=True)
        print(f"\nwrote {args.grid}")
    print("\nmisses with CFG (first seed):")
    for row in first:
        if not row["all"]:
            print(f"  asked {' / '.join(row['asked'])}, saw {' / '.join(row['seen'])}")


if __name__ == "__main__":
    main()
