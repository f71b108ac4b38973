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

Ctrl-C: the step being computed is dropped, the last completed one is checkpointed, and TrainingInterrupted (a
KeyboardInterrupt) says where; a Ctrl-C while a step is applied or a file is written waits until it is done, and so
does a SIGTERM (`kill`). A NaN or inf loss, gradient norm or weight stops training with NonFiniteError, before
anything non-finite reaches the EMA weights or a file.
A checkpoint records its run (image size, model configs, digests of the frozen models) and resumes only that run.
"""

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..checks import NonFiniteError, is_finite_number, is_int, is_number
from ..conditioning import encode_captions
from ..ddpm import DDPMSampler
from ..decoder import VAE_Decoder
from ..devices import model_dtype
from ..encoder import VAE_Encoder
from ..files import atomic_output, save_image
from ..interrupts import deferred_sigint, remembered_interrupts
from ..model_loader import save_standard_weights
from ..pipeline import generate
from ..schedule import N_TRAINING_STEPS
from .distributed import SINGLE, World, mean_over_ranks
from .progress import LOSS_PLOT, TrainingLog, plot_losses

MIXED_PRECISION = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SAMPLER = "ddim"  # for the periodic sample images: deterministic and good in few steps
RUN_METADATA_KEY = "run"  # a checkpoint's run record (run_record): what it can only be resumed with
DIGEST_LENGTH = 16  # hex digits of sha256 kept for a frozen model's digest: 64 bits tell models apart


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
    prior_loss_weight: float = 1.0  # DreamBooth: the class images' loss counts this much (with a prior dataset)
    gradient_checkpointing: bool = False  # recompute the UNet's activations in backward: less memory, ~1/3 slower
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
        if not (is_finite_number(self.lr) and self.lr > 0):
            problems.append(f"lr must be a finite number > 0, got {self.lr!r}")
        for name in ("weight_decay", "grad_clip", "prior_loss_weight"):
            if not (is_finite_number(getattr(self, name)) and getattr(self, name) >= 0):
                problems.append(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
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
        if not (is_finite_number(self.kl_weight) and self.kl_weight >= 0):
            raise ValueError(f"VAETrainConfig: kl_weight must be a finite number >= 0, got {self.kl_weight!r}")
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


def sample_batch(dataset, n: int, generator: torch.Generator, positions: Sequence[int] | None = None
                 ) -> tuple[torch.Tensor, list[str]]:
    """n (image, caption) pairs drawn with replacement, of which only those at `positions` (default: all) are read:
    each step's batch depends only on its own generator, and a process of a distributed run reads only its share."""
    indices = torch.randint(len(dataset), (n,), generator=generator).tolist()
    items = [dataset[indices[i]] for i in (range(n) if positions is None else positions)]
    images = torch.stack([torch.as_tensor(image, dtype=torch.float32) for image, _ in items])  # (n, 3, H, W)
    if images.dim() != 4 or images.amin() < -1.001 or images.amax() > 1.001:
        raise ValueError(f"the dataset must yield images (3, H, W) in [-1, 1]; got a batch {tuple(images.shape)} "
                         f"in [{images.amin():.3g}, {images.amax():.3g}]")
    return images, [caption for _, caption in items]


# --- Ctrl-C --------------------------------------------------------------------------------------------------------

class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training after `step` of `steps` steps; `checkpoint` holds that step (None: no step was done).
    A KeyboardInterrupt, so whatever stops on Ctrl-C stops on it too."""

    def __init__(self, step: int, steps: int, checkpoint: Path | None):
        where = f"saved in {checkpoint}" if checkpoint else "nothing to save"
        super().__init__(f"interrupted after step {step} of {steps}; {where}")
        self.step, self.steps, self.checkpoint = step, steps, checkpoint


# --- checkpoints ---------------------------------------------------------------------------------------------------

def checkpoint_path(out_dir: str | os.PathLike, step: int) -> Path:
    return Path(out_dir) / f"checkpoint-{step}.safetensors"


def latest_checkpoint(out_dir: str | os.PathLike, at_most: int | None = None) -> Path | None:
    """The checkpoint of out_dir with the most steps (at most `at_most` of them, if given), or None."""
    paths = Path(out_dir).glob("checkpoint-*.safetensors")
    steps = {int(p.stem.split("-")[1]): p for p in paths if p.stem.split("-")[1].isdigit()}
    steps = {step: p for step, p in steps.items() if at_most is None or step <= at_most}
    return steps[max(steps)] if steps else None


def model_digest(model: nn.Module) -> str:
    """A short sha256 of a model's config and weights: the same for the same model on any device."""
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(model.config), sort_keys=True).encode())
    for key, value in model.state_dict().items():
        value = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}:{value.dtype}:".encode())
        digest.update(value.view(torch.uint8).numpy())
    return digest.hexdigest()[:DIGEST_LENGTH]


def run_record(image_size: Sequence[int], configs: dict, frozen: dict[str, str] | None = None) -> dict:
    """What a checkpoint resumes only with: the image size (H, W), the trained models' configs {name: config} and
    the digests {name: model_digest} of the frozen models the loss goes through (None: not checked). As JSON reads
    it back (tuples are lists)."""
    record = {"image_size": [int(n) for n in image_size],
              "models": {name: dataclasses.asdict(cfg) for name, cfg in configs.items()}}
    if frozen is not None:
        record["frozen"] = frozen
    return json.loads(json.dumps(record))


def _differences(saved, expected, name: str) -> list[str]:
    """'name: A in the checkpoint, B now' for each leaf where two JSON values differ."""
    if isinstance(saved, dict) and isinstance(expected, dict):
        return [line for key in sorted(saved.keys() | expected.keys())
                for line in _differences(saved.get(key), expected.get(key), f"{name}.{key}")]
    if saved == expected:
        return []
    return [f"{name}: {'not recorded' if saved is None else repr(saved)} in the checkpoint, {expected!r} now"]


def _read_metadata(path) -> dict[str, str]:
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable .safetensors checkpoint: {e}") from None


def check_resumable(path, cfg: TrainConfig, record: dict | None = None) -> dict[str, str]:
    """The checkpoint's metadata, once it is known to be one this run can go on from: a training checkpoint, at
    most cfg.steps steps in, written by the same run (each entry of record, from run_record, the same).
    A ValueError saying what differs otherwise."""
    metadata = _read_metadata(path)
    if "step" not in metadata:
        raise ValueError(f"{path} is not a training checkpoint (no 'step' in its metadata)")
    if int(metadata["step"]) > cfg.steps:
        raise ValueError(f"{path} is {metadata['step']} steps in, past the {cfg.steps} steps asked for; "
                         f"ask for at least {metadata['step']}")
    saved = json.loads(metadata.get(RUN_METADATA_KEY, "{}"))
    differences = [line for key in (record or {}) for line in _differences(saved.get(key), record[key], key)]
    if differences:
        raise ValueError(f"{path} was written by another run ({'; '.join(differences[:3])}"
                         f"{'; ...' if len(differences) > 3 else ''}): a checkpoint goes on only with the image "
                         f"size, model configs and frozen models it was trained with")
    return metadata


def save_checkpoint(path: Path, step: int, trained: dict[str, nn.Module], ema: dict[str, nn.Module],
                    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, cfg: TrainConfig,
                    record: dict | None = None, world_size: int = 1) -> Path:
    """Training weights (model.*), EMA weights (ema.*), AdamW's per-parameter state (optimizer.<param>.exp_avg,
    .exp_avg_sq, .step); the step, config, grad-scaler state and run record go in the metadata as JSON.
    Written whole or not at all (sd.files.atomic_output), and a Ctrl-C meanwhile waits until it is written."""
    tensors = {f"{kind}.{name}.{key}": value.detach().cpu().contiguous()
               for kind, models in (("model", trained), ("ema", ema))
               for name, model in models.items() for key, value in model.state_dict().items()}
    for param_name, param in _named_parameters(trained):
        for key, value in optimizer.state[param].items():
            tensors[f"optimizer.{param_name}.{key}"] = value.detach().cpu().contiguous()
    metadata = {"step": str(step), "train_config": json.dumps(dataclasses.asdict(cfg)), "world_size": str(world_size),
                "grad_scaler": json.dumps(scaler.state_dict()),
                **({RUN_METADATA_KEY: json.dumps(record)} if record is not None else {})}
    with deferred_sigint(), atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def _named_parameters(models: dict[str, nn.Module]) -> list[tuple[str, nn.Parameter]]:
    return [(f"{name}.{key}", p) for name, model in models.items() for key, p in model.named_parameters()]


def _state_dict(tensors: dict[str, torch.Tensor], prefix: str, path) -> dict[str, torch.Tensor]:
    found = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
    if not found:
        raise ValueError(f"{path} holds no tensors {prefix}*: not a checkpoint of a run that trained these models")
    return found


def _load_tensors(path) -> dict[str, torch.Tensor]:
    """load_file, with a Ctrl-C held until the read is done: safetensors turns one that lands inside it into a
    ValueError ("could not determine the shape of object type 'torch.storage.UntypedStorage'")."""
    with deferred_sigint():
        return load_file(str(path))


def load_checkpoint(path, trained, ema, optimizer, scaler, cfg: TrainConfig, record: dict | None = None,
                    world_size: int = 1) -> int:
    """Restore what save_checkpoint wrote, once check_resumable(path, cfg, record) passes; returns the steps done.
    Changed training settings only warn: a lower learning rate for the rest of a run is a choice. Any world size
    goes on from any other; only a changed effective batch (batch_size x processes) warns."""
    metadata = check_resumable(path, cfg, record)
    saved = json.loads(metadata["train_config"])
    saved["batch_size"] *= int(metadata.get("world_size", 1))  # compared as the effective batch
    now = {**dataclasses.asdict(cfg), "batch_size": cfg.batch_size * world_size}
    changed = [k for k, v in saved.items() if k != "steps" and v != json.loads(json.dumps(now.get(k)))]
    if changed:
        warnings.warn(f"resuming from {path} with changed settings {changed}: the run will differ from the original",
                      stacklevel=3)
    tensors = _load_tensors(path)
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
    tensors = _load_tensors(path)
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
    _check_exportable(models, path)
    return save_standard_weights(models, path, metadata=metadata)


def _check_exportable(models: dict[str, nn.Module], path) -> None:
    """NonFiniteError, before the file is written, if a weight is NaN or inf (in float16, beyond +-65504)."""
    for name, model in models.items():
        for key, value in model.state_dict().items():
            if value.is_floating_point() and not value.isfinite().all():
                raise NonFiniteError(f"cannot export {path}: {name}.{key} holds NaN or inf (in {value.dtype}); "
                                     f"nothing was written. Train with a lower --lr, or export in float32")


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

@dataclass
class _Run:
    """What the loop carries from step to step; all of it goes into a checkpoint."""
    trained: dict[str, nn.Module]
    ema: dict[str, nn.Module]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    params: list[nn.Parameter]
    world: World = SINGLE            # this process among the training processes (sd.training.distributed)
    ddp: DistributedDataParallel | None = None  # the loss of the trained models, on several processes
    done: int = 0                    # completed steps
    checkpoint: Path | None = None   # the file that holds checkpoint_step steps
    checkpoint_step: int = -1


class _Loss(nn.Module):
    """The trained models as one module whose forward is the loss: what DistributedDataParallel wraps, so that
    it all-reduces their gradients in the backward pass."""

    def __init__(self, trained: dict[str, nn.Module], loss_fn: Callable):
        super().__init__()
        self.trained = nn.ModuleDict(trained)
        self.loss_fn = loss_fn

    def forward(self, *micro):
        return self.loss_fn(*micro)


def _start(trained: dict[str, nn.Module], cfg: TrainConfig, resume_from, record: dict | None,
           world: World = SINGLE, loss_fn: Callable | None = None) -> _Run:
    """The models on the device in training mode, AdamW, the grad scaler and the EMA copies; restored if resuming.
    On several processes, the loss wrapped in DistributedDataParallel (which starts every rank from rank 0's
    weights)."""
    device = torch.device(cfg.device)
    for model in trained.values():
        model.to(device).train().requires_grad_(True)
    named = _named_parameters(trained)
    if bad := [name for name, p in named if p.dtype != torch.float32]:
        raise ValueError(f"trained weights must be float32 (mixed_precision does the half-precision maths), "
                         f"but {bad[0]} is {dict(named)[bad[0]].dtype}; load the models with dtype=torch.float32")
    params = [p for _, p in named]
    run = _Run(trained, {name: copy.deepcopy(model).requires_grad_(False).eval() for name, model in trained.items()},
               torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
               torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16"), params, world)
    if resume_from:
        run.done = load_checkpoint(resume_from, trained, run.ema, run.optimizer, run.scaler, cfg, record, world.size)
        run.checkpoint, run.checkpoint_step = Path(resume_from), run.done
    if world.size > 1:
        run.ddp = DistributedDataParallel(_Loss(trained, loss_fn), device_ids=[device] if device.type == "cuda" else None)
    return run


def _gradients(run: _Run, draw: Callable, loss_fn: Callable, cfg: TrainConfig, step: int) -> float:
    """Forward and backward over the step's micro-batches; returns the step's loss. The weights do not change
    here, so a Ctrl-C in the middle loses only this step."""
    device = torch.device(cfg.device)
    amp_dtype = MIXED_PRECISION[cfg.mixed_precision]
    # All of the step's randomness at once for the effective batch (every process, every micro-batch), of which
    # this process keeps its share: grad_accum x batch_size on N processes draws the same samples as one batch of
    # batch_size x N x grad_accum on one.
    world = run.world
    batch = draw(step_generator(cfg.seed, step), cfg.batch_size * world.size * cfg.grad_accum,
                 world.positions(cfg.batch_size, cfg.grad_accum))
    compute = run.ddp or loss_fn
    step_loss = 0.0
    for i in range(cfg.grad_accum):
        micro = [item[i * cfg.batch_size:(i + 1) * cfg.batch_size] for item in batch]
        accumulating = run.ddp is not None and i < cfg.grad_accum - 1  # all-reduce once, after the last one
        with run.ddp.no_sync() if accumulating else contextlib.nullcontext():
            with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                loss = compute(*micro)
            run.scaler.scale(loss / cfg.grad_accum).backward()
        step_loss += loss.item() / cfg.grad_accum
    return mean_over_ranks(step_loss, world, device)


def _non_finite(stage: str, step: int, what: str) -> NonFiniteError:
    """Step `step` counted from 1 in the message, as the progress bar counts."""
    return NonFiniteError(f"{stage} step {step + 1}: {what}; training stopped before the step changed any weight, and "
                          f"nothing non-finite was saved. The learning rate is likely too high: try a lower --lr")


def _clip_gradients(run: _Run, cfg: TrainConfig, stage: str, step: int) -> None:
    """Unscale the gradients and clip their global norm to grad_clip (0: not clipped, but still measured); a
    non-finite norm stops training before the step. Under fp16 an inf or NaN gradient is the GradScaler's scale
    being too high: it skips that step and lowers its scale itself, so that one goes on."""
    run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the fp16-scaled ones (a no-op without fp16)
    norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip or math.inf)  # max inf: multiplies by 1.0
    if not run.scaler.is_enabled() and not torch.isfinite(norm):
        raise _non_finite(stage, step, f"the gradient norm is {norm.item()}")


def _check_weights_finite(run: _Run, stage: str, step: int) -> None:
    """After AdamW's step, before the EMA and any checkpoint take the weights: a finite loss and gradient can
    still overflow a weight (a huge learning rate times the weight decay)."""
    if not torch.stack([p.isfinite().all() for p in run.params]).all():
        raise NonFiniteError(f"{stage} step {step + 1}: the step made weights non-finite; training stopped before the "
                             f"EMA weights or a checkpoint took them. The learning rate is likely too high: try a "
                             f"lower --lr")


def _update(run: _Run, cfg: TrainConfig, stage: str, step: int) -> None:
    """AdamW's step with the accumulated gradients, then the EMA update: step `step` is done. NonFiniteError
    (before the EMA changes) if the gradients or the new weights are not finite."""
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(step, cfg)
    _clip_gradients(run, cfg, stage, step)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    _check_weights_finite(run, stage, step)
    with torch.no_grad():
        decay = ema_decay(step, cfg.ema_decay)
        for name, model in run.trained.items():  # ema <- decay * ema + (1 - decay) * weights
            torch._foreach_lerp_(list(run.ema[name].parameters()), list(model.parameters()), 1 - decay)
    run.done = step + 1


def _save(run: _Run, out_dir, cfg: TrainConfig, record: dict | None) -> None:
    """The checkpoint of the steps done, written by rank 0 alone (every rank holds the same weights)."""
    run.checkpoint = checkpoint_path(out_dir, run.done)
    if run.world.is_main:
        save_checkpoint(run.checkpoint, run.done, run.trained, run.ema, run.optimizer, run.scaler, cfg, record,
                        run.world.size)
    run.checkpoint_step = run.done


def _due(done: int, every: int, steps: int) -> bool:
    return done == steps or bool(every and done % every == 0)


def _save_final(run: _Run, out_dir, cfg: TrainConfig, record: dict | None) -> None:
    """The last step is always checkpointed in out_dir, also when a resumed run had no step left to do."""
    final = checkpoint_path(out_dir, cfg.steps)
    if run.checkpoint_step != cfg.steps or run.checkpoint.resolve() != final.resolve():
        _save(run, out_dir, cfg, record)


def _interrupted(run: _Run, out_dir, cfg: TrainConfig, record: dict | None) -> TrainingInterrupted:
    """After a Ctrl-C: drop the partial step's gradients and checkpoint the last completed step, unless a file
    holds it already. A second Ctrl-C while that file is written is dropped: training is stopping anyway."""
    with deferred_sigint(deliver=False):
        run.optimizer.zero_grad(set_to_none=True)
        if run.done and run.checkpoint_step != run.done:
            _save(run, out_dir, cfg, record)
    return TrainingInterrupted(run.done, cfg.steps, run.checkpoint if run.checkpoint_step == run.done else None)


def _step(run: _Run, draw: Callable, loss_fn: Callable, cfg: TrainConfig, stage: str, step: int, out_dir,
          record: dict | None) -> float:
    """One step: its gradients (a Ctrl-C there drops the step), then its update and checkpoint, done whole (a
    Ctrl-C there stops after them). Returns the step's loss; NonFiniteError before the update if it is not finite."""
    loss = _gradients(run, draw, loss_fn, cfg, step)
    if not math.isfinite(loss):
        raise _non_finite(stage, step, f"the loss is {loss}")
    with deferred_sigint():
        _update(run, cfg, stage, step)
        if _due(run.done, cfg.checkpoint_every, cfg.steps):
            _save(run, out_dir, cfg, record)
    return loss


def _fit(trained: dict[str, nn.Module], draw: Callable, loss_fn: Callable, cfg: TrainConfig, out_dir,
         resume_from, progress: bool, desc: str, on_sample: Callable | None = None,
         record: dict | None = None, world: World = SINGLE) -> list[float]:
    """The loop every objective shares. draw(generator, n, positions) draws everything random in one step for n
    samples and returns the samples at positions (a tuple of batch-indexable items); loss_fn takes one micro-batch
    of them. Returns each step's loss (on several processes: its mean over them).
    record (run_record) goes into every checkpoint, and a resumed checkpoint must have the same. Rank 0 writes
    the checkpoints, out_dir/log.csv (step, loss, lr, seconds) and, at the end, out_dir/loss.png.
    Ctrl-C (or SIGTERM): raises TrainingInterrupted once the last completed step is checkpointed (see
    _interrupted). A non-finite loss, gradient norm or weight: NonFiniteError naming the stage (desc) and step,
    before the EMA or a checkpoint takes it."""
    run = _start(trained, cfg, resume_from, record, world, loss_fn)
    losses = []
    log = TrainingLog(out_dir, run.done) if world.is_main else None
    started = time.monotonic()
    bar = tqdm(range(run.done, cfg.steps), initial=run.done, total=cfg.steps, desc=desc,
               disable=not (progress and world.is_main))
    with remembered_interrupts() as sigints:
        try:
            for step in bar:
                if sigints:
                    raise KeyboardInterrupt  # a Ctrl-C whose exception was lost on its way
                losses.append(_step(run, draw, loss_fn, cfg, desc, step, out_dir, record))
                bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{learning_rate(step, cfg):.3g}")
                if log is not None:
                    log.add(run.done, losses[-1], learning_rate(step, cfg), time.monotonic() - started)
                if on_sample and cfg.sample_every and world.is_main and _due(run.done, cfg.sample_every, cfg.steps):
                    on_sample(run.ema, run.done)
            _save_final(run, out_dir, cfg, record)
        except BaseException as error:
            if not (sigints or isinstance(error, KeyboardInterrupt)):
                raise
            raise _interrupted(run, out_dir, cfg, record) from error
        finally:
            bar.close()
            for model in trained.values():
                model.eval()
            if log is not None:
                log.close()
            if log is not None and log.rows:
                with deferred_sigint(deliver=False):
                    plot_losses(log.rows, Path(out_dir) / LOSS_PLOT)
    return losses


def _image_size(dataset) -> tuple[int, int]:
    height, width = torch.as_tensor(dataset[0][0]).shape[-2:]
    return int(height), int(width)


def train_vae(encoder: VAE_Encoder, decoder: VAE_Decoder, dataset, cfg: TrainConfig = VAETrainConfig(),
              out_dir: str | os.PathLike = "runs/vae", *, resume_from=None, progress: bool = True,
              world: World = SINGLE) -> list[float]:
    """The VAE objective: reconstruction + kl_weight * KL(N(mean, var) || N(0, I)), with z = mean + std * eps.

    ldm sums both terms over pixels; here both are divided by the pixel count, so the loss reads as a per-pixel
    error (Adam does not care about the constant). The captions of the dataset are ignored."""
    cfg = cfg if isinstance(cfg, VAETrainConfig) else VAETrainConfig(**dataclasses.asdict(cfg))
    device = torch.device(cfg.device)
    vae = encoder.config
    reconstruction_loss = F.l1_loss if cfg.reconstruction == "l1" else F.mse_loss
    record = run_record(_image_size(dataset), {"encoder": encoder.config, "decoder": decoder.config}, frozen={})

    def draw(generator, n, positions):
        images, _ = sample_batch(dataset, n, generator, positions)
        eps = torch.randn((n, vae.latent_channels, images.shape[2] // vae.downscale, images.shape[3] // vae.downscale),
                          generator=generator)
        return images, eps[positions]

    def loss_fn(images, eps):
        images = images.to(device)
        mean, log_variance = encoder.moments(images)  # (B, 4, h, w) each, unscaled
        z = mean + torch.exp(0.5 * log_variance) * eps.to(device)  # reparameterisation (Kingma & Welling eq. 10)
        reconstruction = decoder(z * decoder.config.latent_scale)  # the decoder takes scaled latents
        kl = 0.5 * (mean.square() + log_variance.exp() - 1 - log_variance).float().sum(dim=(1, 2, 3))  # (B,)
        return reconstruction_loss(reconstruction.float(), images) + cfg.kl_weight * kl.mean() / images[0].numel()

    return _fit({"encoder": encoder, "decoder": decoder}, draw, loss_fn, cfg, out_dir, resume_from, progress, "vae",
                record=record, world=world)


def train_diffusion(models: dict[str, nn.Module], dataset, cfg: TrainConfig = TrainConfig(),
                    out_dir: str | os.PathLike = "runs/diffusion", tokenizer=None, *, resume_from=None,
                    progress: bool = True, lora=None, prior_dataset=None, world: World = SINGLE) -> list[float]:
    """The latent-diffusion objective (Ho et al. eq. 14): || eps - eps_theta(x_t, c, t) ||^2, with
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t ~ U{0..999}, x_0 the frozen encoder's latents and
    c = CLIP(caption) through generate's prompt path, the caption dropped to "" with probability caption_dropout.

    models: {"clip", "encoder", "decoder", "diffusion"}; trains the UNet (and CLIP when cfg.train_text_encoder)
    in place. The EMA weights are in the checkpoints: load_ema(models, checkpoint_path(out_dir, cfg.steps)).
    lora: a sd.training.lora_network.LoraNetwork on these models: only its pairs are trained, the models stay
    frozen (and may be bfloat16 or float16). prior_dataset: DreamBooth's prior preservation (Ruiz et al. 2023,
    eq. 2): each step also takes as many class images, whose loss counts cfg.prior_loss_weight.
    resume_from: a checkpoint of this run; it holds the trained weights only, so pass the same frozen models: a
    checkpoint trained with other ones is refused. world: this process of a torchrun run (distributed.World)."""
    device = torch.device(cfg.device)
    for model in models.values():
        model.to(device)
    encoder, clip, diffusion_model = models["encoder"].eval(), models["clip"], models["diffusion"]
    trained, text_grad = _trained_models(models, cfg, lora)
    diffusion_model.unet.gradient_checkpointing = cfg.gradient_checkpointing
    vae = encoder.config
    forward_process = DDPMSampler()
    height, width = _image_size(dataset)  # for the sample images
    frozen = {name: model_digest(models[name]) for name in ("encoder", "clip", "diffusion") if name not in trained}
    configs = {"lora": lora.config} if lora is not None else {name: m.config for name, m in trained.items()}
    record = run_record((height, width), configs, frozen)

    def draw(generator, n, positions):
        items = _draw_diffusion(dataset, n, generator, positions, cfg, vae)
        if prior_dataset is None:
            return items
        return items + _draw_diffusion(prior_dataset, n, generator, positions, cfg, vae)  # each sample's class one

    def loss_fn(*micro):
        if prior_dataset is None:
            return F.mse_loss(*predicted_and_true_noise(*micro))
        # The instance samples and their class samples through the UNet as one batch, as diffusers' DreamBooth.
        n_items = len(micro) // 2
        joined = [torch.cat([a, b]) if torch.is_tensor(a) else [*a, *b] for a, b in zip(micro[:n_items], micro[n_items:])]
        prediction, noise = predicted_and_true_noise(*joined)
        half = prediction.shape[0] // 2
        return (F.mse_loss(prediction[:half], noise[:half])
                + cfg.prior_loss_weight * F.mse_loss(prediction[half:], noise[half:]))

    def predicted_and_true_noise(images, captions, encoder_noise, timesteps, noise):
        with torch.no_grad():  # the VAE is frozen: x_0 = a sample of its latent Gaussian, scaled
            latents = encoder(*(t.to(device, model_dtype(encoder)) for t in (images, encoder_noise))).float()
        with torch.set_grad_enabled(text_grad):
            context = encode_captions(clip, captions, tokenizer)  # (B, 77·k, d_context)
        noise = noise.to(device)
        x_t = forward_process.add_noise(latents, timesteps, noise)  # q(x_t | x_0), one t per sample
        dtype = model_dtype(diffusion_model)
        return diffusion_model(x_t.to(dtype), context.to(dtype), timesteps.to(device)).float(), noise

    def on_sample(ema, step):
        images = generate(list(cfg.sample_prompts), models={**models, **ema}, sampler_name=SAMPLER,
                          n_inference_steps=cfg.sample_steps, height=height, width=width, seed=cfg.seed,
                          tokenizer=tokenizer, progress=False, output_type="pil")
        with deferred_sigint():
            for i, image in enumerate(images):
                save_image(image, Path(out_dir) / "samples" / f"step-{step}-{i}.png", overwrite=True)

    def on_lora_sample(ema, step):
        with lora.swapped(ema["lora"]):
            on_sample({}, step)

    try:
        return _fit(trained, draw, loss_fn, cfg, out_dir, resume_from, progress, "diffusion",
                    on_lora_sample if lora is not None else on_sample, record, world)
    finally:
        diffusion_model.unet.gradient_checkpointing = False


def _trained_models(models: dict[str, nn.Module], cfg: TrainConfig, lora) -> tuple[dict[str, nn.Module], bool]:
    """What the optimizer trains ({"lora": its pairs}, or the UNet and maybe CLIP) and whether gradients go
    through CLIP; the rest frozen."""
    for model in models.values():
        model.requires_grad_(False)
    if lora is None:
        trained = {"diffusion": models["diffusion"], **({"clip": models["clip"]} if cfg.train_text_encoder else {})}
        return trained, cfg.train_text_encoder
    if cfg.train_text_encoder:
        raise ValueError("train_text_encoder trains all of CLIP; with a LoRA, give the LoraNetwork "
                         "text_encoder=True instead (its pairs on CLIP are trained, CLIP stays frozen)")
    missing = [name for name in ("diffusion", "clip") if lora.models[name] is not models[name]]
    if missing:
        raise ValueError(f"the LoRA was made on other models than these ({', '.join(missing)}): make the "
                         f"LoraNetwork on the models it trains with")
    return {"lora": lora.pairs}, lora.config.text_encoder


def _draw_diffusion(dataset, n: int, generator: torch.Generator, positions: Sequence[int], cfg: TrainConfig, vae):
    """One step's randomness for n samples, those at positions kept: images, captions (some dropped to ""), the
    encoder's noise, the timesteps and the noise added."""
    images, captions = sample_batch(dataset, n, generator, positions)
    dropped = (torch.rand(n, generator=generator) < cfg.caption_dropout)[positions].tolist()
    captions = ["" if drop else caption for drop, caption in zip(dropped, captions)]
    latent_shape = (n, vae.latent_channels, images.shape[2] // vae.downscale, images.shape[3] // vae.downscale)
    encoder_noise = torch.randn(latent_shape, generator=generator)[positions]
    timesteps = torch.randint(N_TRAINING_STEPS, (n,), generator=generator)[positions]
    noise = torch.randn(latent_shape, generator=generator)[positions]
    return images, captions, encoder_noise, timesteps, noise
