"""What the NaN/inf checks cost: generate() as it is (every model output and every step checked, sd.pipeline.FiniteCheck)
against the same call with the check replaced by a no-op, interleaved in one process, medians and their ratio.

Each check is one reduction over a tensor the model just made (torch.isfinite(x).all()), so its cost should vanish
next to the model. The embedded model at 64x64 is the hardest case (small models, so the checks weigh the most);
--checkpoint and --size for the real one.
Run: python benchmarks/finite_check_overhead.py [--checkpoint PATH] [--size 512] [--steps 20] [--repeats 7]
"""

import argparse
import statistics
import time

import torch

import sd.pipeline
from sd.cli import EMBEDDED_CHECKPOINT
from sd.model_loader import preload_models_from_standard_weights
from sd.pipeline import FiniteCheck, generate


class NoCheck(FiniteCheck):
    def __call__(self, x, where):
        return x


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(EMBEDDED_CHECKPOINT))
    parser.add_argument("--size", type=int, default=None, help="image size (default: the checkpoint's)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    models = preload_models_from_standard_weights(args.checkpoint)
    common = dict(prompt="a red circle on a blue background", models=models, seed=0, n_inference_steps=args.steps,
                  sampler_name="dpmpp_2m_karras", height=args.size, width=args.size, progress=False)

    def checked():
        sd.pipeline.FiniteCheck = FiniteCheck
        return generate(**common)

    def unchecked():
        sd.pipeline.FiniteCheck = NoCheck
        try:
            return generate(**common)
        finally:
            sd.pipeline.FiniteCheck = FiniteCheck

    assert (checked() == unchecked()).all()  # the same image: the check only looks
    times = {"checked": [], "unchecked": []}
    for _ in range(args.repeats):  # interleaved, so load on the machine hits both alike
        times["checked"].append(timed(checked))
        times["unchecked"].append(timed(unchecked))
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"{args.checkpoint}, {args.size or 'default size'}, {args.steps} steps, median of {args.repeats}, "
          f"{torch.get_num_threads()} threads")
    print("| run | seconds (median) | ratio |\n|---|---|---|")
    for name in ("unchecked", "checked"):
        print(f"| {name} | {median[name]:.3f} | {median[name] / median['unchecked']:.3f} |")


if __name__ == "__main__":
    main()
