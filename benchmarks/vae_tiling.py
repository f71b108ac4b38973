"""What tiled VAE decoding (sd.vae_tiling) saves and what it costs: the peak memory and time of a full-size SD 1.5
decode, untiled and tiled, in float32 and bfloat16; and, on the embedded model, how far a tiled decode is from the
untiled one in 8-bit pixels, with side-by-side pictures (untiled | tiled | 10x amplified difference).

Not part of the test suite (a 1024x1024 decode on 2 CPU cores takes minutes; tests/test_vae_tiling.py proves the
properties at tiny size). Random weights stand in for the released VAE: its sizes and dtype, so memory and time are
those of the real one. Each decode runs in a fresh process (this script with --child), so that the peaks do not mix.
Run: python benchmarks/vae_tiling.py [--size 1024] [--out /tmp/vae_tiling.png] [--threads 2] [--skip-full-size]
Units: GB = 10^9 bytes; peak RSS is VmHWM from /proc/self/status (Linux), baseline the VmRSS just before the decode.
"""

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # tests/reference.py: random weights

from children import child_main, in_subprocess  # noqa: E402  (benchmarks/children.py)
from sd.decoder import VAEConfig  # noqa: E402
from sd.vae_tiling import DECODE_OVERLAP, DECODE_TILE, decode_tiled, tile_starts  # noqa: E402

GB = 1e9
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EMBEDDED_SIZE = 256       # pixels: 64x64 latents for the embedded model (downscale 4), 4x its training size
EMBEDDED_TILINGS = ((48, 16), (32, 8), (16, 4))  # (tile, overlap) in latents: 2x2, 3x3 and 5x5 tiles
AMPLIFY = 10              # the difference picture shows 10 x |tiled - untiled|


def status_bytes(field: str) -> int:
    """A size from /proc/self/status (VmRSS: resident now; VmHWM: the peak of this process), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # the file reports kB
    raise RuntimeError(f"no {field} in /proc/self/status (this benchmark needs Linux)")


# --- full size: one decode per fresh process -------------------------------------------------------------------------


def child_decode(size: int, dtype: str, tiled: bool, threads: int) -> dict:
    """Run inside a fresh process: build the full-size decoder, decode one size x size image, report peak and time."""
    from reference import randomize_
    from sd.decoder import VAE_Decoder
    from sd.devices import run_in_dtype

    torch.set_num_threads(threads)
    cfg = VAEConfig()
    decoder = randomize_(VAE_Decoder(cfg), seed=0).eval().to(DTYPES[dtype])
    latents = torch.randn(1, cfg.latent_channels, size // cfg.downscale, size // cfg.downscale,
                          generator=torch.Generator().manual_seed(0))
    baseline, before = status_bytes("VmRSS"), status_bytes("VmHWM")
    start = time.perf_counter()
    with torch.inference_mode():
        image = decode_tiled(decoder, latents) if tiled else run_in_dtype(decoder, latents)
    seconds = time.perf_counter() - start
    assert image.shape == (1, cfg.image_channels, size, size) and image.dtype == torch.float32
    return {"baseline": baseline, "peak": status_bytes("VmHWM"), "build_peak": before, "seconds": seconds,
            "finite": bool(torch.isfinite(image).all())}


def measure_full_size(size: int, threads: int) -> list[dict]:
    rows = []
    for dtype in DTYPES:
        for tiled in (False, True):
            r = in_subprocess(__file__, "decode", size=size, dtype=dtype, tiled=tiled, threads=threads)
            r.update(dtype=dtype, tiled=tiled)
            rows.append(r)
            if r["build_peak"] >= r["peak"]:
                print("  warning: the peak was reached building the model, not decoding")
            print(f"  {size}x{size} {dtype} {'tiled' if tiled else 'untiled'}: peak {r['peak'] / GB:.2f} GB "
                  f"(baseline {r['baseline'] / GB:.2f} GB), {r['seconds']:.1f} s", flush=True)
    return rows


def n_tiles(latent_size: int) -> int:
    return len(tile_starts(latent_size, DECODE_TILE, DECODE_OVERLAP)) ** 2


# --- the embedded model: how far tiled is from untiled ---------------------------------------------------------------


@torch.no_grad()
def measure_embedded(out: Path, seed: int) -> list[dict]:
    from sd.cli import EMBEDDED_CHECKPOINT
    from sd.model_loader import preload_models_from_standard_weights
    from sd.pipeline import generate, to_uint8

    models = preload_models_from_standard_weights(EMBEDDED_CHECKPOINT)
    final = {}
    generate("a red circle on a blue background", models=models, seed=seed, n_inference_steps=20,
             sampler_name="dpmpp_2m_karras", height=EMBEDDED_SIZE, width=EMBEDDED_SIZE, progress=False,
             callback=lambda i, t, x, pred: final.update(latents=x))
    latents = final["latents"]  # (1, 4, 64, 64): what generate() decodes
    plain = to_uint8(models["decoder"](latents))[0]
    rows, pictures = [], []
    for tile, overlap in EMBEDDED_TILINGS:
        tiled = to_uint8(decode_tiled(models["decoder"], latents, tile, overlap))[0]
        diff = np.abs(tiled.astype(np.int16) - plain.astype(np.int16))
        rows.append({"tile": tile, "overlap": overlap, "mean": float(diff.mean()), "max": int(diff.max())})
        amplified = np.clip(diff * AMPLIFY, 0, 255).astype(np.uint8)
        pictures.append(np.concatenate([plain, tiled, amplified], axis=1))  # (H, 3W, 3): untiled | tiled | diff
        print(f"  tile {tile}, overlap {overlap} latents: mean |diff| {diff.mean():.2f}, max {diff.max()}", flush=True)
    Image.fromarray(np.concatenate(pictures, axis=0)).save(out)
    print(f"  wrote {out} (rows: {', '.join(f'tile {t}/overlap {o}' for t, o in EMBEDDED_TILINGS)})")
    return rows


# --- report ----------------------------------------------------------------------------------------------------------


def report(size: int, threads: int, full: list[dict], embedded: list[dict], out: Path) -> str:
    lines = ["### Tiled VAE decoding (`benchmarks/vae_tiling.py`)", "",
             f"torch {torch.__version__}, {threads} CPU threads, {platform.machine()}, {os.cpu_count()} cores", ""]
    if full:
        latent_size = size // VAEConfig().downscale
        lines += [f"Full-size SD 1.5 decoder (random weights), one {size}x{size} image ({latent_size}x{latent_size} "
                  f"latents); tiled = {n_tiles(latent_size)} tiles of {DECODE_TILE} latents, overlap >= "
                  f"{DECODE_OVERLAP}; each run in a fresh process:", "",
                  "| dtype | decode | peak RSS | baseline | decode adds | vs untiled | time |",
                  "|---|---|---|---|---|---|---|"]
        for r in full:
            untiled = next(u for u in full if u["dtype"] == r["dtype"] and not u["tiled"])
            added = r["peak"] - r["baseline"]
            lines.append(f"| {r['dtype']} | {'tiled' if r['tiled'] else 'untiled'} | {r['peak'] / GB:.2f} GB "
                         f"| {r['baseline'] / GB:.2f} GB | {added / GB:.2f} GB "
                         f"| {added / (untiled['peak'] - untiled['baseline']):.2f} | {r['seconds']:.0f} s |")
    if embedded:
        lines += ["", f"Embedded model, a {EMBEDDED_SIZE}x{EMBEDDED_SIZE} generation (64x64 latents), tiled vs untiled "
                  f"decode in 8-bit pixels (pictures: `{out}`, untiled | tiled | {AMPLIFY}x difference):", "",
                  "| tile | overlap | mean abs diff | max abs diff |", "|---|---|---|---|"]
        lines += [f"| {r['tile']} latents | {r['overlap']} | {r['mean']:.2f} | {r['max']} |" for r in embedded]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="image side of the full-size decode (a multiple of 8)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/vae_tiling.png"), help="where to save the pictures")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the full-size decodes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the embedded model's generation")
    parser.add_argument("--skip-full-size", action="store_true", help="only the embedded-model comparison")
    parser.add_argument("--skip-embedded", action="store_true", help="only the full-size memory and time")
    parser.add_argument("--child", nargs=2, metavar=("NAME", "KWARGS_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:  # a subprocess started by in_subprocess
        child_main({"decode": child_decode}, *args.child)
        return

    full = embedded = []
    if not args.skip_embedded:
        print(f"== embedded model: {EMBEDDED_SIZE}x{EMBEDDED_SIZE}, tiled vs untiled")
        embedded = measure_embedded(args.out, args.seed)
    if not args.skip_full_size:
        print(f"== full-size SD 1.5 decoder: {args.size}x{args.size}, each decode in a fresh process")
        full = measure_full_size(args.size, args.threads)
    print()
    print(report(args.size, args.threads, full, embedded, args.out))


if __name__ == "__main__":
    main()
