"""The sigma-space base that the k-diffusion samplers (Euler, Heun, LMS, DPM++) share.

Tutorial part: "DDPM sampler" generalised (the tutorial has DDPM only). A sampler's step gets its index i and
the model as a function model(x_in, t) -> predicted noise; it scales the model input and chooses the timestep
itself, and may call the model more than once (Heun). After each step, `sampler.pred_original` holds x̂_0.
References: Karras et al. 2022 (EDM, sigma space); Crowson, k-diffusion `sampling.py` (the samplers' form).
"""

import torch

from ..ddpm import NoiseModel, randn_like
from ..schedule import (
    BETA_END, BETA_START, N_TRAINING_STEPS, interpolate_sigmas, karras_sigmas, linspace_timesteps, make_alphas_cumprod,
    make_betas, sigma_to_timestep, sigmas_from_alphas_cumprod, start_step,
)


class SigmaSampler:
    """Base of the samplers written in sigma space (k-diffusion's form): x = x_0 + σ ε.

    sigmas: the noise level at the start of each step, then the final 0; timesteps: the UNet timestep of each σ.
    The UNet was trained on x_t = sqrt(ᾱ) x_0 + sqrt(1 - ᾱ) ε = x_σ / sqrt(σ² + 1), so its input is scaled so.
    """

    pred_original: torch.Tensor | None = None  # x̂_0 = D(x; σ) of the last model evaluation

    def __init__(self, generator: torch.Generator | None = None, karras: bool = False,
                 n_training_steps: int = N_TRAINING_STEPS, beta_start: float = BETA_START, beta_end: float = BETA_END):
        self.generator = generator
        self.karras = karras
        self.n_training_steps = n_training_steps
        self.all_sigmas = sigmas_from_alphas_cumprod(make_alphas_cumprod(make_betas(n_training_steps, beta_start, beta_end)))

    @property
    def max_inference_steps(self) -> int:
        """Fractional timesteps over [0, n_training_steps - 1]: any count up to one per training step."""
        return self.n_training_steps

    def set_inference_timesteps(self, n_inference_steps: int = 50) -> None:
        self.n_inference_steps = n_inference_steps
        timesteps = linspace_timesteps(n_inference_steps, self.n_training_steps)
        sigmas = interpolate_sigmas(timesteps, self.all_sigmas)
        if self.karras:
            sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), n_inference_steps)
            timesteps = sigma_to_timestep(sigmas, self.all_sigmas)
        self.timesteps = timesteps.float()
        self.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).float()  # (n + 1,): ends at σ = 0, the clean image

    def set_strength(self, strength: float = 1.0) -> None:
        """Image-to-image: skip the noisiest steps."""
        start = start_step(self.n_inference_steps, strength)
        self.timesteps, self.sigmas = self.timesteps[start:], self.sigmas[start:]

    @property
    def init_noise_sigma(self) -> float:
        """Pure noise at the first level: N(0, σ_max² I) (diffusers' convention for "linspace" spacing)."""
        return self.sigmas.max().item()

    def noised(self, original_samples: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The sampler's state at noise level σ (one per sample, or one for all): x = x_0 + σ ε."""
        sigma = sigma.to(original_samples.device, original_samples.dtype).view(-1, *([1] * (original_samples.dim() - 1)))
        return original_samples + sigma * noise.to(original_samples.device)

    def noise_to_step(self, original_samples: torch.Tensor, i: int, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_0 noised to the level where step i starts (i = len(timesteps): the end, σ = 0)."""
        noise = randn_like(original_samples, self.generator) if noise is None else noise
        return self.noised(original_samples, self.sigmas[i], noise)

    def add_noise(self, original_samples: torch.Tensor, timesteps: torch.Tensor | float,
                  noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_0 noised to the level of the given timestep(s) of this schedule (the first step with that timestep)."""
        noise = randn_like(original_samples, self.generator) if noise is None else noise
        index = [(self.timesteps == t).nonzero()[0, 0].item() for t in torch.as_tensor(timesteps).reshape(-1).tolist()]
        return self.noised(original_samples, self.sigmas[index], noise)

    def denoise(self, model: NoiseModel, x: torch.Tensor, sigma: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """D(x; σ) = x - σ ε̂(x / sqrt(σ² + 1), t): the clean sample the model predicts (Karras et al. eq. 2)."""
        eps = model(x / (sigma**2 + 1) ** 0.5, t)
        self.pred_original = x - sigma * eps
        return self.pred_original

    def step(self, i: int, x: torch.Tensor, model: NoiseModel) -> torch.Tensor:
        raise NotImplementedError
