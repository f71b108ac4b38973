"""What a hostile new user found (issue 11), on tiny random models: NaN/inf stops the call naming where it appeared,
step counts follow the sampler's real schedule, a failed call leaves the models where they were, and input images of
any mode, bit depth and orientation are normalised once."""

import copy
import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from reference import random_models, tiny_configs
from sd.checks import NonFiniteError
from sd.devices import restored_on_failure
from sd.images import image_to_tensor, mask_to_tensor
from sd.pipeline import generate
from sd.samplers import SAMPLERS, make_sampler

H, W = 16, 24
STEPS = 3


@pytest.fixture(scope="module")
def models():
    return random_models(tiny_configs(), seed=3)


def run(models, **kwargs):
    args = dict(prompt="a cat", models=models, height=H, width=W, n_inference_steps=STEPS, seed=0, progress=False)
    return generate(**{**args, **kwargs})


def poisoned(models, name: str, value=float("nan")):
    """A copy of the models with one weight of models[name] set to value."""
    result = dict(models)
    result[name] = copy.deepcopy(models[name])
    with torch.no_grad():
        next(result[name].parameters()).view(-1)[0] = value
    return result


@pytest.mark.parametrize("name,where", [
    ("clip", r"the text encoder \(models\['clip'\]\) gave NaN or inf"),
    ("diffusion", r"the UNet \(models\['diffusion'\]\) at timestep \d+, on latents as large as [\d.]+, gave NaN"),
    ("decoder", r"the VAE decoder \(models\['decoder'\]\) gave NaN or inf"),
])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_nonfinite_weight_stops_the_call_naming_the_model(models, name, where, value):
    with pytest.raises(NonFiniteError, match=where):
        run(poisoned(models, name, value))


def test_a_nonfinite_encoder_weight_is_named_in_image_to_image(models):
    start = Image.fromarray(np.full((H, W, 3), 128, np.uint8))
    with pytest.raises(NonFiniteError, match=r"the VAE encoder \(models\['encoder'\]\) on input_image"):
        run(poisoned(models, "encoder"), input_image=start, strength=1.0)


def test_a_guidance_fn_returning_nan_is_named(models):
    with pytest.raises(NonFiniteError, match="guidance_fn's loss at timestep"):
        run(models, guidance_fn=lambda images: images.mean() * float("nan"))


def test_an_overflowing_guidance_scale_is_traced_to_its_latents(models):
    """A finite but absurd cfg_scale: the first step's latents are huge, and the next UNet call says so."""
    with pytest.raises(NonFiniteError, match=r"the UNet \(models\['diffusion'\]\) at timestep \d+, on latents as "
                                             r"large as [\d.]+e\+\d\d, gave NaN or inf"):
        run(models, cfg_scale=1e30)


def test_nonfinite_warn_goes_on_with_one_warning(models):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = run(poisoned(models, "diffusion"), nonfinite="warn")
    messages = [str(w.message) for w in caught if "NaN or inf" in str(w.message)]
    assert len(messages) == 1 and "going on" in messages[0]
    assert image.shape == (H, W, 3)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_stays_finite_at_its_most_steps(name):
    """dpmpp_2m at 1000 steps divided by a zero step length; ddpm and ddim indexed t = 1000: now each sampler's
    limit is the most steps its schedule has, and at that limit a step of a smooth model stays finite."""
    sampler = make_sampler(name, torch.Generator().manual_seed(0), 999)
    x = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(1)) * sampler.init_noise_sigma
    for i in range(len(sampler.timesteps)):
        x = sampler.step(i, x, lambda x_in, t: 0.1 * x_in)
    assert torch.isfinite(x).all()
    assert len(set(sampler.timesteps.tolist())) == 999 or name == "dpmpp_2m_karras"  # Karras rounds t, not σ
    limit = sampler.max_inference_steps
    make_sampler(name, None, limit)
    with pytest.raises(ValueError, match=f"from 1 to {limit} for the {name} sampler"):
        make_sampler(name, None, limit + 1)


@pytest.mark.parametrize("strength,steps,run_steps", [(0.8, 2, 1), (0.6, 20, 12), (1.0, 1, 1), (0.05, 20, 1)])
def test_image_to_image_runs_the_steps_its_sampler_says(models, strength, steps, run_steps):
    """int(steps x strength) steps, never 0; the callback sees each one."""
    assert len(make_sampler("euler", None, steps, strength).timesteps) == run_steps
    seen = []
    start = Image.fromarray(np.full((H, W, 3), 200, np.uint8))
    run(models, input_image=start, strength=strength, n_inference_steps=steps, sampler_name="euler",
        callback=lambda i, t, latents, x0: seen.append(i))
    assert seen == list(range(run_steps))


class Placed(torch.nn.Module):
    """A stand-in that records where it is moved (CPU-only machines have one real device)."""

    def __init__(self, device: str):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, device="meta" if device == "meta" else "cpu"))
        self.moves = [device]

    def to(self, device):
        self.moves.append(str(device))
        return self


def test_a_failed_block_moves_every_model_back_where_it_was():
    models = {"clip": Placed("meta"), "diffusion": Placed("meta")}
    with pytest.raises(KeyboardInterrupt), restored_on_failure(models):
        models["clip"].to("cpu")
        models["diffusion"].to("cpu")
        raise KeyboardInterrupt
    assert [m.moves[-1] for m in models.values()] == ["meta", "meta"]


def test_a_failed_call_leaves_the_models_on_their_device_and_usable(models):
    """Refused before any move (device "meta" would have wiped the weights), and a failure half-way (here the
    decoder) leaves every model on the CPU with its weights: the next call works and gives the same image."""
    before = run(models)
    with pytest.raises(ValueError, match="meta"):
        run(models, device="meta")
    with pytest.raises(ValueError, match="meta"):
        run(models, idle_device="meta")
    with pytest.raises(NonFiniteError):
        run(poisoned(models, "decoder"))
    assert all(p.device.type == "cpu" for m in models.values() for p in m.parameters())
    np.testing.assert_array_equal(run(models), before)


def sixteen_bit(array: np.ndarray) -> Image.Image:
    """A 16-bit greyscale PNG, as a scanner or a depth tool writes it, read back by Pillow (mode I;16)."""
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint16)).save(buffer, format="PNG")
    return Image.open(io.BytesIO(buffer.getvalue()))


def test_16_bit_greyscale_images_and_masks_are_scaled_not_clipped():
    ramp = np.tile(np.linspace(0, 65535, W), (H, 1))  # black to white, left to right
    image = sixteen_bit(ramp)
    assert image.mode.startswith("I")
    tensor = image_to_tensor(image, W, H)  # (1, 3, H, W) in [-1, 1]
    expected = torch.from_numpy(ramp / 65535 * 2 - 1).float()
    torch.testing.assert_close(tensor[0, 0], expected, atol=2 / 255, rtol=0)
    mask = mask_to_tensor(image, W, H)
    assert mask.mean().item() == pytest.approx(0.5, abs=0.05)  # white from half-way: not 99.6% white


def test_exif_orientation_is_applied():
    """A phone photo stored sideways with EXIF Orientation 6 (rotate 90° clockwise to view)."""
    stored = np.zeros((W, H, 3), np.uint8)  # stored H x W swapped: (24, 16)
    stored[0, :, 0] = 255  # the stored top row is red: viewed, it is the right column
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="JPEG", exif=exif, quality=100, subsampling=0)
    tensor = image_to_tensor(Image.open(buffer), W, H)
    assert tensor.shape == (1, 3, H, W)
    assert tensor[0, 0, :, -1].mean() > 0.5 and tensor[0, 0, :, 0].mean() < -0.5


def test_a_stretch_that_changes_the_shape_is_reported_and_crop_keeps_it():
    wide = np.zeros((H, 4 * W, 3), np.uint8)
    wide[:, 4 * W // 2 - W // 2:4 * W // 2 + W // 2] = 255  # a white band in the middle, as wide as the output
    with pytest.warns(UserWarning, match=f"input_image is {4 * W}x{H} but the output is {W}x{H}: it is stretched"):
        image_to_tensor(Image.fromarray(wide), W, H)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cropped = image_to_tensor(Image.fromarray(wide), W, H, resize_mode="crop")
    assert cropped.mean() > 0.9  # the centre W x H of the wide image: all white


def test_numpy_numbers_are_numbers(models):
    """np.float32(7.5) was refused as "not a finite number"; numpy's scalars are what array code hands over."""
    image = run(models, cfg_scale=np.float32(7.5), n_inference_steps=np.int64(STEPS), seed=np.int64(0),
                height=np.int64(H), width=np.int64(W))
    np.testing.assert_array_equal(image, run(models))


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompt="a \udcff cat"), r"prompt is not valid text \(UTF-8\)"),  # bytes a shell passed that are not UTF-8
    (dict(negative_prompt=["\ud800"]), r"negative_prompt is not valid text"),
    (dict(input_image=Image.new("RGB", (W, H)), strength=1e-15), "0 steps; give a strength of at least 0.3334"),
    (dict(input_image=Image.new("RGB", (W, H)), strength=5e-324), "give a strength of at least"),
])
def test_more_bad_input_is_one_clear_error(models, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run(models, **kwargs)


def test_a_model_on_the_meta_device_is_refused(models):
    empty = dict(models, clip=copy.deepcopy(models["clip"]).to("meta"))
    with pytest.raises(ValueError, match=r"models\['clip'\] is on the meta device: it has no weights"):
        run(empty)


def test_nonfinite_warn_gives_one_warning_not_numpys_too(models):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(poisoned(models, "decoder"), nonfinite="warn")
    assert [str(w.message)[:24] for w in caught] == ["the VAE decoder (models["]  # no "invalid value ... cast"


def test_absurd_config_sizes_are_refused_before_any_memory_is_asked_for():
    from sd.diffusion import DiffusionConfig

    with pytest.raises(ValueError, match="DiffusionConfig.model_channels must be a positive integer up to 1048576"):
        DiffusionConfig(model_channels=10**12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_mode_runs_in_half_precision_with_a_float32_state(models, dtype):
    half = {name: copy.deepcopy(model).to(dtype) for name, model in models.items()}
    start = Image.fromarray(np.full((H, W, 3), 120, np.uint8))
    mask = Image.fromarray(np.tile(np.array([0] * (W // 2) + [255] * (W // 2), np.uint8), (H, 1)))
    states = []
    for kwargs in (dict(), dict(input_image=start, strength=0.7), dict(input_image=start, mask_image=mask),
                   dict(guidance_fn=lambda images: images.mean())):
        image = run(half, callback=lambda i, t, latents, x0: states.append((latents.dtype, x0.dtype)), **kwargs)
        assert image.shape == (H, W, 3) and image.dtype == np.uint8
    assert set(states) == {(torch.float32, torch.float32)}


@pytest.mark.parametrize("amx,avx512_bf16,device,expected", [
    (True, False, "cpu", torch.bfloat16), (False, True, "cpu", torch.bfloat16), (False, False, "cpu", torch.float32),
    (False, False, "cuda", torch.float16), (True, True, "mps", torch.float16),
])
def test_dtype_auto_picks_as_documented(monkeypatch, amx, avx512_bf16, device, expected):
    from sd.devices import fast_dtype

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert fast_dtype(device) == expected


def test_dtype_auto_loads_in_the_fast_dtype(tmp_path, monkeypatch):
    from sd.devices import fast_dtype
    from sd.model_loader import preload_models_from_standard_weights, save_standard_weights

    path = save_standard_weights(random_models(tiny_configs(), seed=1), tmp_path / "tiny.safetensors")
    loaded = preload_models_from_standard_weights(path, dtype="auto")
    assert {p.dtype for m in loaded.values() for p in m.parameters()} == {fast_dtype("cpu")}
    with pytest.raises(ValueError, match="or 'auto', got 'fast'"):
        preload_models_from_standard_weights(path, dtype="fast")
