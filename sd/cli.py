"""The `sd` command (also `python -m sd`): generate, img2img, inpaint and train from the shell.

No tutorial counterpart (the tutorial drives the pipeline from a notebook). Each PNG carries its generation
parameters in a `parameters` text chunk in the format AUTOMATIC1111's web UI writes, so other tools read them.
Without --checkpoint the small model shipped in weights/ is used, so a fresh clone generates at once.
"""

import argparse
import hashlib
import sys
from pathlib import Path

# The embedded model: trained on CPU on sd.training.datasets' shapes (see weights/README.md for the command).
EMBEDDED_CHECKPOINT = Path(__file__).resolve().parents[1] / "weights" / "sd-shapes.safetensors"
HASH_LIMIT = 512 * 2**20  # hash checkpoints up to this size for the metadata (hashing 4 GB takes a while)

# Our sampler names -> the names AUTOMATIC1111 writes in "Sampler:".
A1111_SAMPLERS = {
    "ddpm": "DDPM", "ddim": "DDIM", "euler": "Euler", "euler_karras": "Euler Karras", "euler_a": "Euler a",
    "heun": "Heun", "lms": "LMS", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_karras": "DPM++ 2M Karras",
}
DTYPES = ("float32", "float16", "bfloat16")


def a1111_parameters(prompt: str, negative_prompt: str, steps: int, sampler: str, cfg_scale: float, seed: int,
                     width: int, height: int, checkpoint: Path, model_hash: str | None,
                     strength: float | None = None, batch: tuple[int, int] | None = None) -> str:
    """The text AUTOMATIC1111 stores in a PNG's "parameters" chunk: prompt, negative prompt, then key: value pairs."""
    fields = [("Steps", steps), ("Sampler", A1111_SAMPLERS[sampler]), ("CFG scale", cfg_scale), ("Seed", seed),
              ("Size", f"{width}x{height}")]
    if model_hash:
        fields.append(("Model hash", model_hash))
    fields.append(("Model", checkpoint.stem))
    if strength is not None:
        fields.append(("Denoising strength", strength))
    if batch is not None and batch[0] > 1:
        fields += [("Batch size", batch[0]), ("Batch pos", batch[1])]
    lines = [prompt] + ([f"Negative prompt: {negative_prompt}"] if negative_prompt else [])
    return "\n".join(lines + [", ".join(f"{k}: {v}" for k, v in fields)])


def parse_a1111_parameters(text: str) -> dict[str, str]:
    """Read the "parameters" text back: {"prompt", "negative_prompt", "Steps", "Sampler", ...}."""
    lines = text.split("\n")
    *head, last = lines
    result = {"prompt": "", "negative_prompt": ""}
    negative = [i for i, line in enumerate(head) if line.startswith("Negative prompt: ")]
    cut = negative[0] if negative else len(head)
    result["prompt"] = "\n".join(head[:cut])
    if negative:
        result["negative_prompt"] = "\n".join(head[cut:])[len("Negative prompt: "):]
    for pair in last.split(", "):
        key, _, value = pair.partition(": ")
        result[key] = value
    return result


def model_hash(path: Path) -> str | None:
    """AUTOMATIC1111's model hash: the first 10 hex digits of the file's sha256 (skipped for very large files)."""
    if path.stat().st_size > HASH_LIMIT:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()[:10]


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="what to draw")
    p.add_argument("-o", "--output", default="out.png", help="PNG to write; with several images: out-0.png, out-1.png, ...")
    p.add_argument("-n", "--negative-prompt", default="", help="what to steer away from")
    p.add_argument("--sampler", default="dpmpp_2m_karras", choices=list(A1111_SAMPLERS))
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    p.add_argument("--cfg-scale", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, written in the PNG)")
    p.add_argument("--height", type=int, default=None, help="image height (default: the model's training size)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the model's training size)")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="SD 1.x .safetensors/.ckpt (default: the embedded model, weights/sd-shapes.safetensors)")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default)")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--preview", type=Path, default=None,
                   help="PNG rewritten after every step with a cheap preview of the predicted image (watch it in a viewer)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sd", description="Stable Diffusion 1.x from scratch: make images from text.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generation_args(commands.add_parser("generate", help="text to image"))
    img2img = commands.add_parser("img2img", help="image to image")
    _add_generation_args(img2img)
    img2img.add_argument("--image", type=Path, required=True, help="start image")
    img2img.add_argument("--strength", type=float, default=0.6, help="how much of the image to replace, in (0, 1]")
    inpaint = commands.add_parser("inpaint", help="repaint the white part of a mask")
    _add_generation_args(inpaint)
    inpaint.add_argument("--image", type=Path, required=True, help="image to repaint")
    inpaint.add_argument("--mask", type=Path, required=True, help="mask, same size: white = repaint")
    inpaint.add_argument("--strength", type=float, default=1.0)
    inpaint.add_argument("--paste-back", action="store_true", help="keep the unmasked pixels exactly")
    commands.add_parser("train", help="train a small model on synthetic shapes (sd train --help)", add_help=False)
    return parser


def _device(name: str):
    import torch

    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _open_image(path: Path, what: str):
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return Image.open(path)
    except UnidentifiedImageError:
        raise ValueError(f"{what} {path} is not an image PIL can read") from None


def _preview_writer(models, path: Path, width: int, height: int):
    """A generate() callback that writes the linear latent preview of x̂_0 (the images side by side) to path."""
    from PIL import Image

    from .inspect.preview import LatentPreview

    preview = LatentPreview.for_models(models)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(i, t, latents, pred_original):
        frames = preview(pred_original, size=(width, height))
        strip = Image.new("RGB", (width * len(frames), height))
        for k, frame in enumerate(frames):
            strip.paste(frame, (k * width, 0))
        strip.save(path, format="PNG")

    return write


def run_generation(args: argparse.Namespace) -> list[Path]:
    import random

    import torch
    from PIL.PngImagePlugin import PngInfo

    from .model_loader import preload_models_from_standard_weights
    from .pipeline import default_size, generate

    checkpoint = args.checkpoint or EMBEDDED_CHECKPOINT
    if args.checkpoint is None and not checkpoint.is_file():
        raise FileNotFoundError(f"the embedded model {checkpoint} is missing from this installation; "
                                "pass --checkpoint weights/v1-5-pruned-emaonly.safetensors (see weights/README.md)")
    image = _open_image(args.image, "image") if getattr(args, "image", None) else None
    mask = _open_image(args.mask, "mask") if getattr(args, "mask", None) else None
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    device = _device(args.device)
    label = "embedded model" if args.checkpoint is None else "checkpoint"
    print(f"sd: {label} {checkpoint} on {device}, {args.sampler} {args.steps} steps, seed {seed}", file=sys.stderr)

    models = preload_models_from_standard_weights(checkpoint, device=device, dtype=getattr(torch, args.dtype))
    height, width = default_size(models, args.height, args.width)  # the model's training size unless given
    show = _preview_writer(models, args.preview, width, height) if args.preview else None
    images = generate(args.prompt, negative_prompt=args.negative_prompt, input_image=image, mask_image=mask,
                      strength=getattr(args, "strength", 0.8), cfg_scale=args.cfg_scale, sampler_name=args.sampler,
                      n_inference_steps=args.steps, models=models, seed=seed, device=device, height=height,
                      width=width, num_images=args.num_images, paste_back=getattr(args, "paste_back", False),
                      progress=not args.quiet, callback=show, output_type="pil")
    digest = model_hash(checkpoint)
    output = Path(args.output)
    paths = []
    for i, picture in enumerate(images):
        path = output if len(images) == 1 else output.with_name(f"{output.stem}-{i}{output.suffix or '.png'}")
        info = PngInfo()
        info.add_text("parameters", a1111_parameters(
            args.prompt, args.negative_prompt, args.steps, args.sampler, args.cfg_scale, seed, width, height,
            checkpoint, digest, strength=getattr(args, "strength", None) if image is not None else None,
            batch=(len(images), i)))
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path, format="PNG", pnginfo=info)
        paths.append(path)
        print(f"sd: wrote {path}", file=sys.stderr)
    return paths


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from .training.train import main as train_main

        return train_main(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    from .checkpoint_io import CheckpointError

    try:
        run_generation(args)
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        print(f"sd: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sd: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
