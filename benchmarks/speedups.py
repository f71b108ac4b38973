"""What Token Merging and DeepCache save at full SD 1.5 size: the time of one UNet call with classifier-free guidance
(batch 2, 64x64 latents) plain, with ToMe, as one of DeepCache's shallow calls, and both, interleaved, medians;
and what that makes of a 20-step image's UNet time (DeepCache at interval N runs whole only every N-th call and the
first two).

Not in CI. Random weights (the speed does not depend on them); bf16 on a CPU with native bf16, else fp32.
Run: python benchmarks/speedups.py [--reps 3] [--steps 20]   (about 2 minutes on 2 CPU cores, 4 GB of RAM)
Their quality cost is measured on the embedded model by benchmarks/adherence.py.
"""

import argparse
import statistics
import time

import torch

from sd.deepcache import WHOLE_FIRST, deep_cache
from sd.devices import fast_dtype, fast_memory_format
from sd.diffusion import Diffusion, DiffusionConfig
from sd.speedups import DEEPCACHE_INTERVAL, TOME_RATIO
from sd.tome import merged_tokens


def whole_calls(steps: int, interval: int) -> int:
    """How many of `steps` calls DeepCache runs whole (sd.deepcache.DeepCache.reusable's rule)."""
    return sum(1 for i in range(steps) if i % interval == 0 or i < WHOLE_FIRST)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    dtype = fast_dtype("cpu")
    torch.manual_seed(0)
    model = Diffusion(DiffusionConfig()).eval().to(dtype).to(memory_format=fast_memory_format("cpu", dtype))
    latents = torch.randn(2, 4, 64, 64, dtype=dtype)
    context = torch.randn(2, 77, 768, dtype=dtype)

    def plain():
        model(latents, context, 500)

    def tome():
        with merged_tokens(model, TOME_RATIO, torch.Generator().manual_seed(0)):
            model(latents, context, 500)

    def shallow(ratio: float = 0.0):
        with merged_tokens(model, ratio, torch.Generator().manual_seed(0)), deep_cache(model, DEEPCACHE_INTERVAL):
            for _ in range(WHOLE_FIRST):
                model(latents, context, 500)  # whole calls that keep the deep features (not timed)
            start = time.perf_counter()
            model(latents, context, 500)  # a shallow one
            return time.perf_counter() - start

    kinds = {"plain": plain, f"ToMe {TOME_RATIO}": tome, "DeepCache shallow call": shallow,
             f"ToMe {TOME_RATIO} + DeepCache shallow call": lambda: shallow(TOME_RATIO)}
    times = {name: [] for name in kinds}
    with torch.inference_mode():
        for _ in range(args.reps):
            for name, run in kinds.items():
                start = time.perf_counter()
                took = run()
                times[name].append(took if took is not None else time.perf_counter() - start)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"dtype {str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads, median of {args.reps}\n")
    print("| UNet call (CFG batch 2, 64x64 latents) | seconds | vs plain |")
    print("|---|---|---|")
    for name, seconds in median.items():
        print(f"| {name} | {seconds:.2f} | {seconds / median['plain']:.2f} |")
    whole = whole_calls(args.steps, DEEPCACHE_INTERVAL)
    shallow_calls = args.steps - whole
    per_image = {
        "plain": args.steps * median["plain"],
        f"ToMe {TOME_RATIO}": args.steps * median[f"ToMe {TOME_RATIO}"],
        f"DeepCache {DEEPCACHE_INTERVAL}": whole * median["plain"] + shallow_calls * median["DeepCache shallow call"],
        "both": whole * median[f"ToMe {TOME_RATIO}"]
        + shallow_calls * median[f"ToMe {TOME_RATIO} + DeepCache shallow call"],
    }
    print(f"\nUNet time of a {args.steps}-step image (DeepCache: {whole} whole calls, {shallow_calls} shallow):\n")
    print("| | seconds | speed-up |")
    print("|---|---|---|")
    for name, seconds in per_image.items():
        print(f"| {name} | {seconds:.1f} | {per_image['plain'] / seconds:.2f}x |")


if __name__ == "__main__":
    main()
