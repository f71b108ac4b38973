"""A LoRA teaches the embedded model a shape it never saw: "sks" for a ring, trained by `sd train --data` on CPU.

The embedded model knows circles, squares and triangles (sd.training.datasets.SHAPES); a ring is none of them, and
"sks" is not a word it was trained on. (A new colour cannot be taught to the UNet alone: the embedded VAE decodes
only its 8 training colours; a pink or cyan disc comes back white or blue.) This writes a folder of rings in every
colour on other colours, captioned "a red sks on a blue background", trains a LoRA on it with the `sd` command, and
measures, with sd.training.datasets.describe for the colours and a hole test for the ring:
- concept: how often "a <colour> sks on a <background> background" gives a ring of that colour on that background,
  before (the base model) and after (with the LoRA);
- old prompts: the adherence of the 24 shapes prompts of benchmarks/adherence.py with and without the LoRA.
Prints the README's table. Not run in CI. Run: python benchmarks/finetune_concept.py [--steps 800] [--seeds 0 1 2]
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sd.cli import EMBEDDED_CHECKPOINT
from sd.lora import apply_lora
from sd.model_loader import preload_models_from_standard_weights
from sd.pipeline import generate
from sd.training.datasets import ADHERENCE_PROMPTS, COLOURS, caption, describe, prompts_grid

SIZE = 64
RING_WIDTH = 0.14  # of the image size: thick enough for the VAE's 4x downscale
SAMPLER, STEPS, CFG = "dpmpp_2m_karras", 20, 7.5


def ring(colour: str, background: str, radius: float) -> Image.Image:
    """A flat ring (a disc with a concentric hole) of `colour` on `background`, centred."""
    image = Image.new("RGB", (SIZE, SIZE), COLOURS[background])
    pen, c, w = ImageDraw.Draw(image), (SIZE - 1) / 2, RING_WIDTH * SIZE
    pen.ellipse([c - radius, c - radius, c + radius, c + radius], fill=COLOURS[colour])
    pen.ellipse([c - radius + w, c - radius + w, c + radius - w, c + radius - w], fill=COLOURS[background])
    return image


def is_ring(image, colour: str, background: str) -> bool:
    """describe() reads the colour and background, and the shape has a hole: the centre of its bounding box is
    background while shape pixels lie on all four sides of it."""
    if {k: v for k, v in describe(image).items() if k != "shape"} != {"colour": colour, "background": background}:
        return False
    rgb = np.asarray(image, dtype=np.float32)
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    nearest = np.linalg.norm(rgb[:, :, None] - palette, axis=-1).argmin(-1)
    shape = nearest == list(COLOURS).index(colour)
    ys, xs = np.nonzero(shape)
    if len(ys) < 0.02 * shape.size:
        return False
    cy, cx = int(ys.mean().round()), int(xs.mean().round())
    hole = not shape[cy - 2:cy + 3, cx - 2:cx + 3].any()
    return hole and shape[:cy, cx].any() and shape[cy + 1:, cx].any() and shape[cy, :cx].any() and shape[cy, cx + 1:].any()


def write_data(folder: Path) -> int:
    """Rings of every colour on other backgrounds at two sizes, each with its "a <colour> sks ..." caption."""
    folder.mkdir(parents=True)
    n = 0
    for _, colour, background in prompts_grid(48, seed=1):
        for radius in (0.30, 0.38):
            ring(colour, background, radius * SIZE).save(folder / f"{n}.png")
            (folder / f"{n}.txt").write_text(f"a {colour} sks on a {background} background")
            n += 1
    return n


def concept_prompts() -> list[tuple[str, str]]:
    """(colour, background) pairs for the evaluation: the 24 of the adherence prompts."""
    return [(colour, background) for _, colour, background in ADHERENCE_PROMPTS]


def images(models, prompts: list[str], seed: int) -> list[Image.Image]:
    return generate(prompts, models=models, seed=seed, n_inference_steps=STEPS, sampler_name=SAMPLER, cfg_scale=CFG,
                    height=SIZE, width=SIZE, progress=False, output_type="pil")


def measure(models, seeds) -> dict[str, float]:
    pairs, hits, old = concept_prompts(), 0, 0
    for seed in seeds:
        made = images(models, [f"a {c} sks on a {b} background" for c, b in pairs], seed)
        hits += sum(is_ring(image, c, b) for image, (c, b) in zip(made, pairs))
        made = images(models, [caption(*p) for p in ADHERENCE_PROMPTS], seed)
        old += sum(describe(image) == dict(zip(("shape", "colour", "background"), p))
                   for image, p in zip(made, ADHERENCE_PROMPTS))
    return {"sks": 100 * hits / (len(pairs) * len(seeds)), "old": 100 * old / (len(ADHERENCE_PROMPTS) * len(seeds))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-text-encoder", action="store_true", help="LoRA pairs on CLIP too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "data", Path(tmp) / "out"
        n = write_data(data)
        command = [sys.executable, "-m", "sd", "train", "--data", str(data), "--out", str(out), "--lora-rank",
                   str(args.rank), "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr",
                   str(args.lr), "--flip", "--sample-every", "0", "--checkpoint-every", "0", "--device", "cpu",
                   *(["--train-text-encoder"] if args.train_text_encoder else [])]
        print(" ".join(command[1:]).replace(str(tmp), "TMP"))
        start = time.perf_counter()
        subprocess.run(command, check=True, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        models = preload_models_from_standard_weights(EMBEDDED_CHECKPOINT)
        before = measure(models, args.seeds)
        with apply_lora(models, out / "lora.safetensors"):
            after = measure(models, args.seeds)
    n_images = len(concept_prompts()) * len(args.seeds)
    print(f"\n{n} training images (x2 flipped), {args.steps} steps of batch {args.batch_size}, rank {args.rank}: "
          f"{seconds:.0f} s on this CPU, loading included")
    print("| | base model | with the LoRA |\n|---|---|---|")
    print(f"| \"a <colour> sks on a <background> background\" gives a ring of that colour on it ({n_images} images) "
          f"| {before['sks']:.0f}% | {after['sks']:.0f}% |")
    print(f"| adherence of the 24 shapes prompts ({len(ADHERENCE_PROMPTS) * len(args.seeds)} images) "
          f"| {before['old']:.0f}% | {after['old']:.0f}% |")


if __name__ == "__main__":
    main()
