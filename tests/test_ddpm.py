"""DDPMSampler against diffusers' DDPMScheduler with SD 1.5's config, and analytic checks of the schedule."""

import pytest
import torch

from sd.ddpm import DDPMSampler
from sd.schedule import leading_timesteps, make_alphas_cumprod, make_betas, start_step

SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      steps_offset=1, clip_sample=False, set_alpha_to_one=False)


def diffusers_ddpm(n_steps: int):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(SD15_SCHEDULER)
    scheduler.set_timesteps(n_steps)
    return scheduler


def fake_model(x: torch.Tensor, t: int) -> torch.Tensor:
    """A deterministic stand-in for the UNet: smooth in x and t."""
    return torch.tanh(x) * (t / 1000) + 0.1 * torch.sin(x * 3 + t)


def test_schedule_matches_diffusers():
    ref = diffusers_ddpm(50)
    assert torch.equal(make_betas(), ref.betas)
    assert torch.equal(make_alphas_cumprod(make_betas()), ref.alphas_cumprod)
    for n in (1, 7, 20, 50, 500, 999):
        assert torch.equal(leading_timesteps(n), diffusers_ddpm(n).timesteps), n
    assert leading_timesteps(50)[[0, 1, -1]].tolist() == [981, 961, 1]
    # diffusers' 1000 steps start at t = 1000, one past its 1000 training steps (its step then fails); ours refuse
    assert diffusers_ddpm(1000).timesteps[0] == 1000
    with pytest.raises(ValueError, match="from 1 to 999"):
        leading_timesteps(1000)


@pytest.mark.parametrize("n_steps", [10, 50])
def test_variances_match_diffusers(n_steps):
    ours, ref = DDPMSampler(), diffusers_ddpm(n_steps)
    ours.set_inference_timesteps(n_steps)
    for t in ours.timesteps.tolist():
        assert abs(ours._get_variance(t).item() - ref._get_variance(t).item()) <= 1e-6 * ref._get_variance(t).item()


@pytest.mark.parametrize("n_steps,strength", [(50, 1.0), (20, 1.0), (50, 0.8), (25, 0.3)])
def test_full_run_matches_diffusers_step_by_step(n_steps, strength):
    shape = (2, 4, 8, 6)
    ours = DDPMSampler(torch.Generator().manual_seed(0))
    ours.set_inference_timesteps(n_steps)
    ours.set_strength(strength)
    ref = diffusers_ddpm(n_steps)
    ref_timesteps = ref.timesteps[start_step(n_steps, strength):]
    ref_gen = torch.Generator().manual_seed(0)
    assert torch.equal(ours.timesteps, ref_timesteps)

    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    x = ours.add_noise(x0, ours.timesteps[0], noise)
    y = ref.add_noise(x0, noise, ref_timesteps[:1])
    assert torch.allclose(x, y, rtol=0, atol=1e-6)
    for i, t in enumerate(ours.timesteps.tolist()):
        x = ours.step(i, x, fake_model)
        y = ref.step(fake_model(y, t), t, y, generator=ref_gen).prev_sample
        assert (x - y).abs().max() <= 1e-6 * y.abs().max(), f"step t={t}"


def test_oracle_model_recovers_the_clean_sample():
    """If the model predicts exactly the noise that is in x_t, every step's x̂_0 is the clean sample, and the
    last step (ᾱ_prev = 1) returns it: eq. (7) with the true x_0."""
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    sampler = DDPMSampler(torch.Generator().manual_seed(4))
    sampler.set_inference_timesteps(20)
    x = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    def oracle(x, t):  # the noise x_t contains, given x_0
        a = sampler.alphas_cumprod[t]
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    for i, t in enumerate(sampler.timesteps.tolist()):
        assert torch.allclose(sampler.predict_original(t, x, oracle(x, t)), x0, atol=1e-4)
        x = sampler.step(i, x, oracle)
    assert torch.allclose(x, x0, atol=1e-4)


def test_add_noise_follows_q_of_x_t_given_x_0():
    sampler = DDPMSampler(torch.Generator().manual_seed(0))
    x0 = torch.full((20000, 1), 2.0)
    xt = sampler.add_noise(x0, 500)
    a = sampler.alphas_cumprod[500]
    assert abs(xt.mean().item() - 2 * a.sqrt().item()) < 0.02
    assert abs(xt.std().item() - (1 - a).sqrt().item()) < 0.02
    per_sample = sampler.add_noise(torch.ones(2, 3), torch.tensor([0, 999]), torch.zeros(2, 3))
    assert torch.allclose(per_sample[:, 0], sampler.alphas_cumprod[[0, 999]].sqrt())
    before = x0.clone()
    sampler.add_noise(x0, 10)
    assert torch.equal(x0, before)


def test_same_generator_seed_same_steps():
    outs = []
    for _ in range(2):
        s = DDPMSampler(torch.Generator().manual_seed(9))
        s.set_inference_timesteps(5)
        x = torch.zeros(1, 4, 4, 4)
        for i in range(5):
            x = s.step(i, x, lambda x, t: torch.zeros_like(x))
        outs.append(x)
    assert torch.equal(*outs) and outs[0].abs().sum() > 0


@pytest.mark.parametrize("bad", [0, -1, 1001, 2.5, True, "50"])
def test_bad_step_counts(bad):
    with pytest.raises(ValueError, match="n_inference_steps"):
        leading_timesteps(bad)


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, "0.5", None])
def test_bad_strengths(bad):
    with pytest.raises(ValueError, match="strength"):
        start_step(50, bad)
