"""DDIM sampler: the same trained model and forward process as DDPM, with a reverse step that can skip noise.

No tutorial counterpart. Original: diffusers' DDIMScheduler with SD 1.5's config ("leading" timesteps,
steps_offset 1, set_alpha_to_one False), which this matches. Reference: Song et al. 2021, "Denoising
Diffusion Implicit Models", eq. (12) and (16): eta = 0 is deterministic, eta = 1 is DDPM-like.
"""

import torch

from ..checks import is_finite_number
from ..ddpm import DDPMSampler, NoiseModel, randn_like


class DDIMSampler(DDPMSampler):
    def __init__(self, generator: torch.Generator | None = None, eta: float = 0.0, **schedule):
        super().__init__(generator, **schedule)
        if not is_finite_number(eta) or eta < 0:
            raise ValueError(f"eta must be a number >= 0 (0: deterministic DDIM, 1: DDPM-like noise), got {eta!r}")
        self.eta = eta
        # SD's config has set_alpha_to_one False: the step after the last lands on ᾱ_0, not on 1.
        self.final_alpha_cumprod = self.alphas_cumprod[0]

    def _alpha_cumprod(self, timestep: int) -> torch.Tensor:
        return self.alphas_cumprod[timestep] if timestep >= 0 else self.final_alpha_cumprod

    def step(self, i: int, latents: torch.Tensor, model: NoiseModel) -> torch.Tensor:
        """x_prev = sqrt(ᾱ_prev) x̂_0 + sqrt(1 - ᾱ_prev - σ_t²) ε̂ + σ_t z  (eq. 12), σ_t = eta · sqrt(β̃_t) (eq. 16)."""
        t = int(self.timesteps[i])
        eps = model(latents, t)
        alpha_prod_t, alpha_prod_prev = self._alpha_cumprod(t), self._alpha_cumprod(self._get_previous_timestep(t))
        pred_original = self.pred_original = self.predict_original(t, latents, eps)
        variance = (1 - alpha_prod_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_prev)
        std = self.eta * variance**0.5
        x = alpha_prod_prev**0.5 * pred_original + (1 - alpha_prod_prev - std**2) ** 0.5 * eps
        if self.eta > 0:
            x = x + std * randn_like(eps, self.generator)
        return x
