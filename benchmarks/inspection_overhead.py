"""What seeing inside costs: generate() plain, with an x̂_0 callback and latent preview, with attention maps, and with a
guidance function, each as a ratio to the plain run measured in the same process.

Attention maps recompute the cross-attention probabilities in hooks that exist only during that call; the preview is
a (C, 3) matrix product per step; a guidance function adds a decoder forward and backward per model evaluation.
Default: the embedded model at its 64x64 size (CPU); --checkpoint and --size for the real one.
Run: python benchmarks/inspection_overhead.py [--checkpoint PATH] [--size 512] [--steps 20] [--repeats 3]
"""

import argparse
import time

import torch

from sd.inspect.attention_maps import AttentionMaps
from sd.cli import EMBEDDED_CHECKPOINT
from sd.model_loader import checkpoint_image_size, preload_models_from_standard_weights
from sd.pipeline import generate
from sd.inspect.preview import LatentPreview


def best_time(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(EMBEDDED_CHECKPOINT))
    parser.add_argument("--size", type=int, default=None, help="image size (default: the checkpoint's)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    models = preload_models_from_standard_weights(args.checkpoint)
    size = args.size or checkpoint_image_size(args.checkpoint)
    preview = LatentPreview.for_models(models)
    common = dict(prompt="a red circle on a blue background", models=models, seed=0, n_inference_steps=args.steps,
                  sampler_name="ddim", height=size, width=size, progress=False)
    frames = []
    cases = {
        "plain": lambda: generate(**common, output_type="pil"),
        "callback + preview": lambda: generate(**common, callback=lambda i, t, x, x0: frames.append(preview(x0)),
                                               output_type="pil"),
        "attention maps": lambda: generate(**common, attention_maps=AttentionMaps(), output_type="pil"),
        "guidance_fn": lambda: generate(**common, guidance_fn=lambda images: images[:, 2].mean(), output_type="pil"),
    }
    generate(**common, output_type="pil")  # warm-up
    base = None
    print(f"{args.checkpoint}, {size}x{size}, {args.steps} DDIM steps, best of {args.repeats}, "
          f"{torch.get_num_threads()} threads")
    print("| run | seconds | ratio to plain |\n|---|---|---|")
    for name, run in cases.items():
        seconds = best_time(run, args.repeats)
        base = base or seconds
        print(f"| {name} | {seconds:.3f} | {seconds / base:.2f} |")


if __name__ == "__main__":
    main()
