"""Every sampler against the diffusers scheduler built from SD 1.5's scheduler config: same timesteps and sigmas,
and the same result over a full run driven by the same deterministic model (text-to-image and image-to-image)."""

import inspect

import pytest
import torch

from sd.samplers import SAMPLERS, make_sampler
from sd.schedule import start_step

# SD 1.5's scheduler_config.json (a PNDMScheduler's); each diffusers scheduler keeps its own defaults for the rest,
# e.g. "leading" timestep spacing for DDPM/DDIM and "linspace" for the sigma-space ones.
SD15_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   steps_offset=1, clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True)

DIFFUSERS = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
}
RTOL = 1e-5


def diffusers_scheduler(name: str, n_steps: int):
    import diffusers

    cls, options = DIFFUSERS[name]
    scheduler = getattr(diffusers, cls).from_config({**SD15_CONFIG, **options})
    scheduler.set_timesteps(n_steps)
    return scheduler


def fake_unet(x: torch.Tensor, t) -> torch.Tensor:
    """A deterministic, smooth stand-in for the UNet's noise prediction (x is the scaled model input)."""
    t = torch.as_tensor(t, dtype=torch.float32)
    return 0.8 * torch.tanh(x) + 0.3 * torch.sin(2 * x + t / 100) + 0.05 * (t / 1000)


def test_every_sampler_is_compared():
    assert set(DIFFUSERS) == set(SAMPLERS)


def run_diffusers(name, n_steps, strength, x0, noise, seed):
    scheduler = diffusers_scheduler(name, n_steps)
    order = scheduler.order
    start = start_step(n_steps, strength)
    timesteps = scheduler.timesteps[start * order:]
    if name == "lms" and start > 0:
        # diffusers' LMS mis-weights its first steps after set_begin_index (it takes the order and nodes from the
        # untrimmed schedule but starts with no history: diffusers issue #5630). Ours restarts the multistep
        # history, as k-diffusion does on the trimmed schedule: compare with diffusers on that schedule.
        scheduler.sigmas, scheduler.timesteps = scheduler.sigmas[start:], timesteps
        scheduler.set_begin_index(0)
    elif hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * order)
    if strength == 1.0:
        x = noise * scheduler.init_noise_sigma
    else:
        x = scheduler.add_noise(x0, noise, timesteps[:1])
    generator = torch.Generator().manual_seed(seed)
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters  # not Heun's or LMS's
    for t in timesteps:
        eps = fake_unet(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(eps, t, x, **({"generator": generator} if takes_generator else {})).prev_sample
    return x, scheduler, timesteps


def run_ours(name, n_steps, strength, x0, noise, seed):
    sampler = make_sampler(name, torch.Generator().manual_seed(seed), n_steps)
    if strength == 1.0:
        x = noise * sampler.init_noise_sigma
    else:
        sampler.set_strength(strength)
        x = sampler.noise_to_step(x0, 0, noise)
    for i in range(len(sampler.timesteps)):
        x = sampler.step(i, x, fake_unet)
    return x, sampler


@pytest.mark.parametrize("n_steps,strength", [(10, 1.0), (20, 1.0), (25, 0.6), (14, 1.0)])
@pytest.mark.parametrize("name", list(DIFFUSERS))
def test_full_run_matches_diffusers(name, n_steps, strength):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 6, 5, generator=g), torch.randn(2, 4, 6, 5, generator=g)
    ours, sampler = run_ours(name, n_steps, strength, x0, noise, seed=1)
    theirs, scheduler, timesteps = run_diffusers(name, n_steps, strength, x0, noise, seed=1)

    unique = timesteps[:: scheduler.order] if scheduler.order > 1 else timesteps  # Heun lists inner timesteps twice
    assert torch.allclose(sampler.timesteps.double(), unique.double(), rtol=0, atol=1e-3), (sampler.timesteps, unique)
    if hasattr(sampler, "sigmas"):
        their_sigmas = scheduler.sigmas if name == "lms" else scheduler.sigmas[start_step(n_steps, strength) * scheduler.order:]
        their_sigmas = torch.cat([their_sigmas[:-1:scheduler.order], their_sigmas[-1:]]) if scheduler.order > 1 else their_sigmas
        assert torch.allclose(sampler.sigmas.double(), their_sigmas.double(), rtol=1e-6, atol=0)
    err = (ours - theirs).abs().max().item()
    assert err <= RTOL * theirs.abs().max().item(), f"{name}: max difference {err:.3g}"


@pytest.mark.parametrize("name", list(DIFFUSERS))
def test_initial_noise_scale_matches_diffusers(name):
    assert make_sampler(name, None, 30).init_noise_sigma == pytest.approx(float(diffusers_scheduler(name, 30).init_noise_sigma), rel=1e-6)


@pytest.mark.parametrize("name", ["euler", "heun", "lms", "dpmpp_2m", "dpmpp_2m_karras", "ddim"])
def test_deterministic_samplers_draw_no_noise(name):
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    sampler = make_sampler(name, g, 8)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1)) * sampler.init_noise_sigma
    for i in range(len(sampler.timesteps)):
        x = sampler.step(i, x, fake_unet)
    assert torch.equal(g.get_state(), state)


@pytest.mark.parametrize("name", list(DIFFUSERS))
def test_oracle_model_lands_on_the_clean_sample(name):
    """With a model that predicts the true noise of x_0 = c, every sampler ends at c: the update rules are exact
    for a perfect denoiser (each step's D(x; σ) is x_0)."""
    c = torch.full((1, 4, 3, 3), 0.7)
    sampler = make_sampler(name, torch.Generator().manual_seed(2), 12)
    acp = sampler.alphas_cumprod if hasattr(sampler, "alphas_cumprod") else None

    def oracle(x_in, t):
        if acp is not None:  # DDPM / DDIM: x_in = sqrt(ᾱ) x_0 + sqrt(1 - ᾱ) ε
            a = acp[int(t)]
            return (x_in - a.sqrt() * c) / (1 - a).sqrt()
        # sigma space: x_in = (c + σ ε) / sqrt(σ² + 1), σ the level of timestep t in the sampler's schedule
        sigma = float(sampler.sigmas[(sampler.timesteps - float(t)).abs().argmin()])
        return (x_in * (sigma**2 + 1) ** 0.5 - c) / sigma

    x = torch.randn(c.shape, generator=torch.Generator().manual_seed(3)) * sampler.init_noise_sigma
    eps_start = oracle(x, sampler.timesteps[0]) if name == "ddim" else None
    for i in range(len(sampler.timesteps)):
        x = sampler.step(i, x, oracle)
        # Every step's prediction of the clean sample (what the pipeline's callback shows) is x_0 itself.
        assert (sampler.pred_original - c).abs().max() < 1e-3, (name, i)
    if name == "ddim":
        # Deterministic DDIM keeps the noise direction fixed and (set_alpha_to_one False) stops at ᾱ_0, not 1.
        a0 = sampler.alphas_cumprod[0]
        expected = a0.sqrt() * c + (1 - a0).sqrt() * eps_start
        assert torch.allclose(x, expected, atol=1e-4)
    else:
        assert (x - c).abs().max() < 1e-3, name


@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler", "euler_karras", "euler_a", "lms"])
def test_pred_original_matches_diffusers(name):
    """sampler.pred_original after each step is diffusers' pred_original_sample of the same step (the schedulers
    whose step output carries it)."""
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(1, 4, 5, 6, generator=g)
    sampler, scheduler = make_sampler(name, torch.Generator().manual_seed(5), 10), diffusers_scheduler(name, 10)
    ours, theirs = noise * sampler.init_noise_sigma, noise * scheduler.init_noise_sigma
    generator = torch.Generator().manual_seed(5)
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    for i, t in enumerate(scheduler.timesteps):
        ours = sampler.step(i, ours, fake_unet)
        out = scheduler.step(fake_unet(scheduler.scale_model_input(theirs, t), t), t, theirs,
                             **({"generator": generator} if takes_generator else {}))
        theirs = out.prev_sample
        scale = out.pred_original_sample.abs().max().item()
        assert (sampler.pred_original - out.pred_original_sample).abs().max().item() <= RTOL * scale, (name, i)


@pytest.mark.parametrize("bad", [-0.5, "1", True, float("nan"), float("inf")])
def test_ddim_eta_is_checked(bad):
    with pytest.raises(ValueError, match="eta must be a number >= 0"):
        make_sampler("ddim", None, 10, eta=bad)


@pytest.mark.parametrize("name", list(DIFFUSERS))
@pytest.mark.parametrize("bad", [0, -1, 1001, 2.5, True])
def test_every_sampler_refuses_bad_step_counts(name, bad):
    """Up to the sampler's real schedule: 999 for ddpm/ddim ("leading" spacing with offset 1 would start at t = 1000)
    and dpmpp_2m (its rounded timesteps would repeat), 1000 for the others."""
    most = 999 if name in ("ddpm", "ddim", "dpmpp_2m") else 1000
    with pytest.raises(ValueError, match=f"n_inference_steps must be an integer from 1 to {most} for the {name} sampler"):
        make_sampler(name, None, bad)


def test_unknown_sampler_lists_the_known_ones():
    with pytest.raises(ValueError, match="known: ddpm, ddim, euler, euler_karras, euler_a, heun, lms, dpmpp_2m, dpmpp_2m_karras"):
        make_sampler("plms")
