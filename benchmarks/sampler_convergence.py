"""How close each sampler gets, in 10, 20 and 50 steps, to a 500-step DDIM solution of the same start (not run in CI).

The model is a tiny random SD-shaped UNet (tests/reference.py) with a fixed text context and classifier-free
guidance, so the vector field is that of a real pipeline run, only small. Every sampler starts from the same
N(0, I) draw (scaled by its init_noise_sigma) and the error is ||x - x_ref|| / ||x_ref|| over the final latents.
Deterministic samplers converge towards the probability-flow ODE's solution, which 500 DDIM steps approximate;
the stochastic ones (ddpm, euler_a) sample a different path by design, so their error does not shrink.
Run: python benchmarks/sampler_convergence.py [--seed 0] [--cfg 7.5]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import random_models, tiny_configs  # noqa: E402

from sd.samplers import SAMPLERS, make_sampler  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--size", type=int, default=16, help="latent height and width")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50])
    args = parser.parse_args()
    torch.set_num_threads(2)

    configs = tiny_configs()
    unet = random_models(configs, seed=args.seed)["diffusion"]
    g = torch.Generator().manual_seed(args.seed)
    cfg = configs["diffusion"]
    context = torch.randn(2, 77, cfg.d_context, generator=g)  # unconditional, conditional
    start = torch.randn(1, cfg.out_channels, args.size, args.size, generator=g)
    evaluations = 0

    @torch.no_grad()
    def noise_model(x, t):
        nonlocal evaluations
        evaluations += 1
        uncond, cond = unet(torch.cat([x, x]), context, t).chunk(2)
        return uncond + args.cfg * (cond - uncond)

    def run(name: str, n: int, to_clean: bool = False) -> tuple[torch.Tensor, int, float]:
        nonlocal evaluations
        evaluations = 0
        sampler = make_sampler(name, torch.Generator().manual_seed(args.seed + 1), n)
        if to_clean:
            # SD's config stops DDIM at ᾱ_0 (σ = 0.029, set_alpha_to_one False); the sigma-space samplers end at
            # σ = 0. The reference goes all the way, so that it measures their error rather than that offset.
            sampler.final_alpha_cumprod = torch.tensor(1.0)
        x = start * sampler.init_noise_sigma
        t0 = time.perf_counter()
        for i in range(len(sampler.timesteps)):
            x = sampler.step(i, x, noise_model)
        return x, evaluations, time.perf_counter() - t0

    reference, ref_nfe, ref_time = run("ddim", 500, to_clean=True)
    print(f"reference: ddim (eta 0, ending at ᾱ = 1), 500 steps ({ref_nfe} model evaluations, {ref_time:.1f} s); tiny UNet, latent "
          f"{args.size}x{args.size}, cfg {args.cfg}, seed {args.seed}\n")
    header = "| sampler | " + " | ".join(f"{n} steps: error (NFE)" for n in args.steps) + " |"
    print(header)
    print("|---|" + "---|" * len(args.steps))
    for name in SAMPLERS:
        cells = []
        for n in args.steps:
            x, nfe, _ = run(name, n)
            error = ((x - reference).norm() / reference.norm()).item()
            cells.append(f"{error:.2e} ({nfe})")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
