"""Heun sampler: the probability-flow ODE stepped with Heun's 2nd-order method (an Euler predictor, then a trapezoidal corrector) in sigma space.

No tutorial counterpart (the tutorial has DDPM only). Original: k-diffusion `sampling.py` (sample_heun, s_churn = 0);
diffusers' HeunDiscreteScheduler, which this matches. Reference: Karras et al. 2022, "Elucidating the Design Space
of Diffusion-Based Generative Models", Algorithm 1 (deterministic sampling with Heun's 2nd-order method).
"""

import torch

from ..ddpm import NoiseModel
from .base import SigmaSampler


class HeunSampler(SigmaSampler):
    """Two model evaluations per step (at σ_i and at σ_{i+1}), except the last step down to σ = 0, which is a plain
    Euler step (Algorithm 1, line 7: the corrector would divide by σ_{i+1} = 0). So n steps cost 2n - 1 evaluations.

    diffusers does the same with a state machine over a timestep list that repeats each inner timestep
    (t_0, t_1, t_1, t_2, t_2, ...); here both evaluations of a step happen inside one call, with no stored state.
    """

    def step(self, i: int, x: torch.Tensor, model: NoiseModel) -> torch.Tensor:
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        d = (x - self.denoise(model, x, sigma, self.timesteps[i])) / sigma  # Algorithm 1, line 4: d_i = (x_i - D(x_i; σ_i)) / σ_i
        x_next = x + d * (sigma_next - sigma)                                # line 5: Euler predictor to σ_{i+1}
        if sigma_next == 0:
            return x_next                                                    # last step: Euler only
        d_next = (x_next - self.denoise(model, x_next, sigma_next, self.timesteps[i + 1])) / sigma_next  # line 7: d'_i
        return x + (d + d_next) / 2 * (sigma_next - sigma)                   # line 8: x_{i+1} = x_i + (σ_{i+1} - σ_i)(d_i + d'_i) / 2
