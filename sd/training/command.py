"""`sd train`: train the small text-to-image model on generated shapes, the VAE first, then the UNet and CLIP.

No tutorial counterpart (the tutorial explains training but does not code it). The training itself is
sd/training/train.py; this file is the command around it: its options, every check of them before any model is
built (make_plan), the seeded models, the two stages, what a Ctrl-C prints, and the export. The `sd` command
(sd/cli.py) prints what main raises in one line.
"""

import argparse
import contextlib
import dataclasses
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoint_io import CheckpointError
from ..checks import ArgumentParser, check, is_finite_number
from ..clip import CLIPConfig
from ..decoder import VAEConfig
from ..devices import resolve_device
from ..diffusion import DiffusionConfig
from ..files import OutputError, check_output_path
from ..interrupts import deferred_sigint
from ..model_loader import build_models, check_configs_fit, configs_from_json
from ..pipeline import MAX_SEED
from .datasets import MIN_SIZE, ShapesDataset
from .finetune import (
    DEFAULT_STEPS, FULL_LR, LORA_LR, add_finetune_options, check_finetune_only_options, finetune,
)
from .train import (
    MIXED_PRECISION, TrainConfig, TrainingInterrupted, VAETrainConfig, check_resumable, checkpoint_path, export,
    fit_latent_scale, latest_checkpoint, load_ema, run_record, train_diffusion, train_vae,
)

SAMPLE_PROMPTS = ("a red circle on a blue background", "a yellow square on a black background")
SHAPES_DEFAULTS = {"steps": 3000, "vae_steps": 1000, "batch_size": 32, "lr": 3e-4, "size": 32}
FINETUNE_DEFAULTS = {"steps": DEFAULT_STEPS, "batch_size": 1}  # lr and size: from the kind of run and the base
EXPORT_SUFFIXES = (".safetensors", ".ckpt")  # what save_standard_weights writes


def default_configs() -> dict:
    """A small text-to-image model for 32x32 shapes, trained from scratch in minutes (about 10M parameters,
    most of them CLIP's token embeddings): the VAE halves twice (32 px -> 8x8 latents)."""
    return {
        "clip": CLIPConfig(d_model=128, n_heads=4, n_layers=4, d_ff=512),
        "vae": VAEConfig(block_out_channels=(32, 64, 128), layers_per_block=1, n_groups=8),
        "diffusion": DiffusionConfig(model_channels=64, channel_mult=(1, 2, 2), n_res_blocks=1,
                                     attention_levels=(True, True, False), n_heads=4, d_context=128, n_groups=16),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="sd train", description="Fine-tune a model on your own pictures (--data DIR), as a "
                            "LoRA (--lora-rank) or whole; or, without --data, train a small text-to-image model on "
                            "generated shapes: the VAE first, then the UNet and its text encoder. Runs on several "
                            "processes under torchrun. Ctrl-C saves the last step done.")
    parser.add_argument("--out", type=Path, required=True, help="folder for checkpoints, logs and sample images")
    parser.add_argument("--steps", type=int, help=f"training steps (default {SHAPES_DEFAULTS['steps']}; with "
                        f"--data {DEFAULT_STEPS})")
    parser.add_argument("--vae-steps", type=int, help=f"shapes: VAE steps (default {SHAPES_DEFAULTS['vae_steps']}; "
                        f"0: keep the VAE as it is); resumes from OUT/vae by itself")
    parser.add_argument("--batch-size", type=int, help=f"images per step and process (default "
                        f"{SHAPES_DEFAULTS['batch_size']}; with --data 1)")
    parser.add_argument("--lr", type=float, help=f"learning rate (default {SHAPES_DEFAULTS['lr']}; with --data "
                        f"{LORA_LR} for a LoRA, {FULL_LR} for a full fine-tune)")
    parser.add_argument("--size", type=int, help=f"image size in pixels (default {SHAPES_DEFAULTS['size']}; with "
                        f"--data the base model's)")
    parser.add_argument("--seed", type=int, default=0,
                        help="0 to 2**64 - 1; seeds everything: initial weights, data, noise")
    parser.add_argument("--config", type=Path,
                        help='JSON of model configs {"clip": {...}, "vae": {...}, "diffusion": {...}}')
    parser.add_argument("--resume", type=Path, help="a diffusion checkpoint of this run (in OUT/diffusion)")
    parser.add_argument("--export", type=Path, help="where to write the final model (default OUT/model.safetensors)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --export, and start again over a run's checkpoints in OUT/diffusion")
    parser.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (0: the last)")
    parser.add_argument("--sample-every", type=int, default=500, help="steps between sample images (0: never)")
    parser.add_argument("--mixed-precision", choices=list(MIXED_PRECISION), default="no")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="'auto' (the best here), 'cpu', 'cuda', 'cuda:N' or 'mps'")
    add_finetune_options(parser)
    return parser


def with_defaults(args, defaults: dict) -> argparse.Namespace:
    """args with each option left out (None) set to its default for this kind of training."""
    return argparse.Namespace(**{**vars(args), **{k: v for k, v in defaults.items() if getattr(args, k) is None}})


@dataclass(frozen=True)
class Plan:
    """What `sd train` will do, every part of it checked before a model is built."""
    configs: dict                     # the model configs
    vae_cfg: VAETrainConfig | None    # None: no VAE stage (--vae-steps 0)
    cfg: TrainConfig
    dataset: ShapesDataset
    export_path: Path
    vae_resume: Path | None           # the VAE checkpoint the VAE stage goes on from
    device: str                       # --device resolved: "auto" is the best device here


def _check_options(args) -> None:
    for option, value in (("--steps", args.steps), ("--batch-size", args.batch_size)):
        check(value > 0, f"{option} must be a positive integer, got {value}")
    for option, value in (("--vae-steps", args.vae_steps), ("--checkpoint-every", args.checkpoint_every),
                          ("--sample-every", args.sample_every)):
        check(value >= 0, f"{option} must be an integer >= 0, got {value}")
    check(0 <= args.seed < MAX_SEED, f"--seed must be an integer from 0 to 2**64 - 1, got {args.seed}")
    check(is_finite_number(args.lr) and args.lr > 0, f"--lr must be a finite number > 0, got {args.lr}")


def _read_config_file(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--config {path} cannot be read: {e}") from None
    try:
        return configs_from_json(text)
    except CheckpointError as e:  # its message speaks of a checkpoint's metadata: say what was wrong in the file
        raise ValueError(f'--config {path} is not a JSON of model configs {{"clip": {{...}}, "vae": {{...}}, '
                         f'"diffusion": {{...}}}}: {e.__context__ or e}') from None


def _model_configs(args) -> dict:
    """default_configs() with --config's over them, checked to fit together and with --size."""
    configs = {**default_configs(), **(_read_config_file(args.config) if args.config else {})}
    vae, unet = configs["vae"], configs["diffusion"]
    try:
        check_configs_fit(configs)
    except ValueError as e:
        raise ValueError(f"--config: {e}") from None
    check(unet.in_channels == vae.latent_channels, f"--config: diffusion in_channels ({unet.in_channels}) must "
          f"equal vae latent_channels ({vae.latent_channels}): sd train trains a text-to-image UNet, not inpainting")
    check(args.size >= MIN_SIZE and args.size % vae.downscale == 0, f"--size must be a multiple of "
          f"{vae.downscale} (the VAE's downscale) of at least {MIN_SIZE} pixels, got {args.size}")
    # generate()'s default size for the exported model: the images it is trained on, in latents.
    configs["diffusion"] = dataclasses.replace(unet, sample_size=args.size // vae.downscale)
    return configs


def _check_folder(option: str, folder: Path) -> None:
    """A folder, or a path where one can be made: not a file, not under a file."""
    for path in (folder, *folder.parents):
        if path.exists():
            check(path.is_dir(), f"{option} {folder} is a file; give a folder" if path == folder else
                  f"{option} {folder} cannot be made: {path} is a file, not a folder")
            return


def check_export_path(args, default_name: str = "model.safetensors") -> Path:
    """--out a folder (or nothing yet), --export (default OUT/default_name) a file we can write, --resume a file;
    returns the export path."""
    _check_folder("--out", args.out)
    export_path = args.export or args.out / default_name
    check(export_path.suffix in EXPORT_SUFFIXES,
          f"--export must end in {' or '.join(EXPORT_SUFFIXES)}, got {export_path.name!r}")
    try:
        check_output_path(export_path)
    except OutputError as e:
        raise ValueError(f"--export: {e}") from None
    if args.resume is not None and not args.resume.is_file():
        if not args.resume.exists():
            raise FileNotFoundError(f"--resume {args.resume}: no such file")
        raise ValueError(f"--resume {args.resume} is a folder; give a checkpoint such as "
                         f"{checkpoint_path(args.resume, 500)}")
    return export_path


def check_device(args) -> str:
    """--device as sd.devices resolves it ("auto": the best here; a device that is not here is refused), checked
    for what fp16 needs; returns it, for the configs and the models."""
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise ValueError(f"--device: {e}") from None
    check(args.mixed_precision != "fp16" or device.type == "cuda",
          f"--mixed-precision fp16 needs a CUDA device (--device is {args.device}); use bf16 on a CPU")
    return str(device)


def _stage_configs(args, device: str) -> tuple[VAETrainConfig | None, TrainConfig]:
    common = dict(batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=device,
                  mixed_precision=args.mixed_precision, checkpoint_every=args.checkpoint_every)
    vae_cfg = VAETrainConfig(steps=args.vae_steps, **common) if args.vae_steps else None
    cfg = TrainConfig(steps=args.steps, sample_every=args.sample_every, sample_prompts=SAMPLE_PROMPTS, **common)
    return vae_cfg, cfg


def _check_resume(args, configs: dict, cfg: TrainConfig) -> None:
    """--resume: a checkpoint of this run's diffusion stage, which goes on only with the VAE in its --out."""
    diffusion_dir = args.out / "diffusion"
    folder = args.resume.resolve().parent
    other_run = f"; {args.resume} belongs to the run in --out {folder.parent}" if folder.name == "diffusion" else ""
    check(folder == diffusion_dir.resolve(), f"--resume {args.resume} is not in {diffusion_dir}: --resume must be "
          f"a checkpoint in OUT/diffusion (e.g. {checkpoint_path(diffusion_dir, 500)}), not an exported model: a "
          f"diffusion checkpoint goes on only with the VAE of its own run{other_run}")
    record = run_record((args.size, args.size), {"diffusion": configs["diffusion"], "clip": configs["clip"]})
    try:
        check_resumable(args.resume, cfg, record)
    except ValueError as e:
        raise ValueError(f"--resume: {e}; give the --steps, --size and --config of that run") from None


def _vae_resume(args, configs: dict, vae_cfg: VAETrainConfig | None) -> Path | None:
    """The latest VAE checkpoint in OUT/vae (at most --vae-steps in), checked to come from a run like this one."""
    path = latest_checkpoint(args.out / "vae", at_most=args.vae_steps) if vae_cfg else None
    if path is not None:
        try:
            check_resumable(path, vae_cfg, run_record((args.size, args.size),
                                                      {"encoder": configs["vae"], "decoder": configs["vae"]}))
        except ValueError as e:
            raise ValueError(f"--out: the VAE stage would go on from {e}; use another --out, or the --size and "
                             f"--config of that run") from None
    return path


def _check_vae_is_done(args, vae_resume: Path | None) -> None:
    """With --resume, the VAE stage must have nothing left to do: more VAE steps would change the VAE that the
    diffusion checkpoint was trained with (a VAE stopped earlier is caught by its digest, see run_record)."""
    done = 0 if vae_resume is None else int(vae_resume.stem.split("-")[1])
    check(done == args.vae_steps, f"--resume: the VAE stage of {args.out} is at step {done}, not at --vae-steps "
          f"{args.vae_steps}: training it further would change the VAE the diffusion checkpoint was trained with; "
          f"give the --vae-steps of that run")


def _check_nothing_is_replaced(args, export_path: Path) -> None:
    """Without --overwrite: no existing --export, and no run's diffusion checkpoints in --out unless it goes on
    from one with --resume (the VAE stage goes on from OUT/vae by itself, replacing nothing)."""
    if args.overwrite:
        return
    check(not export_path.exists(), f"--export {export_path} already exists: give another --export, or "
          f"--overwrite to replace it")
    latest = latest_checkpoint(args.out / "diffusion")
    check(args.resume is not None or latest is None, f"{args.out / 'diffusion'} already holds checkpoints of a run: "
          f"go on with --resume {latest}, use another --out, or --overwrite to start again")


def make_plan(args) -> Plan:
    """Every check of the arguments, made before any model is built or trained."""
    check_finetune_only_options(args)
    args = with_defaults(args, SHAPES_DEFAULTS)
    _check_options(args)
    configs = _model_configs(args)
    export_path = check_export_path(args)
    device = check_device(args)
    vae_cfg, cfg = _stage_configs(args, device)
    if args.resume is not None:
        _check_resume(args, configs, cfg)
    vae_resume = _vae_resume(args, configs, vae_cfg)
    if args.resume is not None and vae_cfg:
        _check_vae_is_done(args, vae_resume)
    _check_nothing_is_replaced(args, export_path)  # last: a run that is not this one's is said first
    dataset = ShapesDataset(100_000, size=args.size, seed=args.seed)
    return Plan(configs, vae_cfg, cfg, dataset, export_path, vae_resume, device)


def build_seeded_models(configs: dict, seed: int, device: str) -> dict[str, nn.Module]:
    """build_models with PyTorch's default initialisation drawn from `seed`: built on the CPU (the same weights
    for any device), then moved. The caller's random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        models = build_models(configs, device="cpu")
    return {name: model.to(device) for name, model in models.items()}


@contextlib.contextmanager
def say_how_to_go_on(stage: str, how: str, main: bool = True) -> Iterator[None]:
    """On Ctrl-C in a stage, one line on stderr (from the main process): how far it got, where that is saved and
    how to go on."""
    try:
        yield
    except TrainingInterrupted as e:
        if main and e.checkpoint is None:
            print(f"sd train: interrupted before the first {stage} step was done; nothing to save", file=sys.stderr)
        elif main:
            print(f"sd train: interrupted; {stage} step {e.step} of {e.steps} is saved in {e.checkpoint}; to go on, "
                  f"run the same command {how.format(checkpoint=e.checkpoint)}", file=sys.stderr)
        raise


def _vae_stage(models: dict, plan: Plan, args) -> None:
    """Train the VAE (or finish training it), take its EMA weights and fit the latent scale to them."""
    vae_dir = args.out / "vae"
    with say_how_to_go_on("VAE", "again (the VAE stage goes on from its latest checkpoint by itself)"):
        train_vae(models["encoder"], models["decoder"], plan.dataset, plan.vae_cfg, vae_dir,
                  resume_from=plan.vae_resume)
    models.update({k: v for k, v in load_ema(models, checkpoint_path(vae_dir, args.vae_steps)).items()
                   if k in ("encoder", "decoder")})
    scale = fit_latent_scale(models["encoder"], plan.dataset, seed=args.seed)
    vae = dataclasses.replace(models["encoder"].config, latent_scale=scale)
    models["encoder"].config = models["decoder"].config = vae
    print(f"VAE trained; latent scale 1 / std(latents) = {vae.latent_scale}")


def main(argv: Sequence[str] | None = None) -> None:
    """`sd train`: raises ValueError / FileNotFoundError for bad arguments, before any work, KeyboardInterrupt
    (TrainingInterrupted) on Ctrl-C once the last step done is saved, and NonFiniteError if training diverges
    (nothing non-finite is saved or exported); the `sd` command prints them in one line."""
    args = build_parser().parse_args(argv)
    if args.data is not None:
        return finetune(with_defaults(args, FINETUNE_DEFAULTS))
    plan = make_plan(args)
    args = with_defaults(args, SHAPES_DEFAULTS)
    models = build_seeded_models(plan.configs, args.seed, plan.device)
    if plan.vae_cfg:
        _vae_stage(models, plan, args)
    with say_how_to_go_on("diffusion", "with --resume {checkpoint}"):
        train_diffusion(models, plan.dataset, plan.cfg, args.out / "diffusion", resume_from=args.resume)
    with deferred_sigint():  # the run is done: a Ctrl-C (or SIGTERM) now waits for its file
        final = load_ema(models, checkpoint_path(args.out / "diffusion", args.steps))
        path = export(final, plan.export_path, dtype=torch.float16)  # records its image size: the UNet's sample_size
    print(f"wrote {path}")
