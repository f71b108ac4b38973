"""The samplers beyond the tutorial's DDPM, and the registry that builds any of them by name.

Tutorial part: "DDPM sampler" generalised (the tutorial has sd/ddpm.py only). Every sampler has the same small
interface: set_inference_timesteps(n), set_strength(s), noise_to_step(x_0, i, noise), init_noise_sigma,
max_inference_steps, and
step(i, x, model) -> x, where model(x_in, t) -> ε̂ (sd.ddpm.NoiseModel); after each step `pred_original` holds x̂_0.
Classifier-free guidance, image-to-image strength and inpainting blending stay in the pipeline, so every sampler
works with every mode. References: each file names its paper; k-diffusion `sampling.py` for the sigma-space form.
"""

import functools

import torch

from ..ddpm import DDPMSampler
from ..schedule import check_n_inference_steps
from .ddim import DDIMSampler
from .dpm_solver import DPMSolverPP2MSampler
from .euler import EulerAncestralSampler, EulerSampler
from .heun import HeunSampler
from .lms import LMSSampler

# name -> a class, or a class with its options fixed; each is called as factory(generator, **options).
SAMPLERS = {
    "ddpm": DDPMSampler,
    "ddim": DDIMSampler,
    "euler": EulerSampler,
    "euler_karras": functools.partial(EulerSampler, karras=True),
    "euler_a": EulerAncestralSampler,
    "heun": HeunSampler,
    "lms": LMSSampler,
    "dpmpp_2m": DPMSolverPP2MSampler,
    "dpmpp_2m_karras": functools.partial(DPMSolverPP2MSampler, karras=True),
}


def make_sampler(name: str, generator: torch.Generator | None = None, n_inference_steps: int = 50,
                 strength: float | None = None, **options):
    """A fresh sampler by name (see SAMPLERS), with its timesteps set, and for image-to-image cut to `strength`.
    The one place step counts are checked against the sampler's real schedule: at least one step is run, and no
    timestep lies past the training schedule. len(sampler.timesteps) is the number of steps that will run."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
    sampler = SAMPLERS[name](generator, **options)
    check_n_inference_steps(n_inference_steps, sampler.max_inference_steps, name)
    sampler.set_inference_timesteps(n_inference_steps)
    if strength is not None:
        sampler.set_strength(strength)
    return sampler
