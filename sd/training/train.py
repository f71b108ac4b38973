"""Training: the VAE's objective, then the latent-diffusion objective, with checkpoints that resume exactly.

Tutorial part: "training", explained in the video but not coded in hkproj.
Original: CompVis ldm `ldm/models/diffusion/ddpm.py: LatentDiffusion.p_losses` and
`ldm/modules/losses/contperceptual.py`, as diffusers' `examples/text_to_image/train_text_to_image.py`.
References: Ho et al. 2020, eq. (14) (the simple loss); Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models"; Kingma & Welling 2014, "Auto-Encoding Variational Bayes" (the VAE).

Fine-tuning SD 1.5 on a GPU uses the same loop: load the checkpoint with
`models = preload_models_from_standard_weights(path, device="cuda")` (float32: the optimizer needs float32 weights,
autocast does the half-precision maths), run `train_diffusion(models, your_dataset, TrainConfig(device="cuda",
mixed_precision="bf16", batch_size=4, grad_accum=8, lr=1e-5, train_text_encoder=False), out_dir)` with a dataset of
(image in [-1, 1] of a multiple of 8 pixels, caption) pairs, then
`export(load_ema(models, checkpoint_path(out_dir, cfg.steps)), "fine-tuned.safetensors", dtype=torch.float16)`.
"""

import argparse
import copy
import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..checks import is_int, is_number
from ..clip import CLIPConfig
from ..ddpm import DDPMSampler
from ..decoder import VAE_Decoder, VAEConfig
from ..diffusion import DiffusionConfig
from ..encoder import VAE_Encoder
from ..model_loader import IMAGE_SIZE_METADATA_KEY, build_models, configs_from_json, save_standard_weights
from ..pipeline import generate
from ..schedule import N_TRAINING_STEPS
from ..tokenizer import tokenize
from .datasets import ShapesDataset

MIXED_PRECISION = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SAMPLER = "ddim"  # for the periodic sample images: deterministic and good in few steps


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 4
    lr: float = 1e-4                # diffusers' train_text_to_image default
    warmup_steps: int = 100         # linear warm-up from lr / warmup_steps to lr, then constant
    weight_decay: float = 1e-2      # AdamW's (diffusers' adam_weight_decay)
    grad_accum: int = 1             # micro-batches per optimizer step: effective batch = batch_size * grad_accum
    ema_decay: float = 0.9999       # ldm's LitEma; warmed up as min(decay, (1 + n) / (10 + n)) so short runs move too
    caption_dropout: float = 0.1    # share of captions replaced by "": trains the unconditional branch CFG needs
    train_text_encoder: bool = True # our embedded model trains CLIP from scratch; SD 1.5 froze it
    mixed_precision: str = "no"     # "no" | "bf16" (CPU or CUDA autocast) | "fp16" (CUDA only, with a GradScaler)
    grad_clip: float = 1.0          # max global gradient norm (diffusers' max_grad_norm); 0 turns clipping off
    sample_every: int = 0           # write sample PNGs with the EMA weights every this many steps (0: never)
    sample_prompts: tuple[str, ...] = ()
    sample_steps: int = 20          # sampler steps for those images
    checkpoint_every: int = 0       # also checkpoint every this many steps (the last step always is)
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        object.__setattr__(self, "sample_prompts", tuple(self.sample_prompts))  # accept a list; JSON gives one
        problems = []
        for name in ("steps", "batch_size", "grad_accum", "sample_steps"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "sample_every", "checkpoint_every", "seed"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                problems.append(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not (is_number(self.lr) and self.lr > 0):
            problems.append(f"lr must be a number > 0, got {self.lr!r}")
        for name in ("weight_decay", "grad_clip"):
            if not (is_number(getattr(self, name)) and getattr(self, name) >= 0):
                problems.append(f"{name} must be a number >= 0, got {getattr(self, name)!r}")
        for name in ("ema_decay", "caption_dropout"):
            if not (is_number(getattr(self, name)) and 0 <= getattr(self, name) <= 1):
                problems.append(f"{name} must be a number in [0, 1], got {getattr(self, name)!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            problems.append(f"mixed_precision must be one of {', '.join(map(repr, MIXED_PRECISION))}, "
                            f"got {self.mixed_precision!r}")
        try:
            device_type = torch.device(self.device).type
        except (RuntimeError, TypeError):
            problems.append(f"device must be a torch device such as 'cpu' or 'cuda', got {self.device!r}")
        else:
            if self.mixed_precision == "fp16" and device_type != "cuda":
                problems.append(f"mixed_precision='fp16' needs a CUDA device (got {self.device!r}); use 'bf16' on CPU")
        if self.sample_every and not (self.sample_prompts and all(isinstance(p, str) for p in self.sample_prompts)):
            problems.append("sample_every > 0 needs sample_prompts, a non-empty list of strings")
        if problems:
            raise ValueError(f"{type(self).__name__}: " + "; ".join(problems))


@dataclass(frozen=True)
class VAETrainConfig(TrainConfig):
    kl_weight: float = 1e-6         # ldm autoencoder_kl_*.yaml: kl_weight (against a reconstruction summed over pixels)
    reconstruction: str = "l1"      # "l1" (ldm's, without its LPIPS term) or "mse"

    def __post_init__(self):
        super().__post_init__()
        if not (is_number(self.kl_weight) and self.kl_weight >= 0):
            raise ValueError(f"VAETrainConfig: kl_weight must be a number >= 0, got {self.kl_weight!r}")
        if self.reconstruction not in ("l1", "mse"):
            raise ValueError(f"VAETrainConfig: reconstruction must be 'l1' or 'mse', got {self.reconstruction!r}")


# --- the schedule and the randomness: pure functions of the step ---------------------------------------------------

def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over warmup_steps (step 0 already gets lr / warmup_steps), then constant."""
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr


def ema_decay(step: int, decay: float) -> float:
    """ldm LitEma / diffusers EMAModel: a smaller decay for the first updates, so the average forgets the init."""
    return min(decay, (1 + step) / (10 + step))


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of everything random in one step, seeded from (seed, step) alone: a run resumed at step k
    draws exactly what the uninterrupted run drew. A CPU generator, so the draws don't depend on the device."""
    state = np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def sample_batch(dataset, n: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """n (image, caption) pairs drawn with replacement: each step's batch depends only on its own generator."""
    indices = torch.randint(len(dataset), (n,), generator=generator).tolist()
    items = [dataset[i] for i in indices]
    images = torch.stack([torch.as_tensor(image, dtype=torch.float32) for image, _ in items])  # (n, 3, H, W)
    if images.dim() != 4 or images.amin() < -1.001 or images.amax() > 1.001:
        raise ValueError(f"the dataset must yield images (3, H, W) in [-1, 1]; got a batch {tuple(images.shape)} "
                         f"in [{images.amin():.3g}, {images.amax():.3g}]")
    return images, [caption for _, caption in items]


# --- checkpoints ---------------------------------------------------------------------------------------------------

def checkpoint_path(out_dir: str | os.PathLike, step: int) -> Path:
    return Path(out_dir) / f"checkpoint-{step}.safetensors"


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    paths = Path(out_dir).glob("checkpoint-*.safetensors")
    steps = {int(p.stem.split("-")[1]): p for p in paths if p.stem.split("-")[1].isdigit()}
    return steps[max(steps)] if steps else None


def save_checkpoint(path: Path, step: int, trained: dict[str, nn.Module], ema: dict[str, nn.Module],
                    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, cfg: TrainConfig) -> Path:
    """Training weights (model.*), EMA weights (ema.*), AdamW's per-parameter state (optimizer.<param>.exp_avg,
    .exp_avg_sq, .step); the step, config and grad-scaler state go in the metadata as JSON."""
    from safetensors.torch import save_file

    tensors = {f"{kind}.{name}.{key}": value.detach().cpu().contiguous()
               for kind, models in (("model", trained), ("ema", ema))
               for name, model in models.items() for key, value in model.state_dict().items()}
    for param_name, param in _named_parameters(trained):
        for key, value in optimizer.state[param].items():
            tensors[f"optimizer.{param_name}.{key}"] = value.detach().cpu().contiguous()
    metadata = {"step": str(step), "train_config": json.dumps(dataclasses.asdict(cfg)),
                "grad_scaler": json.dumps(scaler.state_dict())}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path.with_suffix(".tmp")), metadata=metadata)
    os.replace(path.with_suffix(".tmp"), path)  # never leave a half-written checkpoint under the real name
    return path


def _named_parameters(models: dict[str, nn.Module]) -> list[tuple[str, nn.Parameter]]:
    return [(f"{name}.{key}", p) for name, model in models.items() for key, p in model.named_parameters()]


def _state_dict(tensors: dict[str, torch.Tensor], prefix: str, path) -> dict[str, torch.Tensor]:
    found = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
    if not found:
        raise ValueError(f"{path} holds no tensors {prefix}*: not a checkpoint of a run that trained these models")
    return found


def load_checkpoint(path, trained, ema, optimizer, scaler, cfg: TrainConfig) -> int:
    """Restore what save_checkpoint wrote; returns the number of steps done."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    if "step" not in metadata:
        raise ValueError(f"{path} is not a training checkpoint (no 'step' in its metadata)")
    saved = json.loads(metadata["train_config"])
    changed = [k for k, v in saved.items() if k != "steps" and v != json.loads(json.dumps(getattr(cfg, k, None)))]
    if changed:
        warnings.warn(f"resuming from {path} with changed settings {changed}: the run will differ from the original",
                      stacklevel=3)
    tensors = load_file(str(path))
    for kind, models in (("model", trained), ("ema", ema)):
        for name, model in models.items():
            model.load_state_dict(_state_dict(tensors, f"{kind}.{name}.", path), strict=True)
    state = {}
    for i, (param_name, _) in enumerate(_named_parameters(trained)):
        prefix = f"optimizer.{param_name}."
        state[i] = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    if scaler.is_enabled():
        scaler.load_state_dict(json.loads(metadata["grad_scaler"]))
    return int(metadata["step"])


def load_ema(models: dict[str, nn.Module], path: str | os.PathLike) -> dict[str, nn.Module]:
    """The models with the checkpoint's EMA weights: copies for the ones it trained, the others as they are."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    result = {}
    for name, model in models.items():
        if any(key.startswith(f"ema.{name}.") for key in tensors):
            model = copy.deepcopy(model)
            model.load_state_dict(_state_dict(tensors, f"ema.{name}.", path), strict=True)
        result[name] = model.eval()
    return result


def export(models: dict[str, nn.Module], path: str | os.PathLike, dtype: torch.dtype | None = None,
           metadata: dict[str, str] | None = None) -> Path:
    """Save the four models as a standard SD checkpoint (sd.model_loader.save_standard_weights);
    dtype=torch.float16 halves the file, and preload_models_from_standard_weights converts back on loading."""
    if dtype is not None:
        models = {name: copy.deepcopy(model).to(dtype) for name, model in models.items()}
    return save_standard_weights(models, path, metadata=metadata)


@torch.no_grad()
def fit_latent_scale(encoder: VAE_Encoder, dataset, n: int = 256, seed: int = 0) -> float:
    """The LDM paper's scale factor for a newly trained VAE: 1 / std of its (unscaled) latents over n training
    images, so the UNet sees latents of unit variance (for SD's VAE this is the 0.18215 of v1-inference.yaml)."""
    images = torch.stack([dataset[i][0] for i in range(n)]).to(next(encoder.parameters()).device)
    mean, log_variance = encoder.eval().moments(images)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed)).to(mean.device)
    z = mean + (0.5 * log_variance).exp() * noise
    return float(f"{1 / z.std().item():.5g}")


# --- the loop ------------------------------------------------------------------------------------------------------

def _fit(trained: dict[str, nn.Module], draw: Callable, loss_fn: Callable, cfg: TrainConfig, out_dir,
         resume_from, progress: bool, desc: str, on_sample: Callable | None = None) -> list[float]:
    """The loop both objectives share. draw(generator, n) returns everything random in one step for n samples
    (a tuple of batch-indexable items); loss_fn takes one micro-batch of them. Returns each step's loss."""
    device = torch.device(cfg.device)
    for model in trained.values():
        model.to(device).train().requires_grad_(True)
    named = _named_parameters(trained)
    if bad := [name for name, p in named if p.dtype != torch.float32]:
        raise ValueError(f"trained weights must be float32 (mixed_precision does the half-precision maths), "
                         f"but {bad[0]} is {dict(named)[bad[0]].dtype}; load the models with dtype=torch.float32")
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")
    ema = {name: copy.deepcopy(model).requires_grad_(False).eval() for name, model in trained.items()}
    start = load_checkpoint(resume_from, trained, ema, optimizer, scaler, cfg) if resume_from else 0
    amp_dtype = MIXED_PRECISION[cfg.mixed_precision]

    losses = []
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=desc, disable=not progress)
    for step in bar:
        # All of the step's randomness at once for the effective batch, so grad_accum x batch_size draws the same
        # samples as one batch of batch_size * grad_accum.
        batch = draw(step_generator(cfg.seed, step), cfg.batch_size * cfg.grad_accum)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        step_loss = 0.0
        for i in range(cfg.grad_accum):
            micro = [item[i * cfg.batch_size:(i + 1) * cfg.batch_size] for item in batch]
            with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                loss = loss_fn(*micro)
            scaler.scale(loss / cfg.grad_accum).backward()
            step_loss += loss.item() / cfg.grad_accum
        if cfg.grad_clip:
            scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            decay = ema_decay(step, cfg.ema_decay)
            for name, model in trained.items():  # ema <- decay * ema + (1 - decay) * weights
                torch._foreach_lerp_(list(ema[name].parameters()), list(model.parameters()), 1 - decay)
        losses.append(step_loss)
        bar.set_postfix(loss=f"{step_loss:.4f}")

        done = step + 1
        if done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
            save_checkpoint(checkpoint_path(out_dir, done), done, trained, ema, optimizer, scaler, cfg)
        if on_sample and cfg.sample_every and (done % cfg.sample_every == 0 or done == cfg.steps):
            on_sample(ema, done)
    for model in trained.values():
        model.eval()
    return losses


def train_vae(encoder: VAE_Encoder, decoder: VAE_Decoder, dataset, cfg: TrainConfig = VAETrainConfig(),
              out_dir: str | os.PathLike = "runs/vae", *, resume_from=None, progress: bool = True) -> list[float]:
    """The VAE objective: reconstruction + kl_weight * KL(N(mean, var) || N(0, I)), with z = mean + std * eps.

    ldm sums both terms over pixels; here both are divided by the pixel count, so the loss reads as a per-pixel
    error (Adam does not care about the constant). The captions of the dataset are ignored."""
    cfg = cfg if isinstance(cfg, VAETrainConfig) else VAETrainConfig(**dataclasses.asdict(cfg))
    device = torch.device(cfg.device)
    vae = encoder.config
    reconstruction_loss = F.l1_loss if cfg.reconstruction == "l1" else F.mse_loss

    def draw(generator, n):
        images, _ = sample_batch(dataset, n, generator)
        eps = torch.randn((n, vae.latent_channels, images.shape[2] // vae.downscale, images.shape[3] // vae.downscale),
                          generator=generator)
        return images, eps

    def loss_fn(images, eps):
        images = images.to(device)
        mean, log_variance = encoder.moments(images)  # (B, 4, h, w) each, unscaled
        z = mean + torch.exp(0.5 * log_variance) * eps.to(device)  # reparameterisation (Kingma & Welling eq. 10)
        reconstruction = decoder(z * decoder.config.latent_scale)  # the decoder takes scaled latents
        kl = 0.5 * (mean.square() + log_variance.exp() - 1 - log_variance).float().sum(dim=(1, 2, 3))  # (B,)
        return reconstruction_loss(reconstruction.float(), images) + cfg.kl_weight * kl.mean() / images[0].numel()

    return _fit({"encoder": encoder, "decoder": decoder}, draw, loss_fn, cfg, out_dir, resume_from, progress, "vae")


def train_diffusion(models: dict[str, nn.Module], dataset, cfg: TrainConfig = TrainConfig(),
                    out_dir: str | os.PathLike = "runs/diffusion", tokenizer=None, *, resume_from=None,
                    progress: bool = True) -> list[float]:
    """The latent-diffusion objective (Ho et al. eq. 14): || eps - eps_theta(x_t, c, t) ||^2, with
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t ~ U{0..999}, x_0 the frozen encoder's latents and
    c = CLIP(caption), the caption dropped to "" with probability caption_dropout.

    models: {"clip", "encoder", "decoder", "diffusion"}; trains the UNet (and CLIP when cfg.train_text_encoder)
    in place. The EMA weights are in the checkpoints: load_ema(models, checkpoint_path(out_dir, cfg.steps)).
    resume_from: a checkpoint of this run; it holds the trained models only, so pass the same frozen VAE."""
    device = torch.device(cfg.device)
    for model in models.values():
        model.to(device)
    encoder, clip = models["encoder"].eval(), models["clip"]
    diffusion_model = models["diffusion"]
    trained = {"diffusion": diffusion_model, **({"clip": clip} if cfg.train_text_encoder else {})}
    vae = encoder.config
    forward_process = DDPMSampler()
    height, width = dataset[0][0].shape[-2:]  # for the sample images

    def draw(generator, n):
        images, captions = sample_batch(dataset, n, generator)
        dropped = (torch.rand(n, generator=generator) < cfg.caption_dropout).tolist()
        captions = ["" if drop else caption for drop, caption in zip(dropped, captions)]
        latent_shape = (n, vae.latent_channels, images.shape[2] // vae.downscale, images.shape[3] // vae.downscale)
        encoder_noise = torch.randn(latent_shape, generator=generator)
        timesteps = torch.randint(N_TRAINING_STEPS, (n,), generator=generator)
        noise = torch.randn(latent_shape, generator=generator)
        return images, captions, encoder_noise, timesteps, noise

    def loss_fn(images, captions, encoder_noise, timesteps, noise):
        encoder_dtype = next(encoder.parameters()).dtype
        with torch.no_grad():  # the VAE is frozen: x_0 = a sample of its latent Gaussian, scaled
            latents = encoder(images.to(device, encoder_dtype), encoder_noise.to(device, encoder_dtype)).float()
        with torch.set_grad_enabled(cfg.train_text_encoder):
            context = clip(tokenize(captions, tokenizer).to(device))  # (B, 77, d_context)
        noise = noise.to(device)
        x_t = forward_process.add_noise(latents, timesteps, noise)  # q(x_t | x_0), one t per sample
        prediction = diffusion_model(x_t, context, timesteps.to(device))
        return F.mse_loss(prediction.float(), noise)

    def on_sample(ema, step):
        images = generate(list(cfg.sample_prompts), models={**models, **ema}, sampler_name=SAMPLER,
                          n_inference_steps=cfg.sample_steps, height=height, width=width, seed=cfg.seed,
                          tokenizer=tokenizer, progress=False, output_type="pil")
        (Path(out_dir) / "samples").mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            image.save(Path(out_dir) / "samples" / f"step-{step}-{i}.png")

    return _fit(trained, draw, loss_fn, cfg, out_dir, resume_from, progress, "diffusion", on_sample)


# --- `sd train` ----------------------------------------------------------------------------------------------------

def default_configs() -> dict:
    """A small text-to-image model for 32x32 shapes, trained from scratch in minutes (about 10M parameters,
    most of them CLIP's token embeddings): the VAE halves twice (32 px -> 8x8 latents)."""
    return {
        "clip": CLIPConfig(d_model=128, n_heads=4, n_layers=4, d_ff=512),
        "vae": VAEConfig(block_out_channels=(32, 64, 128), layers_per_block=1, n_groups=8),
        "diffusion": DiffusionConfig(model_channels=64, channel_mult=(1, 2, 2), n_res_blocks=1,
                                     attention_levels=(True, True, False), n_heads=4, d_context=128, n_groups=16),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sd train", description="Train a small text-to-image model on "
                                     "generated shapes: the VAE first, then the UNet and its text encoder.")
    parser.add_argument("--out", type=Path, required=True, help="folder for checkpoints and sample images")
    parser.add_argument("--steps", type=int, default=3000, help="diffusion steps")
    parser.add_argument("--vae-steps", type=int, default=1000, help="VAE steps (0: keep the VAE as it is)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--size", type=int, default=32, help="image size in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", type=Path,
                        help='JSON of model configs {"clip": {...}, "vae": {...}, "diffusion": {...}}')
    parser.add_argument("--resume", type=Path, help="a diffusion checkpoint to continue from")
    parser.add_argument("--export", type=Path, help="where to write the final model (default OUT/model.safetensors)")
    parser.add_argument("--mixed-precision", choices=list(MIXED_PRECISION), default="no")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    configs = {**default_configs(), **(configs_from_json(args.config.read_text()) if args.config else {})}
    # generate()'s default size for the exported model: the images it is trained on, in latents.
    configs["diffusion"] = dataclasses.replace(configs["diffusion"], sample_size=args.size // configs["vae"].downscale)
    models = build_models(configs, device=args.device)
    dataset = ShapesDataset(100_000, size=args.size, seed=args.seed)
    common = dict(batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
                  mixed_precision=args.mixed_precision, checkpoint_every=500)
    if args.vae_steps:  # picks up where an earlier run of this stage stopped
        vae_dir = args.out / "vae"
        train_vae(models["encoder"], models["decoder"], dataset, VAETrainConfig(steps=args.vae_steps, **common),
                  vae_dir, resume_from=latest_checkpoint(vae_dir))
        models.update({k: v for k, v in load_ema(models, checkpoint_path(vae_dir, args.vae_steps)).items()
                       if k in ("encoder", "decoder")})
        vae = dataclasses.replace(models["encoder"].config, latent_scale=fit_latent_scale(models["encoder"], dataset))
        models["encoder"].config = models["decoder"].config = vae
        print(f"VAE trained; latent scale 1 / std(latents) = {vae.latent_scale}")
    prompts = ("a red circle on a blue background", "a yellow square on a black background")
    cfg = TrainConfig(steps=args.steps, sample_every=500, sample_prompts=prompts, **common)
    train_diffusion(models, dataset, cfg, args.out / "diffusion", resume_from=args.resume)
    path = export(load_ema(models, checkpoint_path(args.out / "diffusion", args.steps)),
                  args.export or args.out / "model.safetensors", dtype=torch.float16,
                  metadata={IMAGE_SIZE_METADATA_KEY: str(args.size)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
