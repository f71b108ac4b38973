"""DPM-Solver++(2M): a second-order multistep solver of the probability-flow ODE, in the data-prediction form.

No tutorial counterpart (the tutorial has DDPM only). Original: k-diffusion `sampling.py` (sample_dpmpp_2m);
diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2, final σ 0), which this matches with SD 1.5's config.
Reference: Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", Alg. 2.
"""

import torch

from ..ddpm import NoiseModel
from ..schedule import N_TRAINING_STEPS, check_n_inference_steps, karras_sigmas, sigma_to_timestep
from .base import SigmaSampler


def dpm_solver_timesteps(n_inference_steps: int, n_training_steps: int = N_TRAINING_STEPS) -> torch.Tensor:
    """diffusers' own "linspace" for this scheduler: n + 1 points over [0, n_training - 1], rounded to integers,
    noisiest first, the last (t = 0) dropped: 10 steps -> 999, 899, ..., 100. int64 (n,). At most n_training - 1
    steps: with more, two rounded timesteps coincide, a step of length h = 0 divides by zero (diffusers: NaN)."""
    check_n_inference_steps(n_inference_steps, n_training_steps - 1)
    points = torch.arange(n_inference_steps + 1, dtype=torch.float64) * ((n_training_steps - 1) / n_inference_steps)
    return points.round().long().flip(0)[:-1]  # as numpy's linspace computes it: i * step; rounds half to even


class DPMSolverPP2MSampler(SigmaSampler):
    """The state x is diffusers' VP sample x_σ / sqrt(σ² + 1), so init_noise_sigma is 1 and the UNet gets x as is;
    each step works on x_σ = x0 + σ ε. History: prev_denoised, D(x; σ) of the previous step (None before)."""

    prev_denoised: torch.Tensor | None = None

    @property
    def max_inference_steps(self) -> int:
        return self.n_training_steps if self.karras else self.n_training_steps - 1  # see dpm_solver_timesteps

    def set_inference_timesteps(self, n_inference_steps: int = 50) -> None:
        self.n_inference_steps = n_inference_steps
        if self.karras:  # Karras eq. 5 between the training σ_min and σ_max (not the inference ones, as Euler)
            sigmas = karras_sigmas(self.all_sigmas[0].item(), self.all_sigmas[-1].item(), n_inference_steps)
            timesteps = sigma_to_timestep(sigmas, self.all_sigmas).round()  # diffusers rounds; σ stays unrounded
        else:
            timesteps = dpm_solver_timesteps(n_inference_steps, self.n_training_steps)
            sigmas = self.all_sigmas[timesteps].double()  # integer timesteps: the training σ themselves
        # Rounded Karras timesteps can repeat (50 steps: ..., 1, 1, 0); diffusers keeps both, and so do we.
        self.timesteps = timesteps.float()
        self.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).float()  # (n + 1,): ends at σ = 0

    @property
    def init_noise_sigma(self) -> float:
        return 1.0  # pure noise in the VP form: x_σ / sqrt(σ_max² + 1) ≈ N(0, I)

    def noised(self, original_samples: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """(x_0 + σ ε) / sqrt(σ² + 1) = sqrt(ᾱ) x_0 + sqrt(1 - ᾱ) ε: the base's x_σ in this sampler's VP form."""
        x_sigma = super().noised(original_samples, sigma, noise)
        sigma = sigma.to(x_sigma.device, x_sigma.dtype).view(-1, *([1] * (x_sigma.dim() - 1)))
        return x_sigma / (sigma**2 + 1) ** 0.5

    def step(self, i: int, x: torch.Tensor, model: NoiseModel) -> torch.Tensor:
        sigma, sigma_next = self.sigmas[i].double(), self.sigmas[i + 1].double()
        x_sigma = x * (sigma**2 + 1) ** 0.5
        denoised = self.denoise(model, x_sigma, sigma.float(), self.timesteps[i])
        h = sigma.log() - sigma_next.log()  # h = t_next - t with t = -log σ (λ in the paper); inf at σ_next = 0
        # First order on the first step (no history) and on the last, to σ = 0 (diffusers: final_sigmas_type "zero",
        # lower_order_final). diffusers' extra lower-order second-to-last step for < 15 steps applies to order 3 only.
        if i == 0 or sigma_next == 0:
            d = denoised  # Algorithm 2's first step, DPM-Solver++(1): the same as DDIM
        else:
            r = (self.sigmas[i - 1].double().log() - sigma.log()) / h  # r = h_prev / h
            d = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * self.prev_denoised  # Algorithm 2: D_i
        self.prev_denoised = denoised
        # Algorithm 2's update x_i = (σ_i / σ_{i-1}) x_{i-1} - α_i (e^{-h} - 1) D, its VP σ and α, divided by
        # α_i = 1 / sqrt(σ_i² + 1): in sigma space the ratio is σ_next / σ and the factor α_i goes.
        x_next = (sigma_next / sigma) * x_sigma - torch.expm1(-h) * d
        return (x_next / (sigma_next**2 + 1) ** 0.5).to(x.dtype)
