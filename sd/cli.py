"""The `sd` command (also `python -m sd`): generate, img2img, inpaint and train from the shell.

No tutorial counterpart (the tutorial drives the pipeline from a notebook). Each image carries its generation
parameters in the format AUTOMATIC1111's web UI writes (a PNG text chunk, or EXIF UserComment in a JPEG or WebP), so
other tools read them. Without --checkpoint the small model shipped in weights/ is used, so a fresh clone generates at
once. Everything is checked before the model loads; known errors are one line (main: the one error boundary).
"""

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import re
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

from .checks import ArgumentParser, NonFiniteError, UsageError, check
from .files import check_image_output, is_disk_full, save_image
from .images import RESIZE_MODES
from .interrupts import forget_caught_interrupts, remembered_interrupts
from .pipeline import NONFINITE
from .speedups import DEEPCACHE_INTERVAL, TOME_RATIO, Speedups

# The embedded model: trained on CPU on sd.training.datasets' shapes (see weights/README.md for the command).
EMBEDDED_CHECKPOINT = Path(__file__).resolve().parents[1] / "weights" / "sd-shapes.safetensors"
HASH_LIMIT = 512 * 2**20  # hash checkpoints up to this size for the metadata (hashing 4 GB takes a while)

# Our sampler names -> the names AUTOMATIC1111 writes in "Sampler:".
A1111_SAMPLERS = {
    "ddpm": "DDPM", "ddim": "DDIM", "euler": "Euler", "euler_karras": "Euler Karras", "euler_a": "Euler a",
    "heun": "Heun", "lms": "LMS", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_karras": "DPM++ 2M Karras",
}
DTYPES = ("float32", "float16", "bfloat16", "auto")  # auto: sd.devices.fast_dtype, and sd says what it chose
NEGATIVE_PREFIX = "Negative prompt: "
PARAMETER = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # AUTOMATIC1111's re_param_code
RANDOM_SEED = -1  # AUTOMATIC1111's "random": a seed is drawn and written in the PNG
OUT_OF_MEMORY = re.compile(r"out of memory|can't allocate memory|not enough memory", re.IGNORECASE)


def quote(value) -> str:
    """A value as AUTOMATIC1111 writes it in the parameters line: JSON-quoted if it holds ',', ':' or a newline, so a
    model named "a, b" cannot add fields of its own."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def check_prompt_metadata(prompt: str, negative_prompt: str) -> None:
    """Refuse the prompts AUTOMATIC1111's readers would misread: a prompt line starting "Negative prompt:" would be read
    as the negative prompt, and anything after it as the rest of the text."""
    for name, text in (("prompt", prompt), ("negative prompt", negative_prompt)):
        if any(line.strip().startswith(NEGATIVE_PREFIX.strip()) for line in text.split("\n")):  # as A1111 reads
            raise ValueError(f"the {name} has a line starting {NEGATIVE_PREFIX.strip()!r}, which the image's parameters "
                             f"would misread; give the negative prompt with --negative-prompt, on one line")


def a1111_parameters(prompt: str, negative_prompt: str, steps: int, sampler: str, cfg_scale: float, seed: int,
                     width: int, height: int, checkpoint: Path, model_hash: str | None,
                     strength: float | None = None, batch: tuple[int, int] | None = None,
                     steps_run: int | None = None, extra: Sequence[tuple[str, object]] = ()) -> str:
    """The text AUTOMATIC1111 stores in a PNG's "parameters" chunk: prompt, negative prompt, then key: value pairs.
    Steps is what was asked (as AUTOMATIC1111 writes it, so the image can be made again); image-to-image at a strength
    below 1 runs fewer, written as "Steps run". extra: more (key, value) pairs, e.g. ("Token merging ratio", 0.5)."""
    check_prompt_metadata(prompt, negative_prompt)
    fields = [("Steps", steps), ("Sampler", A1111_SAMPLERS[sampler]), ("CFG scale", cfg_scale), ("Seed", seed),
              ("Size", f"{width}x{height}")]
    if model_hash:
        fields.append(("Model hash", model_hash))
    fields.append(("Model", checkpoint.stem))
    if strength is not None:
        fields.append(("Denoising strength", strength))
    if steps_run is not None and steps_run != steps:
        fields.append(("Steps run", steps_run))
    if batch is not None and batch[0] > 1:
        fields += [("Batch size", batch[0]), ("Batch pos", batch[1])]
    fields += list(extra)
    lines = [prompt] + ([f"{NEGATIVE_PREFIX}{negative_prompt}"] if negative_prompt else [])
    return "\n".join(lines + [", ".join(f"{k}: {quote(v)}" for k, v in fields)])


def parse_a1111_parameters(text: str) -> dict[str, str]:
    """Read the "parameters" text back: {"prompt", "negative_prompt", "Steps", "Sampler", ...}; quoted values unquoted."""
    *head, last = text.split("\n")
    result = {"prompt": "", "negative_prompt": ""}
    negative = [i for i, line in enumerate(head) if line.startswith(NEGATIVE_PREFIX)]
    cut = negative[0] if negative else len(head)
    result["prompt"] = "\n".join(head[:cut])
    if negative:
        result["negative_prompt"] = "\n".join(head[cut:])[len(NEGATIVE_PREFIX):]
    for key, value in PARAMETER.findall(last):
        result[key] = json.loads(value) if value.startswith('"') else value
    return result


def model_hash(path: Path) -> str | None:
    """AUTOMATIC1111's model hash: the first 10 hex digits of the file's sha256 (skipped for very large files, and
    for a diffusers folder, which AUTOMATIC1111 has no hash for)."""
    if path.is_dir() or path.stat().st_size > HASH_LIMIT:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()[:10]


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="what to draw")
    p.add_argument("-o", "--output", default="out.png",
                   help="image to write: .png, .jpg or .webp, with the parameters in it; with several images "
                        "out-0.png, out-1.png, ...; an existing file is kept and the next free name used")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("-n", "--negative-prompt", default="", help="what to steer away from")
    p.add_argument("--sampler", default="dpmpp_2m_karras", choices=list(A1111_SAMPLERS))
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    p.add_argument("--cfg-scale", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed, 0 to 2**64 - 1 (default, or -1: a random one, written in the image)")
    p.add_argument("--height", type=int, default=None, help="image height (default: the model's training size)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the model's training size)")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="SD 1.x .safetensors/.ckpt (default: the embedded model, weights/sd-shapes.safetensors)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="the models' dtype; auto (default): bfloat16 on a CPU with native bf16 (AMX, AVX-512-BF16), "
                        "float16 on a GPU, else float32")
    p.add_argument("--tome", type=float, nargs="?", const=TOME_RATIO, default=0.0, metavar="RATIO",
                   help=f"Token Merging: merge this fraction of the top-level tokens (alone: {TOME_RATIO}); faster, "
                        "a little less faithful (README: Speed)")
    p.add_argument("--deepcache", type=int, nargs="?", const=DEEPCACHE_INTERVAL, default=0, metavar="N",
                   help=f"DeepCache: run the whole UNet every N steps only (alone: {DEEPCACHE_INTERVAL}); faster, a "
                        "little less faithful")
    p.add_argument("--attention-slice-size", type=int, default=None, metavar="TOKENS",
                   help="attention on this many query tokens at a time: less memory, the same image")
    p.add_argument("--vae-tiling", action="store_true",
                   help="decode (and encode) in overlapping tiles: large images in a few GB")
    p.add_argument("--clip-skip", type=int, default=1, metavar="N",
                   help="use CLIP's N-th layer from the end (AUTOMATIC1111's Clip skip; 2 for many anime fine-tunes)")
    p.add_argument("--plain-prompt", action="store_true",
                   help="take the prompt as written: no (emphasis:1.2), [editing:when], BREAK or <lora:...>, cut at "
                        "75 tokens (diffusers' reading)")
    p.add_argument("--embedding", type=Path, action="append", default=[], metavar="PATH",
                   help="a textual-inversion embedding (.pt, .safetensors, .bin); the prompt names it by the file's "
                        "stem (repeatable)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:MULT]",
                   help="merge a LoRA (kohya, LoCon, LoHa or diffusers/PEFT file) at multiplier MULT (default 1) "
                        "(repeatable)")
    p.add_argument("--lora-dir", type=Path, default=None, metavar="DIR",
                   help="where <lora:name:mult> in the prompt finds name.safetensors")
    p.add_argument("--nonfinite", default="raise", choices=NONFINITE,
                   help="NaN/inf in a model's output: stop and say where (default), or warn and go on (to debug)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--preview", type=Path, default=None,
                   help="image replaced after every step with a cheap preview of the predicted image (watch it in a "
                        "viewer; each replacement is atomic)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def _add_image_args(p: argparse.ArgumentParser, strength: float) -> None:
    p.add_argument("--image", type=Path, required=True, help="start image (any mode and bit depth; EXIF rotation applied)")
    p.add_argument("--strength", type=float, default=strength, help="how much of the image to replace, in (0, 1]")
    p.add_argument("--resize-mode", default="stretch", choices=RESIZE_MODES,
                   help="an image of another shape than the output: stretch it (default, with a warning) or crop it")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="sd", description="Stable Diffusion 1.x from scratch: make images from text.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generation_args(commands.add_parser("generate", help="text to image"))
    img2img = commands.add_parser("img2img", help="image to image")
    _add_generation_args(img2img)
    _add_image_args(img2img, strength=0.6)
    inpaint = commands.add_parser("inpaint", help="repaint the white part of a mask")
    _add_generation_args(inpaint)
    _add_image_args(inpaint, strength=1.0)
    inpaint.add_argument("--mask", type=Path, required=True, help="mask, same size: white = repaint")
    inpaint.add_argument("--paste-back", action="store_true", help="keep the unmasked pixels exactly")
    commands.add_parser("train", help="fine-tune on your pictures (--data), or train a small model on shapes "
                        "(sd train --help)", add_help=False)
    return parser


def _open_image(path: Path, what: str):
    from PIL import Image, UnidentifiedImageError

    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give an image file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        image = Image.open(path)
        image.load()  # a truncated or damaged file fails here, with its name, not half-way through generation
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as e:
        raise ValueError(f"{what} {path} is not an image PIL can read ({e})") from None
    return image


def _preview_writer(models, path: Path, width: int, height: int):
    """A generate() callback that writes the linear latent preview of x̂_0 (the images side by side) to path,
    replacing it atomically: a viewer never reads half a file."""
    from PIL import Image

    from .inspect.preview import LatentPreview

    preview = LatentPreview.for_models(models)

    def write(i, t, latents, pred_original):
        frames = preview(pred_original, size=(width, height))
        strip = Image.new("RGB", (width * len(frames), height))
        for k, frame in enumerate(frames):
            strip.paste(frame, (k * width, 0))
        save_image(strip, path, overwrite=True)

    return write


def output_path(output: Path, i: int, n: int) -> Path:
    """Where image i of n goes: output itself for one image, else out-0.png, out-1.png, ..."""
    return output if n == 1 else output.with_name(f"{output.stem}-{i}{output.suffix}")


def _share(args: argparse.Namespace):
    """Under torchrun (WORLD_SIZE > 1): this process's images of the batch, every WORLD_SIZE-th from its RANK, and
    its World; (None, the single World) otherwise. Each image is the one a single process makes, under its name."""
    from .training.distributed import world_from_env

    world = world_from_env()
    if world.size == 1:
        return None, world
    check(args.seed is not None and args.seed != RANDOM_SEED, "under torchrun, give --seed: every process must "
          "draw the same batch")
    check(getattr(args, "image", None) is None, "under torchrun, sd generate shares out text to image only")
    check(args.preview is None, "under torchrun, --preview would be written by every process: leave it out")
    rows = list(range(world.rank, args.num_images, world.size))
    check(rows, f"--num-images {args.num_images} leaves nothing for rank {world.rank} of {world.size}: give at "
          f"least {world.size} images, or fewer processes")
    return rows, world


def check_outputs(args: argparse.Namespace) -> None:
    """Before any work: the output's extension and folder (every image goes beside the first, in its format), and a
    preview path that is new (or --overwrite) and is neither the output nor the input."""
    check_image_output(output_path(Path(args.output), 0, args.num_images))
    if args.preview is None:
        return
    check_image_output(args.preview)
    taken = [Path(args.output)] + [getattr(args, name) for name in ("image", "mask") if getattr(args, name, None)]
    if any(args.preview.resolve() == path.resolve() for path in taken):
        raise ValueError(f"--preview {args.preview} is also the output or an input: give the preview its own file")
    if args.preview.exists() and not args.overwrite:
        raise ValueError(f"--preview {args.preview} exists and would be replaced at every step; give a new path, "
                         f"or --overwrite")


def resolve_seed(seed: int | None) -> int:
    import random

    if seed is None or seed == RANDOM_SEED:
        return random.randrange(2**32)
    if not 0 <= seed < 2**64:
        raise ValueError(f"--seed must be from 0 to 2**64 - 1, or -1 for a random one, got {seed}")
    return seed


def steps_run(args: argparse.Namespace, image) -> int:
    """The steps the sampler will really run (image-to-image runs int(steps x strength)), checked before loading."""
    from .samplers import make_sampler

    return len(make_sampler(args.sampler, None, args.steps, args.strength if image is not None else None).timesteps)


def run_generation(args: argparse.Namespace) -> list[Path]:
    import torch

    from .devices import fast_dtype, resolve_device
    from .model_loader import preload_models_from_standard_weights
    from .training.distributed import process_device
    from .pipeline import check_mask_size, check_numbers, default_size, generate

    checkpoint = args.checkpoint or EMBEDDED_CHECKPOINT
    if args.checkpoint is None and not checkpoint.is_file():
        raise FileNotFoundError(f"the embedded model {checkpoint} is missing from this installation; "
                                "pass --checkpoint weights/v1-5-pruned-emaonly.safetensors (see weights/README.md)")
    rows, world = _share(args)
    seed = resolve_seed(args.seed)
    check_numbers(args.cfg_scale, getattr(args, "strength", 1.0), args.num_images, seed, None, args.height, args.width)
    speedups = Speedups(args.tome, args.deepcache, args.attention_slice_size, args.vae_tiling)
    check_outputs(args)
    check_prompt_metadata(args.prompt, args.negative_prompt)
    image = _open_image(args.image, "image") if getattr(args, "image", None) else None
    mask = _open_image(args.mask, "mask") if getattr(args, "mask", None) else None
    if mask is not None:
        check_mask_size(image, mask)
    run = steps_run(args, image)
    extras = check_extras(args, checkpoint)
    device = resolve_device(process_device(world, str(resolve_device(args.device))))
    dtype = fast_dtype(device) if args.dtype == "auto" else getattr(torch, args.dtype)
    label = "embedded model" if args.checkpoint is None else "checkpoint"
    print(f"sd: {label} {checkpoint} on {device} in {str(dtype).removeprefix('torch.')}, {args.sampler} {run} steps, "
          f"seed {seed}", file=sys.stderr)

    models = preload_models_from_standard_weights(checkpoint, device=device, dtype=dtype)
    extras.load(models)
    height, width = default_size(models, args.height, args.width)  # the model's training size unless given
    show = _preview_writer(models, args.preview, width, height) if args.preview else None
    images = generate(args.prompt, negative_prompt=args.negative_prompt, input_image=image, mask_image=mask,
                      strength=getattr(args, "strength", 0.8), cfg_scale=args.cfg_scale, sampler_name=args.sampler,
                      n_inference_steps=args.steps, models=models, seed=seed, device=device, height=height,
                      width=width, num_images=args.num_images, paste_back=getattr(args, "paste_back", False),
                      progress=not args.quiet, callback=show, output_type="pil",
                      resize_mode=getattr(args, "resize_mode", "stretch"), nonfinite=args.nonfinite,
                      clip_skip=args.clip_skip, prompt_syntax=extras.syntax, lora_dir=args.lora_dir, rows=rows,
                      **dataclasses.asdict(speedups))
    digest = model_hash(checkpoint)
    written = []
    for i, picture in zip(rows or range(len(images)), images):
        path = output_path(Path(args.output), i, args.num_images)
        parameters = a1111_parameters(
            extras.recorded_prompt(args.prompt), args.negative_prompt, args.steps, args.sampler, args.cfg_scale, seed,
            width, height, checkpoint, digest, strength=args.strength if image is not None else None,
            batch=(args.num_images, i), steps_run=run, extra=extras.parameters(models, run) + speedup_parameters(speedups))
        written.append(save_image(picture, path, parameters, overwrite=args.overwrite))
        note = "" if written[-1] == path else f" ({path} exists; --overwrite replaces it)"
        print(f"sd: wrote {written[-1]}{note}", file=sys.stderr)
    return written


@dataclasses.dataclass
class Extras:
    """What sd brings beside the checkpoint: embeddings, LoRAs (--lora and the prompt's <lora:...>), clip skip."""

    syntax: str
    clip_skip: int
    embeddings: list[Path]
    loras: list[tuple[Path, float]]        # --lora
    prompt_loras: list[tuple[Path, float, float]]  # <lora:name:te:unet> in the prompt, found in --lora-dir
    prompt: str
    negative_prompt: str

    def load(self, models) -> None:
        from .embeddings import load_embedding
        from .lora import apply_lora

        for path in self.embeddings:
            load_embedding(models, path)
        for path, multiplier in self.loras:
            apply_lora(models, path, multiplier)  # for the whole run: the process ends after it

    def recorded_prompt(self, prompt: str) -> str:
        """The prompt as the image records it: --lora's LoRAs as <lora:name:mult> tags, so AUTOMATIC1111 (and sd with
        --lora-dir) makes the same image from it."""
        return " ".join([prompt] + [f"<lora:{path.stem}:{multiplier:g}>" for path, multiplier in self.loras])

    def parameters(self, models, steps: int) -> list[tuple[str, object]]:
        """Clip skip, Lora hashes and TI hashes, as AUTOMATIC1111 writes them."""
        from .embeddings import used_embeddings
        from .lora import lora_hash

        fields: list[tuple[str, object]] = []
        if self.clip_skip > 1:
            fields.append(("Clip skip", self.clip_skip))
        paths = list(dict.fromkeys([path for path, *_ in self.loras + self.prompt_loras]))
        if paths:
            fields.append(("Lora hashes", ", ".join(f"{path.stem}: {lora_hash(path)}" for path in paths)))
        layer = models["clip"].embedding
        used = used_embeddings(models["clip"], [self.prompt, self.negative_prompt], self.syntax, steps=steps)
        if used:
            fields.append(("TI hashes", ", ".join(f"{name}: {layer.embedding_hashes[name]}" for name in used)))
        return fields


def lora_argument(text: str) -> tuple[Path, float]:
    """--lora PATH[:MULT]: the multiplier after the last colon when it is a number (so C:\\x.safetensors works)."""
    path, _, tail = text.rpartition(":")
    try:
        multiplier = float(tail) if path else None
    except ValueError:
        multiplier = None
    if multiplier is None:
        path, multiplier = text, 1.0
    if not math.isfinite(multiplier):
        raise ValueError(f"--lora {text}: the multiplier must be a finite number, e.g. --lora style.safetensors:0.8")
    return Path(path), multiplier


def check_extras(args: argparse.Namespace, checkpoint: Path) -> Extras:
    """Before the model loads: clip skip, the prompt's <lora:...> tags (each found in --lora-dir), and every
    embedding and LoRA file against the structure of the checkpoint's models (built on the meta device: no weights)."""
    from .embeddings import embedding_vectors, load_embedding
    from .lora import plan_lora, prompt_loras, read_lora
    from .model_loader import build_models, model_configs

    syntax = "plain" if args.plain_prompt else "a1111"
    if args.clip_skip < 1:
        raise ValueError(f"--clip-skip must be 1 (CLIP's last layer) or more, got {args.clip_skip}")
    if args.lora_dir is not None and not args.lora_dir.is_dir():
        raise ValueError(f"--lora-dir {args.lora_dir} is not a folder")
    for path in args.embedding:
        embedding_vectors(path)
    loras = [lora_argument(text) for text in args.lora]
    tagged = prompt_loras([args.prompt], [args.negative_prompt], args.lora_dir)[1] if syntax == "a1111" else []
    for path, *_ in loras + tagged:
        read_lora(path)
    structure = build_models(model_configs(checkpoint), device="meta")
    n_layers = structure["clip"].config.n_layers
    if args.clip_skip > n_layers:
        raise ValueError(f"--clip-skip must be from 1 to {n_layers} (this text encoder's layers), got {args.clip_skip}")
    for path in args.embedding:
        load_embedding(structure, path)
    for path, multiplier, *unet in loras + tagged:
        plan_lora(structure, path, multiplier, unet_multiplier=(unet or [None])[0])
    return Extras(syntax, args.clip_skip, args.embedding, loras, tagged, args.prompt, args.negative_prompt)


def speedup_parameters(speedups) -> list[tuple[str, object]]:
    """What changes the image, as AUTOMATIC1111 writes Token Merging ("Token merging ratio"), and DeepCache."""
    fields = []
    if speedups.tome_ratio:
        fields.append(("Token merging ratio", speedups.tome_ratio))
    if speedups.deepcache_interval > 1:
        fields.append(("DeepCache interval", speedups.deepcache_interval))
    return fields


# --- one error boundary for every subcommand ---------------------------------------------------------------------


def explain(error: BaseException) -> str | None:
    """The one line for an error a user can cause (what was wrong, what to do), or None for a bug: its traceback."""
    import torch

    if isinstance(error, (MemoryError, torch.OutOfMemoryError)) or \
            (isinstance(error, RuntimeError) and OUT_OF_MEMORY.search(str(error))):
        return ("out of memory: make the work smaller (sd generate: fewer or smaller images, --num-images, --height, "
                "--width, or --dtype bfloat16; sd train: --batch-size, --size)")
    if isinstance(error, OSError) and is_disk_full(error):
        return f"the disk is full{f' writing {error.filename}' if error.filename else ''}; nothing partial was left"
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError) and error.filename:
        return f"{error.strerror}: {error.filename}"
    if isinstance(error, (ValueError, OSError, NonFiniteError)):
        return str(error)
    return None


def _one_line_warnings(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"sd: warning: {message}", file=sys.stderr)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (kill, docker stop, a job scheduler's time limit) stops sd as Ctrl-C does: the same clean exit, the
    same last checkpoint in training. Only the main thread may set a handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_command(argv: list[str]) -> int:
    if argv[:1] == ["train"]:
        from .training.command import main as train_main

        return train_main(argv[1:]) or 0
    run_generation(build_parser().parse_args(argv))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`sd ...`: every subcommand's known errors as one line and exit code 1, Ctrl-C as exit code 130 (no partial
    file is left: every write is atomic); --debug shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]  # train parses its own options: take it out for both
    with warnings.catch_warnings(), sigterm_as_interrupt(), remembered_interrupts() as interrupts:
        if not debug:
            warnings.showwarning = _one_line_warnings
        try:
            code = run_command(argv)
        except BaseException as error:
            if debug or not isinstance(error, (Exception, KeyboardInterrupt)):
                raise
            code = _exit_code(error, interrupted=bool(interrupts))
    forget_caught_interrupts()  # a Ctrl-C handled here must not end `python -m sd` by SIGINT after all
    return code


def _exit_code(error: BaseException, interrupted: bool) -> int:
    """Say what stopped sd in one line; 130 for a Ctrl-C (also one that a library turned into another error on its
    way), 2 for a usage error, 1 for the others. An error we cannot explain is raised with its traceback."""
    if interrupted or isinstance(error, KeyboardInterrupt):
        print("sd: interrupted", file=sys.stderr)
        return 130
    message = explain(error)
    if message is None:
        raise error
    print(f"sd: error: {message}", file=sys.stderr)
    return 2 if isinstance(error, UsageError) else 1


if __name__ == "__main__":
    sys.exit(main())
