"""generate(): text-to-image, image-to-image and inpainting with the four models and a sampler.

Tutorial part: "Pipeline" (hkproj pipeline.py: generate, rescale, get_time_embedding).
Original: diffusers' StableDiffusionPipeline / Img2ImgPipeline / InpaintPipeline, whose random draws
(initial latents, VAE samples, every step's noise) this loop makes in the same order and shapes, so the
same seed on CPU gives the same image. Reference: Ho & Salimans 2022, "Classifier-Free Diffusion Guidance";
Meng et al. 2022, "SDEdit" (image-to-image); Lugmayr et al. 2022, "RePaint" (inpainting by blending);
Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis", eq. (14) (guidance by a loss's gradient,
as the Hugging Face diffusion course's "guidance functions" use it).
"""

import contextlib

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .attention_maps import AttentionMaps, record_cross_attention, token_strings
from .samplers import make_sampler
from .schedule import alpha_cumprod_at, make_alphas_cumprod, make_betas

WIDTH, HEIGHT = 512, 512  # SD 1.5 was trained at 512x512
GUIDANCE_FN_SCALE = 200.0  # the Hugging Face diffusion course's colour-loss scale, for the same x̂_0 nudge s·σ²·∇loss


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _as_prompt_list(value, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and value and all(isinstance(p, str) for p in value):
        return list(value)
    raise TypeError(f"{name} must be a string or a non-empty list of strings, got {value!r:.80}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def image_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """PIL image (any mode) -> (1, 3, height, width) float32 in [-1, 1], resized with Lanczos as diffusers does."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3) in [0, 1]
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2 - 1


def mask_to_tensor(mask: Image.Image, width: int, height: int) -> torch.Tensor:
    """Mask image -> (1, 1, height, width) of 0/1, white (>= half grey) = repaint."""
    mask = mask.convert("L")
    if mask.size != (width, height):
        mask = mask.resize((width, height), resample=Image.LANCZOS)
    array = np.asarray(mask, dtype=np.float32) / 255.0
    return (torch.from_numpy(array)[None, None] >= 0.5).float()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoder output (B, 3, H, W) in about [-1, 1] -> (B, H, W, 3) uint8, rounded (the tutorial's rescale + clamp)."""
    images = ((images.detach().float() + 1) / 2).clamp(0, 1)
    return (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def generate(
    prompt: str | list[str],
    uncond_prompt: str | list[str] | None = None,
    input_image: Image.Image | None = None,
    mask_image: Image.Image | None = None,
    strength: float = 0.8,
    do_cfg: bool = True,
    cfg_scale: float = 7.5,
    sampler_name: str = "ddpm",
    n_inference_steps: int = 50,
    models: Mapping[str, torch.nn.Module] | None = None,
    seed: int | None = None,
    device: torch.device | str | None = None,
    idle_device: torch.device | str | None = None,
    tokenizer=None,
    height: int = HEIGHT,
    width: int = WIDTH,
    *,
    negative_prompt: str | list[str] | None = None,
    num_images: int = 1,
    generator: torch.Generator | None = None,
    callback: Callable[[int, float, torch.Tensor, torch.Tensor], None] | None = None,
    paste_back: bool = False,
    eta: float | None = None,
    progress: bool = True,
    attention_maps: AttentionMaps | None = None,
    guidance_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    guidance_fn_scale: float | None = None,
) -> list[Image.Image]:
    """Make images from text (and optionally an image to start from and a mask of what to repaint).

    prompt: one prompt or a list; num_images images are made for each, in order.
    uncond_prompt / negative_prompt (the same thing, diffusers' name): what classifier-free guidance steers
    away from; "" by default. cfg_scale: guidance strength; do_cfg=False runs the conditional branch only.
    input_image: start from this image (image-to-image); strength in (0, 1] is how much of it is replaced.
    mask_image (with input_image, same size): white = repaint. With a standard checkpoint, the area outside the
    mask is kept by blending at every step; a 9-channel inpainting UNet gets the mask as input. paste_back
    copies the unmasked pixels of the input into the result at the end.
    sampler_name: one of sd.samplers.SAMPLERS (ddpm, ddim, euler, euler_a, heun, lms, dpmpp_2m, and the
    _karras variants); eta: DDIM's noise amount (0 deterministic, 1 DDPM-like), for ddim only.
    seed or generator: reproducibility; the same seed gives the same image as diffusers on CPU.
    callback(step_index, timestep, latents, pred_original) after each step: the sampler's state and its prediction
    x̂_0 of the clean latents (sd.preview.LatentPreview shows either cheaply; models["decoder"] decodes x̂_0).
    attention_maps: an sd.attention_maps.AttentionMaps to fill with each image's cross-attention maps.
    guidance_fn(images) -> loss: images is the decoded x̂_0 (B, 3, H, W), (decoder output + 1) / 2, so about [0, 1]
    (not clamped: every pixel passes gradient), at every model evaluation; the gradient of
    the loss (a scalar, or one per image, summed) nudges the noise prediction, ε̂ += guidance_fn_scale ·
    sqrt(1 - ᾱ_t) · ∇_{x_t} loss (ε̂ held constant inside x̂_0), which moves x̂_0 by -guidance_fn_scale · σ_t² ·
    ∇_{x̂_0} loss (default scale GUIDANCE_FN_SCALE). It costs a decoder forward and backward per model evaluation.
    Returns PIL images.
    """
    # --- check everything before any model runs -------------------------------------------------------------
    if models is None or not isinstance(models, Mapping):
        raise ValueError("models is required: the dict from sd.model_loader.preload_models_from_standard_weights()")
    needed = ["clip", "diffusion", "decoder"] + (["encoder"] if input_image is not None else [])
    missing = [name for name in needed if name not in models]
    _check(not missing, f"models is missing {missing}; it needs {needed} (from preload_models_from_standard_weights)")
    prompts = _as_prompt_list(prompt, "prompt")
    if uncond_prompt is not None and negative_prompt is not None and uncond_prompt != negative_prompt:
        raise ValueError("give negative_prompt or uncond_prompt (two names for the same thing), not both")
    negative = negative_prompt if negative_prompt is not None else uncond_prompt
    negatives = _as_prompt_list(negative if negative is not None else "", "negative_prompt")
    if len(negatives) == 1:
        negatives = negatives * len(prompts)
    _check(len(negatives) == len(prompts),
           f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts; give one, or one per prompt")
    downscale = models["decoder"].config.downscale
    for name, size in (("height", height), ("width", width)):
        _check(_is_int(size) and size > 0 and size % downscale == 0,
               f"{name} must be a positive multiple of {downscale}, got {size!r}")
    _check(eta is None or sampler_name == "ddim", f"eta is an option of the ddim sampler, not of {sampler_name!r}")
    _check(_is_int(num_images) and num_images > 0, f"num_images must be a positive integer, got {num_images!r}")
    _check(isinstance(cfg_scale, (int, float)) and not isinstance(cfg_scale, bool), f"cfg_scale must be a number, got {cfg_scale!r}")
    if input_image is not None and not isinstance(input_image, Image.Image):
        raise TypeError(f"input_image must be a PIL.Image.Image, got {type(input_image).__name__}")
    if mask_image is not None:
        _check(input_image is not None, "mask_image needs an input_image: the image whose masked part is repainted")
        if not isinstance(mask_image, Image.Image):
            raise TypeError(f"mask_image must be a PIL.Image.Image, got {type(mask_image).__name__}")
        _check(mask_image.size == input_image.size,
               f"mask_image is {mask_image.size[0]}x{mask_image.size[1]} but input_image is "
               f"{input_image.size[0]}x{input_image.size[1]}; they must be the same size")
    _check(isinstance(strength, (int, float)) and not isinstance(strength, bool) and 0 < strength <= 1,
           f"strength must be a number in (0, 1], got {strength!r}")
    inpainting_unet = models["diffusion"].config.in_channels == 2 * models["diffusion"].config.out_channels + 1
    _check(not inpainting_unet or mask_image is not None,
           "this checkpoint's UNet is an inpainting model (9 input channels): give input_image and mask_image")
    _check(not paste_back or mask_image is not None, "paste_back needs a mask_image")
    if seed is not None and generator is not None:
        raise ValueError("give seed or generator, not both")
    _check(seed is None or _is_int(seed), f"seed must be an integer, got {seed!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable as callback(step_index, timestep, latents, pred_original)")
    if attention_maps is not None and not isinstance(attention_maps, AttentionMaps):
        raise TypeError(f"attention_maps must be an sd.attention_maps.AttentionMaps, got {type(attention_maps).__name__}")
    if guidance_fn is not None and not callable(guidance_fn):
        raise TypeError("guidance_fn must be callable as guidance_fn(images) -> loss tensor")
    _check(guidance_fn is not None or guidance_fn_scale is None, "guidance_fn_scale is the scale of guidance_fn: give a guidance_fn")
    guidance_fn_scale = GUIDANCE_FN_SCALE if guidance_fn_scale is None else guidance_fn_scale
    _check(isinstance(guidance_fn_scale, (int, float)) and not isinstance(guidance_fn_scale, bool),
           f"guidance_fn_scale must be a number, got {guidance_fn_scale!r}")

    if generator is None:
        # A CPU generator: the same seed gives the same noise whatever device the models run on.
        generator = torch.Generator()
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
    # Cheap, and checks the sampler's name, step count and options: still before any model runs.
    sampler = make_sampler(sampler_name, generator, n_inference_steps, **({} if eta is None else {"eta": eta}))

    # --- set up ------------------------------------------------------------------------------------------------
    from .tokenizer import load_tokenizer, tokenize

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer()

    diffusion = models["diffusion"]
    device = torch.device(device) if device is not None else next(diffusion.parameters()).device
    dtype = next(diffusion.parameters()).dtype

    def to_device(model):
        return model.to(device)

    def to_idle(model):
        return model.to(idle_device) if idle_device is not None else model

    def randn(shape) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=dtype, device=generator.device).to(device)

    batch = [p for p in prompts for _ in range(num_images)]
    batch_negatives = [n for n in negatives for _ in range(num_images)]
    B = len(batch)
    latent_shape = (B, diffusion.config.out_channels, height // downscale, width // downscale)

    with torch.inference_mode():
        # Text -> context (B, 77, 768); with CFG the unconditional half goes first, as in diffusers.
        clip = to_device(models["clip"])
        tokens = tokenize(batch_negatives + batch if do_cfg else batch, tokenizer).to(device)
        context = clip(tokens).to(dtype)  # (2B or B, 77, d_context)
        to_idle(clip)

        image_latents = mask = masked_image_latents = None
        if input_image is not None:
            encoder = to_device(models["encoder"])
            image = image_to_tensor(input_image, width, height).to(device, dtype)  # (1, 3, H, W)
            image_shape = (1, *latent_shape[1:])
            if mask_image is None or not inpainting_unet or strength < 1:
                image_latents = encoder(image, randn(image_shape)).expand(latent_shape)  # one image for every prompt
            if mask_image is not None:
                mask_full = mask_to_tensor(mask_image, width, height).to(device, dtype)  # (1, 1, H, W)
                mask = torch.nn.functional.interpolate(mask_full, size=latent_shape[2:]).expand(B, -1, -1, -1)
            sampler.set_strength(strength)

        # Initial latents: pure noise, or the image noised to the first timestep.
        noise = randn(latent_shape)
        if image_latents is None or (mask_image is not None and strength == 1):
            latents = noise * sampler.init_noise_sigma
        else:
            latents = sampler.noise_to_step(image_latents, 0, noise)
        if mask_image is not None:
            if inpainting_unet:
                masked_image = image * (mask_full < 0.5)
                masked_image_latents = encoder(masked_image, randn(image_shape)).expand(latent_shape)
            else:
                randn((1, *latent_shape[1:]))  # diffusers encodes the masked image here; keep its random draws in step
        if input_image is not None:
            to_idle(encoder)

        diffusion = to_device(diffusion)
        if guidance_fn is not None:
            decoder = to_device(models["decoder"])
            alphas_cumprod = make_alphas_cumprod(make_betas(sampler.n_training_steps))

        def guide(x: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
            """ε̂ nudged down the gradient of guidance_fn's loss on the decoded x̂_0 (Dhariwal & Nichol eq. 14)."""
            alpha_bar = alpha_cumprod_at(t, alphas_cumprod).item()
            with torch.inference_mode(False), torch.enable_grad():
                x_t = x.clone().requires_grad_()  # a clone is an ordinary tensor that autograd may use
                pred_original = (x_t - (1 - alpha_bar) ** 0.5 * eps.clone()) / alpha_bar**0.5
                loss = guidance_fn((decoder(pred_original).float() + 1) / 2)
                if not isinstance(loss, torch.Tensor) or loss.shape not in ((), (1,), (x.shape[0],)):
                    got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                    raise ValueError(f"guidance_fn must return a loss tensor of shape () or ({x.shape[0]},), got {got}")
                (grad,) = torch.autograd.grad(loss.sum(), x_t)
            return eps + guidance_fn_scale * (1 - alpha_bar) ** 0.5 * grad.to(eps.dtype)

        def noise_model(x: torch.Tensor, t) -> torch.Tensor:
            """ε̂ for the sampler: the UNet with the prompts' context, classifier-free guidance and guidance_fn."""
            model_input = torch.cat([x] * 2) if do_cfg else x
            if inpainting_unet:
                extra = torch.cat([mask, masked_image_latents], dim=1)  # (B, 5, h, w): mask, masked-image latents
                model_input = torch.cat([model_input, torch.cat([extra] * 2) if do_cfg else extra], dim=1)
            output = diffusion(model_input, context, t)
            if do_cfg:
                output_uncond, output_cond = output.chunk(2)
                output = output_uncond + cfg_scale * (output_cond - output_uncond)  # Ho & Salimans eq. (6)
            return output if guidance_fn is None else guide(x, t, output)

        # Attention maps: hooks only while sampling, on the conditional half of the UNet's batch under CFG.
        recording = contextlib.nullcontext() if attention_maps is None else \
            record_cross_attention(diffusion, rows=slice(B, 2 * B) if do_cfg else slice(0, B))
        timesteps = sampler.timesteps.tolist()
        with recording as recorded:
            for i, t in enumerate(tqdm(timesteps, disable=not progress, desc=sampler_name)):
                latents = sampler.step(i, latents, noise_model)
                if mask is not None and not inpainting_unet:
                    # Keep what lies outside the mask: the original latents, noised to the level of the next step
                    # (after the last step: the original latents themselves).
                    known = sampler.noise_to_step(image_latents, i + 1, noise)
                    latents = (1 - mask) * known + mask * latents
                if callback is not None:
                    callback(i, t, latents, sampler.pred_original)
        to_idle(diffusion)
        if attention_maps is not None:
            attention_maps.maps = recorded.mean().cpu()
            attention_maps.tokens = token_strings(tokens[-B:], tokenizer)

        decoder = to_device(models["decoder"])
        images = decoder(latents)  # (B, 3, H, W)
        to_idle(decoder)
        if paste_back:  # the input image as it went into the encoder, in the decoder's dtype
            images = mask_full * images + (1 - mask_full) * image.to(images.dtype)
    return [Image.fromarray(a) for a in to_uint8(images)]
