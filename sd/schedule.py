"""The noise schedule of SD 1.x as pure functions: betas, cumulative alphas, and which timesteps a sampler visits.

Tutorial part: "DDPM sampler" (hkproj ddpm.py: DDPMSampler.__init__, set_inference_timesteps, set_strength).
Original: configs/stable-diffusion/v1-inference.yaml (linear_start 0.00085, linear_end 0.0120, timesteps 1000,
schedule "linear" in ldm, which squares a linspace of square roots: diffusers calls it "scaled_linear").
Reference: Ho et al. 2020, "Denoising Diffusion Probabilistic Models", eq. (4): q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I).
"""

import math

import torch

from .checks import is_finite_number, is_int

N_TRAINING_STEPS = 1000  # v1-inference.yaml: timesteps
BETA_START = 0.00085     # v1-inference.yaml: linear_start
BETA_END = 0.0120        # v1-inference.yaml: linear_end
STEPS_OFFSET = 1         # SD 1.5's scheduler_config.json: steps_offset, so the last step is t=1, not t=0


def make_betas(n_training_steps: int = N_TRAINING_STEPS, beta_start: float = BETA_START, beta_end: float = BETA_END) -> torch.Tensor:
    """β_t for t = 0 .. n-1: linear in sqrt(β) from sqrt(beta_start) to sqrt(beta_end), squared. float32 (n,)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, n_training_steps, dtype=torch.float32) ** 2


def make_alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """ᾱ_t = prod_{s<=t} (1 - β_s): how much of the clean signal is left at step t."""
    return torch.cumprod(1.0 - betas, dim=0)


def check_n_inference_steps(n_inference_steps, max_steps: int = N_TRAINING_STEPS, sampler: str | None = None) -> None:
    """1 to max_steps: the most steps whose timesteps are distinct and inside the training schedule."""
    if not is_int(n_inference_steps) or not 0 < n_inference_steps <= max_steps:
        which = f" for the {sampler} sampler" if sampler else ""
        raise ValueError(f"n_inference_steps must be an integer from 1 to {max_steps}{which}, got {n_inference_steps!r}")


def leading_timesteps(n_inference_steps: int, n_training_steps: int = N_TRAINING_STEPS, steps_offset: int = STEPS_OFFSET) -> torch.Tensor:
    """The timesteps to visit, noisiest first, evenly spaced from the start ("leading" spacing, as diffusers
    uses for SD 1.5): 50 steps -> 981, 961, ..., 21, 1. int64 (n_inference_steps,). At most n_training_steps -
    steps_offset steps: with n_training_steps of them the first would be t = 1000, past the schedule."""
    check_n_inference_steps(n_inference_steps, n_training_steps - steps_offset)
    step_ratio = n_training_steps // n_inference_steps
    return torch.arange(n_inference_steps - 1, -1, -1, dtype=torch.int64) * step_ratio + steps_offset


def start_step(n_inference_steps: int, strength: float) -> int:
    """Image-to-image: how many of the first (noisiest) steps to skip. strength 1 skips none (pure noise);
    strength 0.5 starts half-way. As diffusers: int(n * strength) steps are run, and at least one must be."""
    if not is_finite_number(strength) or not 0 < strength <= 1:
        raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
    run = min(int(n_inference_steps * strength), n_inference_steps)
    if run < 1:
        fewest = fewest_steps(strength)
        more = f"give at least {fewest} steps or " if fewest <= N_TRAINING_STEPS else ""
        raise ValueError(f"strength {strength} of {n_inference_steps} steps runs int({n_inference_steps} x {strength}) = "
                         f"0 steps; {more}give a strength of at least {math.ceil(1e4 / n_inference_steps) / 1e4:g}")
    return n_inference_steps - run


def fewest_steps(strength: float) -> int:
    """The smallest n with int(n x strength) >= 1 (N_TRAINING_STEPS + 1 when it is more than that)."""
    if strength * N_TRAINING_STEPS < 1:
        return N_TRAINING_STEPS + 1
    n = max(1, math.floor(1 / strength))
    while int(n * strength) < 1:  # floating point: 1 / strength may land just below the count that works
        n += 1
    return n


# --- sigma space (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models") ---
# The same process written as x = x_0 + σ ε with σ_t = sqrt((1 - ᾱ_t) / ᾱ_t); x_σ = x_t / sqrt(ᾱ_t).


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """σ_t = sqrt((1 - ᾱ_t) / ᾱ_t) for every training step: 0.029 at t=0 up to 14.6 at t=999."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """n noise levels from sigma_max down to sigma_min, spaced evenly in σ^(1/ρ) (Karras et al. eq. 5): more of the
    steps go to low noise, where detail is made. float64 (n,)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def sigma_to_timestep(sigma: torch.Tensor, all_sigmas: torch.Tensor) -> torch.Tensor:
    """The (fractional) training timestep of each σ, interpolating linearly in log σ between the two training
    steps around it, so the UNet can be told where a Karras σ lies. (n,) -> (n,) float64."""
    log_sigmas = all_sigmas.log().double()  # increasing in t; log taken in float32, as diffusers' np.log
    log_sigma = sigma.double().clamp(min=1e-10).log()
    low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, len(log_sigmas) - 2)
    w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
    return low + w


def linspace_timesteps(n_inference_steps: int, n_training_steps: int = N_TRAINING_STEPS) -> torch.Tensor:
    """Timesteps spread evenly over [0, n_training_steps - 1], noisiest first, fractional ("linspace" spacing:
    what diffusers' sigma-space schedulers use with SD 1.5's config). float64 (n_inference_steps,)."""
    check_n_inference_steps(n_inference_steps, n_training_steps)
    return torch.linspace(0, n_training_steps - 1, n_inference_steps, dtype=torch.float64).flip(0)


def interpolate_sigmas(timesteps: torch.Tensor, all_sigmas: torch.Tensor) -> torch.Tensor:
    """σ at (fractional) timesteps, linear between the training steps around each. float64."""
    t = timesteps.double()
    low = t.floor().long().clamp(0, len(all_sigmas) - 2)
    w = t - low
    s = all_sigmas.double()
    return (1 - w) * s[low] + w * s[low + 1]


def alpha_cumprod_at(timesteps: torch.Tensor | float, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """ᾱ at (fractional) timesteps, as the UNet reads them: log σ linear between the training steps around each
    (the inverse of sigma_to_timestep, so a Karras σ comes back exactly), then ᾱ = 1 / (σ² + 1). float64, t's shape."""
    t = torch.as_tensor(timesteps, dtype=torch.float64).clamp(0, len(alphas_cumprod) - 1)
    low = t.floor().long().clamp(max=len(alphas_cumprod) - 2)
    w = t - low
    log_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod).double().log()
    sigma = ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp()
    return 1 / (sigma**2 + 1)
