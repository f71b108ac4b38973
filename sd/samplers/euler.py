"""Euler and Euler-ancestral samplers: the probability-flow ODE (and its SDE) stepped with Euler's method in sigma space.

No tutorial counterpart (the tutorial has DDPM only). Original: k-diffusion `sampling.py` (sample_euler,
sample_euler_ancestral, get_ancestral_step); diffusers' EulerDiscreteScheduler / EulerAncestralDiscreteScheduler,
which these match. Reference: Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models", Algorithm 1 (Euler steps of dx/dσ = (x - D(x; σ)) / σ).
"""

import torch

from ..ddpm import NoiseModel, randn_like
from .base import SigmaSampler


class EulerSampler(SigmaSampler):
    def step(self, i: int, x: torch.Tensor, model: NoiseModel) -> torch.Tensor:
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        denoised = self.denoise(model, x, sigma, self.timesteps[i])
        d = (x - denoised) / sigma  # dx/dσ of the probability-flow ODE
        return x + d * (sigma_next - sigma)


def ancestral_sigmas(sigma: torch.Tensor, sigma_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a step σ -> σ_next into a deterministic step down to σ_down and fresh noise of σ_up, such that
    σ_down² + σ_up² = σ_next² (k-diffusion get_ancestral_step, eta = 1)."""
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


class EulerAncestralSampler(SigmaSampler):
    """Each step goes a little below the next level, then adds fresh noise back up to it: more varied
    results, and the image keeps changing as steps are added (it does not converge)."""

    def step(self, i: int, x: torch.Tensor, model: NoiseModel) -> torch.Tensor:
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        denoised = self.denoise(model, x, sigma, self.timesteps[i])
        sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next)
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        # diffusers draws this noise at every step, the last one (σ_up = 0) too: drawing it keeps seeds in step.
        return x + randn_like(x, self.generator) * sigma_up
