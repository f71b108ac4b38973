"""generate(): text-to-image, image-to-image and inpainting with the four models and a sampler, in named stages.

Tutorial part: "Pipeline" (hkproj pipeline.py: generate, rescale, get_time_embedding).
Original: diffusers' StableDiffusionPipeline / Img2ImgPipeline / InpaintPipeline, whose random draws
(initial latents, VAE samples, every step's noise) this loop makes in the same order and shapes, so the
same seed on CPU gives the same image. Reference: Ho & Salimans 2022, "Classifier-Free Diffusion Guidance";
Meng et al. 2022, "SDEdit" (image-to-image); Lugmayr et al. 2022, "RePaint" (inpainting by blending);
Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis", eq. (14) (guidance by a loss's gradient,
as the Hugging Face diffusion course's "guidance functions" use it).

generate() reads as its stages: check_inputs, encode_prompt, prepare_latents, make_noise_model (CFG and the
inpainting UNet's extra channels; with_guidance_fn on top), denoise (the loop), decode and to_output.
"""

import contextlib
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .checks import NonFiniteError, check, is_finite_number, is_int
from .clip import check_clip_skip
from .conditioning import Conditioning
from .ddpm import BatchRows, NoiseModel, draw_noise
from .devices import model_device, model_dtype, resolve_device, restored_on_failure, run_in_dtype
from .embeddings import embedding_names
from .images import RESIZE_MODES, image_to_tensor, mask_to_tensor, oriented_size
from .inspect.attention_maps import AttentionMaps
from .lora import loras_applied, prompt_loras
from .samplers import make_sampler
from .schedule import alpha_cumprod_at, make_alphas_cumprod, make_betas
from .speedups import Speedups
from .prompt_parser import check_prompt_syntax, extra_networks
from .tokenizer import load_tokenizer
from .vae_tiling import DECODE_TILE, decode_tiled, encode_tiled

GUIDANCE_FN_SCALE = 200.0  # the Hugging Face diffusion course's colour-loss scale, for the same x̂_0 nudge s·σ²·∇loss
OUTPUT_TYPES = ("np", "pil")  # uint8 arrays as the tutorial returns, or PIL images as diffusers does
NONFINITE = ("raise", "warn")  # what a NaN/inf in the models' outputs does: stop with where it appeared, or warn once
MAX_SEED = 2**64  # torch.Generator.manual_seed takes 0 .. 2**64 - 1
LARGE_AREA = 16  # warn when an image has more than this many times the area the model was trained at
VAE_ENCODER = "the VAE encoder (models['encoder']) on input_image"
STATE_DTYPE = torch.float32  # the latents, the sampler's arithmetic and the noise draws, whatever the models' dtype:
                             # the same seed gives the same image in every dtype, up to the models' rounding
DECODER_LIVE_TENSORS = 3  # at full resolution the decoder holds at least an input, a GroupNorm and a conv output


# --- images in and out ----------------------------------------------------------------------------------------


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoder output (B, 3, H, W) in about [-1, 1] -> (B, H, W, 3) uint8, rounded (the tutorial's rescale + clamp)."""
    images = ((images.detach().float().nan_to_num(0.0) + 1) / 2).clamp(0, 1)  # NaN (nonfinite="warn"): grey
    return (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def to_output(images: torch.Tensor, output_type: str, batched: bool):
    """The last stage: "np" gives uint8 arrays, (H, W, 3) for one prompt string and one image (the tutorial's
    return value, so `Image.fromarray(output)` works), else (B, H, W, 3); "pil" gives a list of PIL images."""
    arrays = to_uint8(images)
    if output_type == "pil":
        return [Image.fromarray(a) for a in arrays]
    return arrays if batched else arrays[0]


# --- stage 1: check everything before any model runs -----------------------------------------------------------


def _prompt_list(value, name: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not (isinstance(value, Sequence) and value and all(isinstance(p, str) for p in value)):
        raise TypeError(f"{name} must be a string or a non-empty list of strings, got {value!r:.80}")
    for p in value:  # a shell passes bytes that are not UTF-8 as lone surrogates, which no tokenizer takes
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{name} is not valid text (UTF-8): {p!r:.80} has {e.object[e.start:e.end]!r}") from None
    return list(value)


def check_prompts(prompt, uncond_prompt, negative_prompt) -> tuple[list[str], list[str]]:
    """(prompts, one negative prompt per prompt); uncond_prompt (the tutorial's name) and negative_prompt
    (diffusers') are the same thing."""
    prompts = _prompt_list(prompt, "prompt")
    if uncond_prompt is not None and negative_prompt is not None and uncond_prompt != negative_prompt:
        raise ValueError("give negative_prompt or uncond_prompt (two names for the same thing), not both")
    negative = negative_prompt if negative_prompt is not None else uncond_prompt
    negatives = _prompt_list(negative if negative is not None else "", "negative_prompt")
    negatives = negatives * len(prompts) if len(negatives) == 1 else negatives
    check(len(negatives) == len(prompts),
          f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts; give one, or one per prompt")
    return prompts, negatives


def check_models(models, needs_encoder: bool) -> None:
    if models is None or not isinstance(models, Mapping):
        raise ValueError("models is required: the dict from sd.model_loader.preload_models_from_standard_weights()")
    needed = ["clip", "diffusion", "decoder"] + (["encoder"] if needs_encoder else [])
    missing = [name for name in needed if name not in models]
    check(not missing, f"models is missing {missing}; it needs {needed} (from preload_models_from_standard_weights)")
    for name in needed:
        check(model_device(models[name]).type != "meta", f"models[{name!r}] is on the meta device: it has no weights "
              f"(load them with preload_models_from_standard_weights)")


def default_size(models, height: int | None, width: int | None) -> tuple[int, int]:
    """The size the model was trained at where none is given: the UNet's sample_size latents, in pixels."""
    size = models["diffusion"].config.sample_size * models["decoder"].config.downscale
    return (size if height is None else height), (size if width is None else width)


def is_inpainting_unet(diffusion) -> bool:
    """The 9-channel inpainting UNet: latents (4) + mask (1) + masked-image latents (4)."""
    return diffusion.config.in_channels == 2 * diffusion.config.out_channels + 1


def check_numbers(cfg_scale, strength, num_images, seed=None, guidance_fn_scale=None, height=None, width=None) -> None:
    """The numbers, each refused with its range, NaN and inf included; with no model needed, so the sd command
    checks them before it loads one (sizes: only > 0 here; check_inputs knows the VAE's multiple)."""
    for name, size in (("height", height), ("width", width)):
        check(size is None or (is_int(size) and size > 0), f"{name} must be a positive integer, got {size!r}")
    check(is_int(num_images) and num_images > 0, f"num_images must be a positive integer, got {num_images!r}")
    check(is_finite_number(cfg_scale), f"cfg_scale must be a finite number, got {cfg_scale!r}")
    check(is_finite_number(strength) and 0 < strength <= 1, f"strength must be a number in (0, 1], got {strength!r}")
    check(seed is None or (is_int(seed) and 0 <= seed < MAX_SEED),
          f"seed must be an integer from 0 to 2**64 - 1, or None for a random one, got {seed!r}")
    check(guidance_fn_scale is None or is_finite_number(guidance_fn_scale),
          f"guidance_fn_scale must be a finite number, got {guidance_fn_scale!r}")


def check_mask_size(input_image: Image.Image, mask_image: Image.Image) -> None:
    """The mask covers the image as the user sees them: sizes compared the right way up (EXIF orientation)."""
    (iw, ih), (mw, mh) = oriented_size(input_image), oriented_size(mask_image)
    check((iw, ih) == (mw, mh), f"mask_image is {mw}x{mh} but input_image is {iw}x{ih} (as shown, EXIF rotation "
          f"applied); they must be the same size")


def check_inputs(models, input_image, mask_image, strength, cfg_scale, height, width, num_images, seed, generator,
                 sampler_name, eta, guidance_fn, guidance_fn_scale, paste_back, output_type, tokenizer=None,
                 resize_mode="stretch", nonfinite="raise") -> None:
    """Conflicting arguments, sizes and ranges, each refused with what is accepted (the rest fails as a TypeError)."""
    downscale = models["decoder"].config.downscale
    for name, size in (("height", height), ("width", width)):
        check(is_int(size) and size > 0 and size % downscale == 0,
              f"{name} must be a positive multiple of {downscale}, got {size!r}")
    check_numbers(cfg_scale, strength, num_images, seed, guidance_fn_scale)
    if input_image is not None and not isinstance(input_image, Image.Image):
        raise TypeError(f"input_image must be a PIL.Image.Image (open a file with PIL.Image.open), "
                        f"got {type(input_image).__name__}")
    if mask_image is not None:
        check(input_image is not None, "mask_image needs an input_image: the image whose masked part is repainted")
        if not isinstance(mask_image, Image.Image):
            raise TypeError(f"mask_image must be a PIL.Image.Image, got {type(mask_image).__name__}")
        check_mask_size(input_image, mask_image)
    check(not is_inpainting_unet(models["diffusion"]) or mask_image is not None,
          "this checkpoint's UNet is an inpainting model (9 input channels): give input_image and mask_image")
    check(not paste_back or mask_image is not None, "paste_back needs a mask_image")
    check(seed is None or generator is None, "give seed or generator, not both")
    check(eta is None or sampler_name == "ddim", f"eta is an option of the ddim sampler, not of {sampler_name!r}")
    check(guidance_fn is not None or guidance_fn_scale is None,
          "guidance_fn_scale is the scale of guidance_fn: give a guidance_fn")
    check(output_type in OUTPUT_TYPES, f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    check(resize_mode in RESIZE_MODES, f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got {resize_mode!r}")
    check(nonfinite in NONFINITE, f"nonfinite must be one of {', '.join(NONFINITE)}, got {nonfinite!r}")
    if tokenizer is not None and not (callable(tokenizer) and hasattr(tokenizer, "decode")):
        raise TypeError(f"tokenizer must be a transformers CLIPTokenizer (sd.load_tokenizer() gives one), "
                        f"got {tokenizer!r:.80}")


def check_rows(rows, total: int, input_image) -> None:
    """rows: None, or some of the batch's images 0..total-1, in order, each once; text to image only (an image's
    encoding draws noise once for the whole batch, which a share cannot repeat)."""
    if rows is None:
        return
    check(isinstance(rows, (list, tuple)) and rows and all(is_int(i) for i in rows)
          and list(rows) == sorted(set(rows)) and 0 <= rows[0] and rows[-1] < total,
          f"rows must be some of the batch's images 0..{total - 1}, in order, each once, got {rows!r}")
    check(input_image is None, "rows (a share of the batch) is for text to image only")


def check_size(models, height: int, width: int, batch: int, device: torch.device, dtype: torch.dtype,
               tiled: bool = False) -> None:
    """Refuse an image that cannot fit in memory, before any work; warn about one far larger than the model knows.
    The bound is a floor: the VAE decoder's activations at full resolution alone (the peak is several times it), or
    with tiled, those of one tile (sd.vae_tiling) beside the float32 image."""
    decoder = models["decoder"].config
    area = height * width
    if tiled:
        area = min(area, (DECODE_TILE * decoder.downscale) ** 2)
    need = DECODER_LIVE_TENSORS * batch * decoder.block_out_channels[0] * area * dtype.itemsize \
        + (batch * decoder.image_channels * height * width * STATE_DTYPE.itemsize if tiled else 0)
    have = device_memory(device)
    check(have is None or need <= have,
          f"{batch} image(s) of {width}x{height} need at least {need / 2**30:.0f} GB in the VAE decoder alone, and "
          f"{device} has {(have or 0) / 2**30:.0f} GB: make the images smaller or fewer"
          + ("" if tiled else ", or decode in tiles (vae_tiling=True, sd: --vae-tiling)"))
    trained = (models["diffusion"].config.sample_size * models["decoder"].config.downscale) ** 2
    if height * width > LARGE_AREA * trained:
        warnings.warn(f"{width}x{height} is {height * width / trained:.0f} times the area this model was trained at "
                      f"({trained ** 0.5:.0f}x{trained ** 0.5:.0f}): it will be slow (attention grows with the square "
                      f"of the area) and need at least {need / 2**30:.1f} GB", stacklevel=3)


def device_memory(device: torch.device) -> int | None:
    """Total memory of the device in bytes (the machine's RAM for the CPU), or None where torch cannot say."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu" and hasattr(os, "sysconf"):
        with contextlib.suppress(ValueError, OSError):
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


@dataclass
class FiniteCheck:
    """NaN/inf caught where it first appears (a model's output, a sampler step), named in the error: one reduction
    per tensor, cheap next to the model that made it. mode "warn" (for debugging) warns once and goes on."""

    mode: str = "raise"
    warned: bool = False

    def __call__(self, x: torch.Tensor, where: str | Callable[[], str]) -> torch.Tensor:
        """x, checked; where: what made it (or a function that says, called only when x is not finite)."""
        if not torch.isfinite(x).all():
            bad = (~torch.isfinite(x)).sum().item()
            message = f"{where() if callable(where) else where} gave NaN or inf ({bad} of {x.numel()} values)"
            if self.mode == "raise":
                raise NonFiniteError(f"{message}; nonfinite='warn' (sd: --nonfinite warn) goes on, to debug")
            if not self.warned:
                warnings.warn(f"{message}; going on (nonfinite='warn'): the image will be wrong", stacklevel=2)
                self.warned = True
        return x


def make_generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator:
    """A CPU generator unless one is given: the same seed gives the same noise whatever device the models run on."""
    if generator is not None:
        return generator
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(int(seed))  # numpy's integers too
    else:
        generator.seed()
    return generator


@contextlib.contextmanager
def on_device(model, device, idle_device):
    """Run a block with `model` on `device`, then move it to `idle_device` (if given), also when the block fails.
    The tutorial's to(device) ... to_idle(model) around each model; model None: nothing to move."""
    if model is not None:
        model.to(device)
    try:
        yield model
    finally:
        if model is not None and idle_device is not None:
            model.to(idle_device)


# --- stage 2: text -> context ----------------------------------------------------------------------------------


def check_prompt_options(clip, clip_skip, prompt_syntax: str) -> None:
    """clip_skip within the text encoder's layers, prompt_syntax one of PROMPT_SYNTAXES."""
    check_clip_skip(clip_skip, clip.config.n_layers)
    check_prompt_syntax(prompt_syntax)


def encode_prompt(models, prompts: str | list[str], clip_skip: int = 1, prompt_syntax: str = "a1111",
                  tokenizer=None, *, steps: int = 1, step: int = 1) -> torch.Tensor:
    """Prompts -> the context (B, 77·k, d_context) the UNet attends to, on the text encoder's device and dtype.

    prompt_syntax "a1111" (the default): AUTOMATIC1111's emphasis (word:1.3), BREAK and 75-token chunks, each chunk
    through CLIP on its own and the outputs laid end to end (sd.conditioning), all prompts padded to the most chunks
    with the empty prompt's; "plain": the text as written, cut after 75 tokens (diffusers'). A plain prompt of up to
    75 tokens gives exactly clip(tokenize(prompt)): (B, 77, d). clip_skip: AUTOMATIC1111's (1 = the last layer,
    2 = the one before it; diffusers' clip_skip is one less). Prompt editing ([from:to:when], [a|b]) is resolved to
    the text of sampler step `step` of `steps`; generate() encodes every step's text (once each)."""
    clip = models["clip"] if isinstance(models, Mapping) else models
    prompts = _prompt_list(prompts, "prompts")
    check_prompt_options(clip, clip_skip, prompt_syntax)
    check(is_int(steps) and steps > 0 and is_int(step) and 1 <= step <= steps,
          f"step must be a whole number from 1 to steps={steps!r}, got {step!r}")
    tagged = [p for p in prompts if prompt_syntax == "a1111" and extra_networks(p)[1]]
    check(not tagged, f"{tagged[0] if tagged else ''!r:.60} names a <lora:...>: encode_prompt does not merge LoRAs; "
          f"merge it with sd.apply_lora and leave the tag out (generate() reads tags, with lora_dir)")
    with torch.no_grad():
        return Conditioning(clip, prompts, steps, tokenizer or load_tokenizer(), clip_skip, prompt_syntax).at(step)


# --- stage 3: the latents sampling starts from ------------------------------------------------------------------


@dataclass
class Start:
    """What the loop starts from, and what inpainting keeps using at every step."""

    latents: torch.Tensor                          # x at the first step (B, C, h, w)
    noise: torch.Tensor                            # the noise drawn for it
    image_latents: torch.Tensor | None = None      # the input image's latents (B, C, h, w)
    blend_mask: torch.Tensor | None = None         # standard checkpoint inpainting: (B, 1, h, w), 1 = repaint
    unet_extra: torch.Tensor | None = None         # 9-channel UNet inpainting: mask + masked-image latents (B, 5, h, w)


def prepare_latents(encoder, sampler, randn: Callable, latent_shape: tuple[int, ...], image: torch.Tensor | None,
                    mask: torch.Tensor | None, strength: float, inpainting_unet: bool,
                    finite: FiniteCheck = FiniteCheck(), tiled: bool = False) -> Start:
    """Pure noise; or the input image's latents noised to the first step that strength keeps (SDEdit); with a mask,
    what inpainting needs. Random draws in diffusers' order: the image's VAE sample, the start noise, the masked
    image's VAE sample. image (1, 3, H, W) and mask (1, 1, H, W) serve every prompt of the batch. The sampler's
    timesteps are already cut to strength (make_sampler). tiled: the encoder runs in overlapping tiles."""
    encode = encode_tiled if tiled else run_in_dtype
    one = (1, *latent_shape[1:])
    image_latents = None
    if image is not None:
        if mask is None or not inpainting_unet or strength < 1:
            image_latents = finite(encode(encoder, image, randn(one)), VAE_ENCODER).expand(latent_shape)
    noise = randn(latent_shape)
    if image_latents is None or (mask is not None and strength == 1):
        latents = noise * sampler.init_noise_sigma
    else:
        latents = sampler.noise_to_step(image_latents, 0, noise)
    start = Start(latents, noise, image_latents)
    if mask is not None:
        latent_mask = F.interpolate(mask, size=latent_shape[2:]).expand(latent_shape[0], -1, -1, -1)  # (B, 1, h, w)
        if inpainting_unet:
            masked = encode(encoder, image * (mask < 0.5), randn(one))
            masked_image_latents = finite(masked, VAE_ENCODER).expand(latent_shape)
            start.unet_extra = torch.cat([latent_mask, masked_image_latents], dim=1)
        else:
            randn(one)  # diffusers encodes the masked image here; keep its random draws in step
            start.blend_mask = latent_mask
    return start


# --- stage 4: the noise prediction the sampler calls -------------------------------------------------------------


def make_noise_model(diffusion, context: torch.Tensor | Conditioning, do_cfg: bool, cfg_scale: float,
                     unet_extra: torch.Tensor | None = None, finite: FiniteCheck = FiniteCheck()) -> NoiseModel:
    """ε̂(x, t): the UNet on the prompts' context (a tensor, or a Conditioning whose .context the loop moves from
    step to step), with classifier-free guidance; the 9-channel inpainting UNet gets the mask and masked-image
    latents appended to its input."""
    conditioning = context if isinstance(context, Conditioning) else SimpleNamespace(context=context)

    # The messages are functions, made only on a failure: float(t) of a GPU tensor would wait for the GPU every call.
    def unet(x_in: torch.Tensor, t) -> torch.Tensor:  # in the UNet's dtype; the sampler gets float32
        context = conditioning.context
        return finite(diffusion(x_in.to(context.dtype), context, t).float(),
                      lambda: f"the UNet (models['diffusion']) at timestep {float(t):g}, "
                              f"on latents as large as {x_in.abs().max().item():.3g},")

    def noise_model(x: torch.Tensor, t) -> torch.Tensor:
        x_in = x if unet_extra is None else torch.cat([x, unet_extra], dim=1)  # (B, 4 or 9, h, w)
        if not do_cfg:
            return unet(x_in, t)
        eps_uncond, eps_cond = unet(torch.cat([x_in] * 2), t).chunk(2)
        return finite(eps_uncond + cfg_scale * (eps_cond - eps_uncond),  # Ho & Salimans eq. (6)
                      lambda: f"classifier-free guidance (cfg_scale={cfg_scale:g}) at timestep {float(t):g}")

    return noise_model


def with_guidance_fn(noise_model: NoiseModel, decoder, loss_fn: Callable, scale: float,
                     alphas_cumprod: torch.Tensor, finite: FiniteCheck = FiniteCheck()) -> NoiseModel:
    """ε̂ nudged down the gradient of loss_fn on the decoded x̂_0 (Dhariwal & Nichol eq. 14), ε̂ held constant in x̂_0:
    ε̂ + scale · sqrt(1 - ᾱ_t) · ∇_{x_t} loss, which moves x̂_0 by -scale · σ_t² · ∇_{x̂_0} loss."""

    def guided(x: torch.Tensor, t) -> torch.Tensor:
        eps = noise_model(x, t)
        alpha_bar = alpha_cumprod_at(t, alphas_cumprod).item()
        with torch.inference_mode(False), torch.enable_grad():
            x_t = x.clone().requires_grad_()  # a clone is an ordinary tensor that autograd may use
            pred_original = (x_t - (1 - alpha_bar) ** 0.5 * eps.clone()) / alpha_bar**0.5
            loss = loss_fn((run_in_dtype(decoder, pred_original) + 1) / 2)
            if not isinstance(loss, torch.Tensor) or loss.shape not in ((), (1,), (x.shape[0],)):
                got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise ValueError(f"guidance_fn must return a loss tensor of shape () or ({x.shape[0]},), got {got}")
            finite(loss.detach(), lambda: f"guidance_fn's loss at timestep {float(t):g}")
            (grad,) = torch.autograd.grad(loss.sum(), x_t)
        grad = finite(grad, lambda: f"the gradient of guidance_fn's loss at timestep {float(t):g}")
        return eps + scale * (1 - alpha_bar) ** 0.5 * grad.to(eps.dtype)

    return guided


# --- stage 5: the loop ---------------------------------------------------------------------------------------------


def denoise(sampler, start: Start, noise_model: NoiseModel, callback: Callable | None = None,
            progress: bool = True, desc: str | None = None, finite: FiniteCheck = FiniteCheck(),
            conditioning: Conditioning | None = None) -> torch.Tensor:
    """One sampler step per timestep, from start.latents to the clean latents (B, C, h, w). conditioning: moved to
    each step's context before the step (prompt editing)."""
    latents = start.latents
    n = len(sampler.timesteps)
    for i, t in enumerate(tqdm(sampler.timesteps.tolist(), disable=not progress, desc=desc)):
        if conditioning is not None:
            conditioning.at(i + 1)
        latents = finite(sampler.step(i, latents, noise_model),
                         f"the {desc or 'sampler'} step {i + 1} of {n} (t={t:g})")
        if start.blend_mask is not None:
            # Keep what lies outside the mask: the original latents, noised to the level of the next step
            # (after the last step: the original latents themselves).
            known = sampler.noise_to_step(start.image_latents, i + 1, start.noise)
            latents = (1 - start.blend_mask) * known + start.blend_mask * latents
        if callback is not None:
            callback(i, t, latents, sampler.pred_original)
    return latents


# --- stage 6: latents -> pixels -------------------------------------------------------------------------------------


def decode(decoder, latents: torch.Tensor, image: torch.Tensor | None = None, mask: torch.Tensor | None = None,
           finite: FiniteCheck = FiniteCheck(), tiled: bool = False):
    """(B, 3, H, W) in about [-1, 1]. With image and mask (paste_back): outside the mask, the input image exactly as
    it went into the encoder. float32, whatever the decoder's dtype. tiled: in overlapping tiles (sd.vae_tiling)."""
    images = decode_tiled(decoder, latents) if tiled else run_in_dtype(decoder, latents)
    images = finite(images, "the VAE decoder (models['decoder'])")
    if mask is not None:
        images = mask * images + (1 - mask) * image.to(images.dtype)
    return images


# --- the whole pipeline ----------------------------------------------------------------------------------------------


def generate(
    prompt: str | list[str],
    uncond_prompt: str | list[str] | None = None,
    input_image: Image.Image | None = None,
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
    *,
    mask_image: Image.Image | None = None,
    negative_prompt: str | list[str] | None = None,
    height: int | None = None,
    width: int | None = None,
    num_images: int = 1,
    generator: torch.Generator | None = None,
    callback: Callable[[int, float, torch.Tensor, torch.Tensor], None] | None = None,
    paste_back: bool = False,
    eta: float | None = None,
    progress: bool = True,
    attention_maps: AttentionMaps | None = None,
    guidance_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    guidance_fn_scale: float | None = None,
    output_type: str = "np",
    resize_mode: str = "stretch",
    nonfinite: str = "raise",
    tome_ratio: float = 0.0,
    deepcache_interval: int = 0,
    attention_slice_size: int | None = None,
    vae_tiling: bool = False,
    clip_skip: int = 1,
    prompt_syntax: str = "a1111",
    lora_dir: str | os.PathLike | None = None,
    rows: list[int] | None = None,
):
    """Make images from text (and optionally an image to start from and a mask of what to repaint).

    The positional parameters are the tutorial's, in its order; everything after tokenizer is keyword-only.
    prompt: one prompt or a list; num_images images are made for each, in order.
    uncond_prompt / negative_prompt (the same thing, diffusers' name): what classifier-free guidance steers
    away from; "" by default. cfg_scale: guidance strength; do_cfg=False runs the conditional branch only.
    input_image: start from this image (image-to-image); strength in (0, 1] is how much of it is replaced.
    mask_image (with input_image, same size): white = repaint. With a standard checkpoint, the area outside the
    mask is kept by blending at every step; a 9-channel inpainting UNet gets the mask as input. paste_back
    copies the unmasked pixels of the input into the result at the end.
    sampler_name: one of sd.samplers.SAMPLERS (ddpm, ddim, euler, euler_a, heun, lms, dpmpp_2m, and the
    _karras variants); eta: DDIM's noise amount (0 deterministic, 1 DDPM-like), for ddim only.
    height, width: the image size; by default the one the model was trained at (its UNet's sample_size latents:
    512 px for SD 1.5, 64 for the embedded model).
    seed or generator: reproducibility; the same seed gives the same image as diffusers on CPU.
    device: where the models run (default: where models["diffusion"] is); idle_device: where each model goes
    when it is not needed (the tutorial's, to save GPU memory). tokenizer: a CLIPTokenizer (default: sd's files).
    callback(step_index, timestep, latents, pred_original) after each step: the sampler's state and its prediction
    x̂_0 of the clean latents (sd.LatentPreview shows either cheaply; models["decoder"] decodes x̂_0).
    attention_maps: an sd.AttentionMaps to fill with each image's cross-attention maps.
    guidance_fn(images) -> loss: images is the decoded x̂_0 (B, 3, H, W), (decoder output + 1) / 2, so about [0, 1]
    (not clamped: every pixel passes gradient), at every model evaluation; the gradient of the loss (a scalar, or
    one per image, summed) nudges the noise prediction (see with_guidance_fn; default scale GUIDANCE_FN_SCALE).
    It costs a decoder forward and backward per model evaluation.
    output_type: "np" (default, as the tutorial): a uint8 array (H, W, 3) for one prompt string and one image,
    else (B, H, W, 3); "pil": a list of PIL images (as diffusers), whatever the batch.
    resize_mode: how input_image and mask_image are fitted to height x width: "stretch" (diffusers', with a warning
    when it changes their shape) or "crop" (scaled to cover, the centre kept).
    nonfinite: NaN/inf in any model's output or step stops the call with where it appeared ("raise"), or warns once
    ("warn", to debug). A call that fails leaves every model on the device it was on.
    Speed-ups and memory savers (sd.speedups; README "Speed" says what each costs): tome_ratio (e.g. 0.5) merges
    that fraction of the tokens of the top-level self-attention (Token Merging); deepcache_interval (e.g. 3) runs
    the whole UNet only every that many calls and reuses its deep features in between (DeepCache); 0 turns either
    off. attention_slice_size: queries per attention slice, for less memory; vae_tiling: decode (and encode) in
    overlapping tiles, so large images fit in a few GB.
    Prompts (sd.conditioning, sd.prompt_parser): prompt_syntax "a1111" (the default) reads AUTOMATIC1111's syntax:
    emphasis (word:1.3), (word), [word]; BREAK; prompts past 75 tokens in chunks; prompt editing [from:to:when] and
    [a|b], whose texts are each encoded once; "plain" takes the text as written, cut at 75 tokens (diffusers').
    clip_skip: 1 = CLIP's last layer (SD 1.5's), 2 = the one before it (what many fine-tunes expect).
    Textual-inversion embeddings loaded into models (sd.load_embedding) are used wherever a prompt names them.
    <lora:name:multiplier> in the prompt (AUTOMATIC1111's) merges lora_dir/name.safetensors into the weights for this
    call (sd.lora; LoRAs for every call: sd.apply_lora).
    rows: make only these images of the batch (prompt by prompt, num_images each), each exactly as a call without
    rows makes it: a process's share when several share a batch (sd generate under torchrun). Text to image only.
    """
    prompts, negatives = check_prompts(prompt, uncond_prompt, negative_prompt)
    check_models(models, needs_encoder=input_image is not None)
    height, width = default_size(models, height, width)
    check_inputs(models, input_image, mask_image, strength, cfg_scale, height, width, num_images, seed, generator,
                 sampler_name, eta, guidance_fn, guidance_fn_scale, paste_back, output_type, tokenizer, resize_mode,
                 nonfinite)
    check_prompt_options(models["clip"], clip_skip, prompt_syntax)
    prompts, loras = prompt_loras(prompts, negatives, lora_dir) if prompt_syntax == "a1111" else (prompts, [])
    if prompt_syntax == "plain" and any(extra_networks(p)[1] for p in prompts):
        warnings.warn("the prompt has <lora:...> tags, which prompt_syntax='plain' (sd: --plain-prompt) reads as text: "
                      "no LoRA is applied (apply_lora or sd --lora apply one)", stacklevel=2)
    speedups = Speedups(tome_ratio, deepcache_interval, attention_slice_size, vae_tiling)
    diffusion, decoder = models["diffusion"], models["decoder"]
    device = resolve_device(device, default=model_device(diffusion))
    idle_device = None if idle_device is None else resolve_device(idle_device)
    dtype = model_dtype(diffusion)  # the text encoder's output goes into the UNet in this dtype
    prompts = [p for p in prompts for _ in range(num_images)]
    negatives = [n for n in negatives for _ in range(num_images)]
    total = len(prompts)
    check_rows(rows, total, input_image)
    if rows is not None:  # this process's share of the batch (sd generate under torchrun)
        prompts, negatives = [prompts[i] for i in rows], [negatives[i] for i in rows]
    B = len(prompts)
    check_size(models, height, width, B, device, model_dtype(decoder), vae_tiling)
    generator = make_generator(seed, generator)
    if rows is not None:
        generator = BatchRows(generator, rows, total)
    # Cheap, and checks the sampler's name, step count (cut to strength) and options: still before any model runs.
    sampler = make_sampler(sampler_name, generator, n_inference_steps, strength if input_image is not None else None,
                           **({} if eta is None else {"eta": eta}))
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
    downscale = decoder.config.downscale
    latent_shape = (B, diffusion.config.out_channels, height // downscale, width // downscale)
    finite = FiniteCheck(nonfinite)

    def randn(shape) -> torch.Tensor:
        return draw_noise(shape, generator, STATE_DTYPE).to(device)

    image = mask = None
    if input_image is not None:
        image = image_to_tensor(input_image, width, height, resize_mode).to(device)  # (1, 3, H, W) float32
    if mask_image is not None:
        mask = mask_to_tensor(mask_image, width, height, resize_mode).to(device)  # (1, 1, H, W)

    with loras_applied(models, loras), torch.inference_mode(), restored_on_failure(models):
        with on_device(models["clip"], device, idle_device) as clip:
            conditioning = Conditioning(clip, negatives + prompts if do_cfg else prompts, len(sampler.timesteps),
                                        tokenizer, clip_skip, prompt_syntax, finite, dtype)
        with on_device(models.get("encoder") if image is not None else None, device, idle_device) as encoder:
            start = prepare_latents(encoder, sampler, randn, latent_shape, image, mask, strength,
                                    is_inpainting_unet(diffusion), finite, vae_tiling)
        noise_model = make_noise_model(diffusion, conditioning, do_cfg, cfg_scale, start.unet_extra, finite)
        if guidance_fn is not None:
            scale = GUIDANCE_FN_SCALE if guidance_fn_scale is None else guidance_fn_scale
            alphas_cumprod = make_alphas_cumprod(make_betas(sampler.n_training_steps))
            noise_model = with_guidance_fn(noise_model, decoder, guidance_fn, scale, alphas_cumprod, finite)
        # Attention maps: hooks only while sampling, on the conditional half of the UNet's batch under CFG.
        recording = contextlib.nullcontext() if attention_maps is None else attention_maps.recording(
            diffusion, slice(B, 2 * B) if do_cfg else slice(0, B),
            lambda: conditioning.token_ids(len(sampler.timesteps))[-B:], tokenizer, embedding_names(models["clip"]))
        with on_device(diffusion, device, idle_device), \
                on_device(decoder if guidance_fn is not None else None, device, None), recording, \
                speedups.applied(models):
            latents = denoise(sampler, start, noise_model, callback, progress, sampler_name, finite,
                              conditioning if conditioning.changes else None)
        with on_device(decoder, device, idle_device):
            images = decode(decoder, latents, *((image, mask) if paste_back else (None, None)), finite, vae_tiling)
    return to_output(images, output_type, batched=not isinstance(prompt, str) or num_images > 1)
