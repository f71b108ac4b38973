"""DDPM sampler: one reverse-diffusion step x_t -> x_{t_prev} from the UNet's noise prediction, and the forward process.

Tutorial part: "DDPM sampler" (hkproj ddpm.py: DDPMSampler).
Original: diffusers' DDPMScheduler with SD 1.5's scheduler config (scaled_linear, steps_offset 1,
clip_sample False, variance "fixed_small"), which our steps match to float precision.
Reference: Ho et al. 2020, "Denoising Diffusion Probabilistic Models", eqs. (4), (6), (7), (15).
"""

from collections.abc import Callable

import torch

from .schedule import (
    BETA_END, BETA_START, N_TRAINING_STEPS, STEPS_OFFSET, leading_timesteps, make_alphas_cumprod, make_betas,
    start_step,
)

# model(x_in, t) -> ε̂: the UNet with the prompt's context and guidance applied, as the pipeline builds it.
# Every sampler (sd.samplers) calls its model through this one interface.
NoiseModel = Callable[[torch.Tensor, torch.Tensor | int | float], torch.Tensor]


def draw_noise(shape, generator: "torch.Generator | BatchRows | None", dtype: torch.dtype,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """N(0, I) noise of `shape`, drawn on the generator's device (so a CPU seed gives the same numbers whatever
    device the models are on; `device` only without a generator)."""
    if isinstance(generator, BatchRows):
        return generator.randn(shape, dtype)
    return torch.randn(shape, generator=generator, dtype=dtype, device=generator.device if generator else device)


def randn_like(x: torch.Tensor, generator: "torch.Generator | BatchRows | None") -> torch.Tensor:
    """N(0, I) noise of x's shape and dtype (draw_noise), moved to x's device."""
    return draw_noise(x.shape, generator, x.dtype, x.device).to(x.device)


class BatchRows:
    """A generator for some rows of a batch: each draw is made for the whole batch of `total` images, as one process
    would make it, and only `rows` of it are kept. So the process of a torchrun run that makes images 1 and 3 of 4
    draws exactly their noise (sd generate under torchrun). Every draw must be one row per image."""

    def __init__(self, generator: torch.Generator, rows: list[int], total: int):
        self.generator, self.rows, self.total = generator, list(rows), total

    @property
    def device(self) -> torch.device:
        return self.generator.device

    def randn(self, shape, dtype: torch.dtype) -> torch.Tensor:
        if shape[0] != len(self.rows):
            raise RuntimeError(f"a draw of {shape[0]} rows for a share of {len(self.rows)} images: BatchRows takes only "
                               f"draws of one row per image")
        full = torch.randn((self.total, *shape[1:]), generator=self.generator, dtype=dtype, device=self.device)
        return full[self.rows]


class DDPMSampler:
    """Holds the schedule and the timesteps to visit; a step depends only on its arguments and the generator.

    step(i, latents, model) runs step i (timestep self.timesteps[i]); `model(x_t, t)` predicts the noise.
    (The tutorial's step takes the timestep and the model's output; here the sampler calls the model itself,
    so that all samplers, Heun's two evaluations per step included, share one interface.)
    """

    init_noise_sigma = 1.0  # the starting latents are N(0, I)
    pred_original: torch.Tensor | None = None  # x̂_0 of the last step (eq. 15), for callbacks

    def __init__(self, generator: torch.Generator | None = None, n_training_steps: int = N_TRAINING_STEPS,
                 beta_start: float = BETA_START, beta_end: float = BETA_END):
        self.generator = generator
        self.n_training_steps = n_training_steps
        self.betas = make_betas(n_training_steps, beta_start, beta_end)
        self.alphas_cumprod = make_alphas_cumprod(self.betas)
        self.set_inference_timesteps(50)

    @property
    def max_inference_steps(self) -> int:
        """"leading" timesteps end at steps_offset: 999 steps visit 999 .. 1, 1000 would start at t = 1000."""
        return self.n_training_steps - STEPS_OFFSET

    def set_inference_timesteps(self, n_inference_steps: int = 50) -> None:
        self.n_inference_steps = n_inference_steps
        self.timesteps = leading_timesteps(n_inference_steps, self.n_training_steps)

    def set_strength(self, strength: float = 1.0) -> None:
        """Image-to-image: start from a partly noised image, skipping the noisiest steps."""
        self.timesteps = self.timesteps[start_step(self.n_inference_steps, strength):]

    def _get_previous_timestep(self, timestep: int) -> int:
        return timestep - self.n_training_steps // self.n_inference_steps

    def _alpha_cumprod(self, timestep: int) -> torch.Tensor:
        # Before the first training step (t < 0) nothing has been noised: ᾱ = 1.
        return self.alphas_cumprod[timestep] if timestep >= 0 else torch.tensor(1.0)

    def _get_variance(self, timestep: int) -> torch.Tensor:
        """β̃_t = (1 - ᾱ_prev) / (1 - ᾱ_t) · β_t, the variance of q(x_prev | x_t, x_0) (eq. 7)."""
        alpha_prod_t = self._alpha_cumprod(timestep)
        alpha_prod_prev = self._alpha_cumprod(self._get_previous_timestep(timestep))
        current_beta_t = 1 - alpha_prod_t / alpha_prod_prev
        return torch.clamp((1 - alpha_prod_prev) / (1 - alpha_prod_t) * current_beta_t, min=1e-20)

    def predict_original(self, timestep: int, latents: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """x̂_0 = (x_t - sqrt(1 - ᾱ_t) ε̂) / sqrt(ᾱ_t): the clean latents the noise prediction implies (eq. 15)."""
        alpha_prod_t = self._alpha_cumprod(timestep)
        return (latents - (1 - alpha_prod_t) ** 0.5 * model_output) / alpha_prod_t**0.5

    def step(self, i: int, latents: torch.Tensor, model: NoiseModel) -> torch.Tensor:
        """x_{t_prev} ~ N(μ̃(x_t, x̂_0), β̃_t I): the posterior mean of eq. (7) plus noise (none at t = 0)."""
        t = int(self.timesteps[i])
        model_output = model(latents, t)
        prev_t = self._get_previous_timestep(t)
        alpha_prod_t, alpha_prod_prev = self._alpha_cumprod(t), self._alpha_cumprod(prev_t)
        beta_prod_t, beta_prod_prev = 1 - alpha_prod_t, 1 - alpha_prod_prev
        current_alpha_t = alpha_prod_t / alpha_prod_prev
        current_beta_t = 1 - current_alpha_t

        pred_original = self.pred_original = self.predict_original(t, latents, model_output)
        # μ̃_t = sqrt(ᾱ_prev) β_t / (1 - ᾱ_t) · x̂_0 + sqrt(α_t) (1 - ᾱ_prev) / (1 - ᾱ_t) · x_t
        mean = (alpha_prod_prev**0.5 * current_beta_t / beta_prod_t) * pred_original \
            + (current_alpha_t**0.5 * beta_prod_prev / beta_prod_t) * latents
        if t > 0:
            mean = mean + self._get_variance(t) ** 0.5 * randn_like(model_output, self.generator)
        return mean

    def noise_to_step(self, original_samples: torch.Tensor, i: int, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_0 noised to the level where step i starts (i = len(timesteps): the clean sample itself)."""
        if i == len(self.timesteps):
            return original_samples
        return self.add_noise(original_samples, self.timesteps[i], noise)

    def add_noise(self, original_samples: torch.Tensor, timesteps: torch.Tensor | int,
                  noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε (eq. 4), with ε drawn from the generator unless given.
        timesteps: one for all samples, or one per sample."""
        if noise is None:
            noise = randn_like(original_samples, self.generator)
        noise = noise.to(original_samples.device)
        t = torch.as_tensor(timesteps, device=self.alphas_cumprod.device).reshape(-1)
        alpha_prod = self.alphas_cumprod[t].to(original_samples.device, original_samples.dtype)
        alpha_prod = alpha_prod.view(-1, *([1] * (original_samples.dim() - 1)))  # (B or 1, 1, 1, 1)
        return alpha_prod**0.5 * original_samples + (1 - alpha_prod) ** 0.5 * noise
