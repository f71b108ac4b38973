"""`sd train --data DIR`: fine-tune a model on your own pictures, as a LoRA (--lora-rank) or whole, optionally
DreamBooth-style with prior preservation, on one process or many (torchrun).

No tutorial counterpart. References: Hu et al. 2021 (LoRA), Ruiz et al. 2023 (DreamBooth: an instance prompt
with a rare token, "a sks dog", and class images of the base model that keep it from forgetting the class), and
kohya-ss's sd-scripts for the options' meaning and the LoRA file. The loop is sd/training/train.py's
train_diffusion; this file checks every option before a model loads (make_finetune_plan), loads the base, makes
the class images, trains, and writes OUT/lora.safetensors (a LoRA) or OUT/model.safetensors (a full fine-tune).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint_io import CheckpointError
from ..checks import check, is_finite_number
from ..files import save_image
from ..interrupts import deferred_sigint
from ..model_loader import model_configs, preload_models_from_standard_weights
from ..pipeline import DECODER_LIVE_TENSORS, device_memory, generate
from .distributed import SINGLE, World, process_device, process_group, world_from_env
from .image_folder import LATENT_MULTIPLE, ImageFolderDataset, captions, image_files
from .lora_network import TARGET_GROUPS, LoraNetwork, save_lora
from .train import TrainConfig, checkpoint_path, check_resumable, export, latest_checkpoint, load_ema, train_diffusion

BASE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CHECKPOINTS = "checkpoints"  # OUT/checkpoints: a fine-tune's training checkpoints
LORA_LR, FULL_LR = 1e-4, 1e-5  # kohya's LoRA default; diffusers' SD fine-tuning examples
DEFAULT_STEPS = 1000
CLASS_STEPS = 20  # sampler steps for each class image


@dataclass(frozen=True)
class FinetunePlan:
    """What `sd train --data` will do, every part checked before the base model loads."""
    checkpoint: Path | None           # the base model (None: the embedded model)
    dataset: ImageFolderDataset
    class_folder: Path | None         # DreamBooth's class images (None: no prior preservation)
    cfg: TrainConfig
    base_dtype: torch.dtype
    export_path: Path
    world: World


def add_finetune_options(parser) -> None:
    """The options of fine-tuning on a folder of pictures, as kohya-ss's basics name them."""
    group = parser.add_argument_group("fine-tuning on your own pictures (--data)")
    group.add_argument("--data", type=Path, help="a folder of images with captions: img.txt beside img.png, a "
                       "metadata.jsonl, or --caption for all; this turns on fine-tuning")
    group.add_argument("--checkpoint", type=Path, help="the base model (.safetensors, .ckpt or a diffusers "
                       "folder; default: the embedded model)")
    group.add_argument("--caption", help="one caption for every image: DreamBooth's instance prompt, 'a sks dog'")
    group.add_argument("--flip", action="store_true", help="also train on every image mirrored left to right")
    group.add_argument("--lora-rank", type=int, help="train a LoRA of this rank (kohya's network_dim); without it "
                       "the whole UNet is fine-tuned")
    group.add_argument("--lora-alpha", type=float, help="the LoRA's alpha: its scale is alpha / rank (default rank)")
    group.add_argument("--lora-targets", default="attention,feed_forward,projection",
                       help=f"comma-separated, of {', '.join(TARGET_GROUPS)} (conv: LoCon)")
    group.add_argument("--train-text-encoder", action="store_true",
                       help="a LoRA: pairs on CLIP too; a full fine-tune: train CLIP too")
    group.add_argument("--base-dtype", choices=list(BASE_DTYPES), default="fp32",
                       help="the frozen base model's dtype for a LoRA (the LoRA itself stays fp32); bf16 on a CPU")
    group.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute the UNet's activations in backward: far less memory, about 1/3 slower")
    group.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    group.add_argument("--caption-dropout", type=float, default=0.0, help="share of captions trained as ''")
    group.add_argument("--class-data", type=Path, help="DreamBooth prior preservation: a folder of class images; the "
                       "base model fills it up to --num-class-images")
    group.add_argument("--class-prompt", help="the class images' prompt and caption, 'a dog'")
    group.add_argument("--num-class-images", type=int, default=100)
    group.add_argument("--prior-loss-weight", type=float, default=1.0)
    group.add_argument("--sample-prompt", action="append", default=[],
                       help="a prompt for the sample images (repeatable; default: the caption of the first image)")


def check_not_shapes_options(args) -> None:
    """The shapes model's own options mean nothing with --data."""
    for option, value in (("--vae-steps", args.vae_steps), ("--config", args.config)):
        check(value is None, f"{option} belongs to training the shapes model from scratch; with --data the base "
              f"model's VAE and configs stay as they are")


def check_finetune_only_options(args) -> None:
    """Fine-tuning's options mean nothing without --data."""
    given = [name for name, value in (("--checkpoint", args.checkpoint), ("--caption", args.caption),
                                      ("--lora-rank", args.lora_rank), ("--class-data", args.class_data))
             if value is not None]
    check(not given, f"{given[0] if given else ''} needs --data, the folder of pictures to fine-tune on")


def _check_numbers(args) -> None:
    for option, value in (("--steps", args.steps), ("--batch-size", args.batch_size),
                          ("--grad-accum", args.grad_accum), ("--num-class-images", args.num_class_images)):
        check(value > 0, f"{option} must be a positive integer, got {value}")
    check(args.lora_rank is None or args.lora_rank > 0, f"--lora-rank must be a positive integer, got {args.lora_rank}")
    check(args.lora_alpha is None or (is_finite_number(args.lora_alpha) and args.lora_alpha > 0),
          f"--lora-alpha must be a finite number > 0, got {args.lora_alpha}")
    check(args.lora_alpha is None or args.lora_rank is not None, "--lora-alpha needs --lora-rank")
    check(is_finite_number(args.caption_dropout) and 0 <= args.caption_dropout <= 1,
          f"--caption-dropout must be a number from 0 to 1, got {args.caption_dropout}")
    check(is_finite_number(args.prior_loss_weight) and args.prior_loss_weight >= 0,
          f"--prior-loss-weight must be a finite number >= 0, got {args.prior_loss_weight}")


def lora_targets(args) -> tuple[str, ...]:
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    unknown = [t for t in targets if t not in TARGET_GROUPS]
    check(targets and not unknown, f"--lora-targets must be some of {', '.join(TARGET_GROUPS)}, comma-separated, "
          f"got {args.lora_targets!r}")
    return targets


def _base_configs(args) -> dict:
    """The base model's configs, read from its file alone (the weights load later)."""
    from ..cli import EMBEDDED_CHECKPOINT
    path = args.checkpoint or Path(EMBEDDED_CHECKPOINT)
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint {path}: no such file or folder")
    try:
        return model_configs(path)
    except CheckpointError as e:
        raise ValueError(f"--checkpoint {path}: {e}") from None


def _size(args, configs: dict) -> int:
    """--size, or the base model's own training size; a multiple of the VAE's downscale."""
    downscale = configs["vae"].downscale
    size = args.size if args.size is not None else configs["diffusion"].sample_size * downscale
    multiple = math.lcm(downscale, LATENT_MULTIPLE)
    check(size >= multiple and size % multiple == 0,
          f"--size must be a positive multiple of {multiple} pixels (the VAE's downscale), got {size}")
    return size


def _check_memory(args, configs: dict, size: int, device: str) -> None:
    """Refuse a --size and --batch-size whose images cannot fit, before any is read: a floor, the VAE encoder's
    activations at full resolution (as generate's check of the decoder), for the instance and class images."""
    vae = configs["vae"]
    batch = args.batch_size * (2 if args.class_data is not None else 1)
    need = DECODER_LIVE_TENSORS * batch * vae.block_out_channels[0] * size * size * torch.float32.itemsize
    have = device_memory(torch.device(device))
    check(have is None or need <= have, f"--size {size} with {batch} image(s) a step needs at least "
          f"{need / 2**30:.0f} GB in the VAE encoder alone, and {device} has {(have or 0) / 2**30:.0f} GB: give a "
          f"smaller --size or --batch-size")


def _base_dtype(args, device: str) -> torch.dtype:
    dtype = BASE_DTYPES[args.base_dtype]
    check(dtype == torch.float32 or args.lora_rank is not None, f"--base-dtype {args.base_dtype} keeps the base frozen "
          f"in half precision, which only a LoRA allows: a full fine-tune trains float32 weights (use "
          f"--mixed-precision bf16 for its speed)")
    check(dtype != torch.float16 or torch.device(device).type == "cuda",
          "--base-dtype fp16 needs a CUDA device; use bf16 on a CPU")
    check(args.mixed_precision == "no" or dtype == torch.float32,
          "--mixed-precision is for a float32 base; with --base-dtype bf16 or fp16 the base already computes in it")
    return dtype


def _class_folder(args) -> Path | None:
    if args.class_data is None:
        check(args.class_prompt is None, "--class-prompt needs --class-data, the folder for the class images")
        return None
    check(args.class_prompt, "--class-data needs --class-prompt, the prompt its images are made with ('a dog')")
    check(not args.class_data.exists() or args.class_data.is_dir(), f"--class-data {args.class_data} is a file; "
          f"give a folder")
    check(args.class_data.resolve() != args.data.resolve(), "--class-data must be another folder than --data")
    if args.class_data.is_dir():  # what would refuse it as a dataset, said before the class images are made
        captions(args.class_data, image_files(args.class_data, required=False), args.class_prompt)
    return args.class_data


def _train_config(args, device: str, dataset: ImageFolderDataset) -> TrainConfig:
    lr = args.lr if args.lr is not None else LORA_LR if args.lora_rank else FULL_LR
    check(is_finite_number(lr) and lr > 0, f"--lr must be a finite number > 0, got {lr}")
    prompts = tuple(args.sample_prompt) or (dataset.captions[0],)
    return TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=lr, grad_accum=args.grad_accum, seed=args.seed,
        caption_dropout=args.caption_dropout, device=device, mixed_precision=args.mixed_precision,
        train_text_encoder=args.train_text_encoder and not args.lora_rank, warmup_steps=min(100, args.steps // 10),
        ema_decay=0.0 if args.lora_rank else TrainConfig.ema_decay,  # kohya keeps no EMA of a LoRA
        gradient_checkpointing=args.gradient_checkpointing, prior_loss_weight=args.prior_loss_weight,
        checkpoint_every=args.checkpoint_every, sample_every=args.sample_every, sample_prompts=prompts)


def _check_outputs(args, cfg: TrainConfig) -> Path:
    """The export path, and nothing replaced without --overwrite; a --resume checkpoint of OUT/checkpoints."""
    from .command import check_export_path  # the shapes command's checks of --out and --export
    export_path = check_export_path(args, "lora.safetensors" if args.lora_rank else "model.safetensors")
    check(not args.lora_rank or export_path.suffix == ".safetensors",
          f"a LoRA is written as .safetensors, got --export {export_path.name!r}")
    folder = args.out / CHECKPOINTS
    if args.resume is not None:
        check(args.resume.resolve().parent == folder.resolve(), f"--resume {args.resume} is not in {folder}: give a "
              f"checkpoint of this run, such as {checkpoint_path(folder, 500)}")
        check_resumable(args.resume, cfg)
    if not args.overwrite:
        check(not export_path.exists(), f"--export {export_path} already exists: give another --export, or "
              f"--overwrite to replace it")
        latest = latest_checkpoint(folder)
        check(args.resume is not None or latest is None, f"{folder} already holds checkpoints of a run: go on with "
              f"--resume {latest}, use another --out, or --overwrite to start again")
    return export_path


def make_finetune_plan(args, device: str, world: World = SINGLE) -> FinetunePlan:
    """Every check of the arguments, made before the base model loads."""
    check_not_shapes_options(args)
    _check_numbers(args)
    if args.lora_rank:
        lora_targets(args)  # checked here; used when the network is made
    configs = _base_configs(args)
    size = _size(args, configs)
    _check_memory(args, configs, size, device)
    base_dtype = _base_dtype(args, device)
    class_folder = _class_folder(args)
    dataset = ImageFolderDataset(args.data, size, caption=args.caption, flip=args.flip)
    cfg = _train_config(args, device, dataset)
    export_path = _check_outputs(args, cfg)
    return FinetunePlan(args.checkpoint, dataset, class_folder, cfg, base_dtype, export_path, world)


def _say(world: World, *args) -> None:
    if world.is_main:
        print(*args, file=sys.stderr)


def make_class_images(models: dict, folder: Path, prompt: str, n: int, size: int, seed: int, world: World) -> None:
    """Fill folder up to n class images of the base model, class-<i>.png from seed + i, written whole: a run that
    is stopped keeps the ones done, and the next run makes only the rest. Rank 0 makes them; the others wait."""
    if world.is_main:
        have = len(image_files(folder, required=False)) if folder.is_dir() else 0
        missing = list(range(have, n))
        if missing:
            print(f"sd train: making {len(missing)} class images of {prompt!r} in {folder} with the base model",
                  file=sys.stderr)
        for i in missing:
            image = generate(prompt, models=models, seed=seed + i, height=size, width=size,
                             n_inference_steps=CLASS_STEPS, sampler_name="dpmpp_2m", progress=False,
                             output_type="pil")[0]
            with deferred_sigint():
                save_image(image, folder / f"class-{i:04d}.png")
    if world.size > 1:
        torch.distributed.barrier()


def _load_base(plan: FinetunePlan) -> dict:
    from ..cli import EMBEDDED_CHECKPOINT
    return preload_models_from_standard_weights(plan.checkpoint or EMBEDDED_CHECKPOINT, device=plan.cfg.device,
                                                dtype=plan.base_dtype)


def _make_network(models: dict, args, seed: int) -> LoraNetwork:
    """The LoRA, its down weights drawn from seed (built on the CPU, so the same for any device)."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        return LoraNetwork(models, args.lora_rank, args.lora_alpha, lora_targets(args), args.train_text_encoder)


def _settings(args, plan: FinetunePlan) -> dict:
    """The ss_* training settings kohya-ss writes that apply here."""
    cfg = plan.cfg
    return {"learning_rate": cfg.lr, "max_train_steps": cfg.steps, "train_batch_size": cfg.batch_size,
            "gradient_accumulation_steps": cfg.grad_accum, "seed": cfg.seed, "resolution": f"({plan.dataset.size}, "
            f"{plan.dataset.size})", "num_train_images": len(plan.dataset), "mixed_precision": args.base_dtype,
            "gradient_checkpointing": cfg.gradient_checkpointing, "prior_loss_weight": cfg.prior_loss_weight,
            "caption_dropout_rate": cfg.caption_dropout, "flip_aug": args.flip,
            "network_train_unet_only": not args.train_text_encoder, "num_processes": plan.world.size,
            "sd_model_name": (plan.checkpoint or Path("sd-shapes")).stem}


def finetune(args) -> None:
    """`sd train --data`: check, load the base, make the class images, train, write the LoRA or the model."""
    world = world_from_env()
    from .command import check_device
    device = process_device(world, check_device(args))
    plan = make_finetune_plan(args, device, world)
    cfg = plan.cfg
    _say(world, f"sd train: effective batch {cfg.batch_size} x {world.size} process(es) x {cfg.grad_accum} "
         f"accumulation = {cfg.batch_size * world.size * cfg.grad_accum}")
    with process_group(world, device):
        models = _load_base(plan)
        prior = None
        if plan.class_folder is not None:
            make_class_images(models, plan.class_folder, args.class_prompt, args.num_class_images, plan.dataset.size,
                              args.seed, world)
            prior = ImageFolderDataset(plan.class_folder, plan.dataset.size, caption=args.class_prompt)
        network = _make_network(models, args, args.seed) if args.lora_rank else None
        out_dir = args.out / CHECKPOINTS
        from .command import say_how_to_go_on
        with say_how_to_go_on("fine-tuning", "with --resume {checkpoint}", world.is_main):
            train_diffusion(models, plan.dataset, cfg, out_dir, resume_from=args.resume, lora=network,
                            prior_dataset=prior, world=world, progress=world.is_main)
        if world.is_main:
            _write_result(models, network, plan, args, out_dir)


def _write_result(models: dict, network: LoraNetwork | None, plan: FinetunePlan, args, out_dir: Path) -> None:
    final = checkpoint_path(out_dir, plan.cfg.steps)
    with deferred_sigint():  # the run is done: a Ctrl-C (or SIGTERM) now waits for its file
        if network is not None:
            pairs = load_ema({"lora": network.pairs}, final)["lora"]
            path = save_lora(network, plan.export_path, overwrite=args.overwrite, pairs=pairs,
                             **_settings(args, plan))
        else:
            path = export(load_ema(models, final), plan.export_path, dtype=torch.float16)
    print(f"wrote {path}")
