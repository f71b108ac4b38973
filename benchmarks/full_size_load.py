"""Full-size SD 1.5 check: checkpoint files of the real size and layout, the peak memory of loading them,
and parity of every model with diffusers / transformers at full size.

Not part of the test suite (it writes two 4.3 GB files, needs ~11 GB of RAM and takes 4-6 minutes on 2 CPU cores); the tests
prove the same things at tiny size in seconds. Random weights stand in for the released ones: the layout,
sizes and dtypes are those of v1-5-pruned-emaonly, so memory and parity behave as with the real file.
Run from anywhere: python benchmarks/full_size_load.py [--workdir DIR] [--keep] [--skip-memory] [--skip-parity]
Units: GB = 10^9 bytes; RSS from /proc/self/status (VmRSS) and getrusage (ru_maxrss, KiB on Linux).
"""

import argparse
import gc
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # tests/reference.py: random weights and the diffusers / transformers references

from children import child_main, in_subprocess  # noqa: E402  (benchmarks/children.py)
from sd.model_converter import CLIP_PREFIXES, UNET_PREFIX, VAE_PREFIX, to_standard_weights  # noqa: E402
from sd.model_loader import preload_models_from_standard_weights, save_standard_weights  # noqa: E402

GB = 1e9
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
FILE_NAMES = {"safetensors": "sd15-random.safetensors", "ckpt": "sd15-random.ckpt"}
FP32_TARGET = 1.3             # (peak - baseline) / file size that loading in fp32 should stay under
TINY_RTOL = 1e-5              # the bound tests/test_parity.py asserts at tiny size


# ------------------------------------------------------------------------------------------------
# Memory probes (Linux)
# ------------------------------------------------------------------------------------------------

def vm_rss() -> int:
    """This process's resident memory now, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024  # the file reports kB
    raise RuntimeError("no VmRSS in /proc/self/status (this benchmark needs Linux)")


def peak_rss() -> int:
    """This process's peak resident memory, in bytes. Linux carries ru_maxrss across fork and exec, so in a
    subprocess it is at least the parent's RSS at the fork: main() keeps the parent small until the loads are
    measured (the 4.3 GB models are built in a subprocess too), and each child cross-checks against VmHWM."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def vm_hwm() -> int:
    """Peak RSS of this process's own address space (reset by exec), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (this benchmark needs Linux)")


# ------------------------------------------------------------------------------------------------
# Step 1: full-size checkpoints with random weights, in the released layouts
# ------------------------------------------------------------------------------------------------

def child_write(safetensors: str, ckpt: str, seed: int) -> dict:
    """Run inside a subprocess (the models take 4.3 GB, and the parent must stay small, see peak_rss)."""
    from reference import random_models

    paths = {"safetensors": Path(safetensors), "ckpt": Path(ckpt)}
    t0 = time.perf_counter()
    models = random_models({}, seed=seed)  # {}: every config at its SD 1.5 default
    n_params = sum(p.numel() for m in models.values() for p in m.parameters())
    print(f"  built the four full-size models with random weights (seed {seed}): "
          f"{n_params / 1e6:.1f} M parameters, {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    save_standard_weights(models, paths["safetensors"])
    gc.collect()
    print(f"  wrote {paths['safetensors']} in {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    state = to_standard_weights(models)
    torch.save({"state_dict": state}, paths["ckpt"])  # the released .ckpt layout: the weights under "state_dict"
    del state, models
    gc.collect()
    print(f"  wrote {paths['ckpt']} in {time.perf_counter() - t0:.1f} s")
    return {}


# ------------------------------------------------------------------------------------------------
# Step 2: peak memory of loading, each load in a fresh process
# ------------------------------------------------------------------------------------------------

def child_ours(path: str, dtype: str) -> dict:
    """Run inside a fresh process: load with our loader and report memory and time."""
    baseline = vm_rss()
    t0 = time.perf_counter()
    models = preload_models_from_standard_weights(path, dtype=DTYPES[dtype])
    seconds = time.perf_counter() - t0
    peak, after = peak_rss(), vm_rss()
    params = [p for m in models.values() for p in m.parameters()]
    assert all(p.dtype == DTYPES[dtype] for p in params), "a parameter has the wrong dtype"
    return {"baseline": baseline, "peak": peak, "hwm": vm_hwm(), "after": after, "seconds": seconds,
            "model_bytes": sum(p.nbytes for p in params)}


def child_naive(path: str, dtype: str) -> dict:
    """Run inside a fresh process: the usual way to load a single file, for a baseline: the whole state dict
    in memory (safetensors.torch.load_file), the diffusers / transformers models built on the CPU with their
    initial weights (tests/reference.py), then model.load_state_dict from the converted keys."""
    from safetensors.torch import load_file

    from reference import diffusers_unet, diffusers_vae, transformers_clip
    from sd.clip import CLIPConfig
    from sd.decoder import VAEConfig
    from sd.diffusion import DiffusionConfig

    assert dtype == "fp32", "the naive reference loads in the file's dtype"
    baseline = vm_rss()
    t0 = time.perf_counter()
    state = load_file(path)
    models = [transformers_clip(CLIPConfig(), state), diffusers_vae(VAEConfig(), state),
              diffusers_unet(DiffusionConfig(), state)]
    seconds = time.perf_counter() - t0
    peak, hwm = peak_rss(), vm_hwm()
    del state
    gc.collect()
    return {"baseline": baseline, "peak": peak, "hwm": hwm, "after": vm_rss(), "seconds": seconds,
            "model_bytes": sum(p.nbytes for m in models for p in m.parameters())}


CHILDREN = {"write": child_write, "ours": child_ours, "naive": child_naive}


def measure_memory(paths: dict[str, Path]) -> list[dict]:
    # Both formats are mapped (safe_open; torch.load(mmap=True)); each tensor is copied into its fresh parameter,
    # converting to fp16 on the way, and its pages released (sd.checkpoint_io.Checkpoint.release), so the peak is
    # about the parameters alone.
    runs = [("ours", "safetensors", "fp32", None), ("ours", "ckpt", "fp32", None),
            ("ours", "safetensors", "fp16", None), ("ours", "ckpt", "fp16", None),
            ("naive", "safetensors", "fp32", None)]
    rows = []
    for method, fmt, dtype, env in runs:
        r = in_subprocess(__file__, method, env=env, path=str(paths[fmt]), dtype=dtype)
        if abs(r["peak"] - r["hwm"]) > 0.02 * r["peak"]:
            print(f"  warning: ru_maxrss {r['peak'] / GB:.2f} GB but VmHWM {r['hwm'] / GB:.2f} GB; ru_maxrss "
                  f"includes the parent's RSS at fork, so the parent was too large for a clean measurement")
        label = method
        r.update(method=label, format=fmt, dtype=dtype, file_size=paths[fmt].stat().st_size)
        r["ratio"] = (r["peak"] - r["baseline"]) / r["file_size"]
        rows.append(r)
        print(f"  {label} {fmt} {dtype}: peak {r['peak'] / GB:.2f} GB, baseline {r['baseline'] / GB:.2f} GB, "
              f"peak - baseline {(r['peak'] - r['baseline']) / GB:.2f} GB = {r['ratio']:.3f} x file, "
              f"{r['seconds']:.1f} s", flush=True)
    naive = next(r for r in rows if r["method"] == "naive")
    for r in rows:
        r["vs_naive"] = (r["peak"] - r["baseline"]) / (naive["peak"] - naive["baseline"])
    return rows


# ------------------------------------------------------------------------------------------------
# Step 3: full-size parity, one model at a time
# ------------------------------------------------------------------------------------------------

def reference_state(path: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The file's tensors under the given prefixes, read by the safetensors library (not our reader):
    safetensors.torch.load_file restricted to one model's keys, so only that model's weights are held."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefixes)}


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def compare(name: str, ours_fn, ref_fn, repeats: int) -> dict:
    """Forwards in turn (reference, ours, reference, ours, ...; the first of a run pays for warming the
    allocator), the best time of each, and how far apart the outputs of the first pair are."""
    expected, t_ref = timed(ref_fn)
    out, t_ours = timed(ours_fn)
    for _ in range(repeats - 1):
        t_ref = min(t_ref, timed(ref_fn)[1])
        t_ours = min(t_ours, timed(ours_fn)[1])
    assert out.shape == expected.shape, f"{name}: our output {tuple(out.shape)}, reference {tuple(expected.shape)}"
    diff = (out - expected).abs().max().item()
    scale = expected.abs().max().item()
    row = {"model": name, "shape": tuple(out.shape), "diff": diff, "scale": scale, "rel": diff / scale,
           "t_ours": t_ours, "t_ref": t_ref, "finite": bool(torch.isfinite(out).all())}
    print(f"  {name}: max |diff| {diff:.3g}, scale {scale:.3g}, relative {diff / scale:.3g}; "
          f"ours {t_ours:.2f} s, reference {t_ref:.2f} s", flush=True)
    return row


@torch.no_grad()
def check_parity(path: Path, seed: int, repeats: int) -> list[dict]:
    from reference import diffusers_unet, diffusers_vae, transformers_clip

    t0 = time.perf_counter()
    ours = preload_models_from_standard_weights(path)  # fp32
    print(f"  loaded our four models from {path.name} in {time.perf_counter() - t0:.1f} s")
    g = torch.Generator().manual_seed(seed)
    rows = []

    cfg = ours["clip"].config
    ref = transformers_clip(cfg, reference_state(path, CLIP_PREFIXES))
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.n_tokens), generator=g)
    rows.append(compare("CLIP text encoder", lambda: ours["clip"](tokens),
                        lambda: ref(input_ids=tokens).last_hidden_state, repeats))
    del ref, ours["clip"]
    gc.collect()

    cfg = ours["diffusion"].config
    ref = diffusers_unet(cfg, reference_state(path, (UNET_PREFIX,)))
    latent = torch.randn(1, cfg.in_channels, 64, 64, generator=g)  # a 512x512 image's latent
    context = torch.randn(1, 77, cfg.d_context, generator=g)
    t = torch.tensor(981)
    rows.append(compare("UNet", lambda: ours["diffusion"](latent, context, t),
                        lambda: ref(latent, t, encoder_hidden_states=context).sample, repeats))
    del ref, ours["diffusion"]
    gc.collect()

    cfg = ours["encoder"].config
    ref = diffusers_vae(cfg, reference_state(path, (VAE_PREFIX,)))
    image = torch.rand(1, cfg.image_channels, 256, 256, generator=g) * 2 - 1
    noise = torch.randn(1, cfg.latent_channels, 256 // cfg.downscale, 256 // cfg.downscale, generator=g)

    def ref_encode():
        dist = ref.encode(image).latent_dist
        return (dist.mean + dist.std * noise) * cfg.latent_scale

    rows.append(compare("VAE encoder", lambda: ours["encoder"](image, noise), ref_encode, repeats))
    latents = torch.randn(1, cfg.latent_channels, 32, 32, generator=g)
    rows.append(compare("VAE decoder", lambda: ours["decoder"](latents),
                        lambda: ref.decode(latents / cfg.latent_scale).sample, repeats))
    del ref, ours
    gc.collect()
    return rows


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------

def report(env: dict, sizes: dict, memory: list[dict], parity: list[dict], repeats: int, total_s: float) -> str:
    out = ["### Full-size SD 1.5 loading and parity (`benchmarks/full_size_load.py`)", ""]
    out.append(", ".join(f"{k}: {v}" for k, v in env.items()))
    out.append("")
    out.append("| file | size |")
    out.append("|---|---|")
    for fmt, size in sizes.items():
        out.append(f"| `{FILE_NAMES[fmt]}` | {size / GB:.3f} GB |")
    if memory:
        out += ["", "Peak memory of loading, each in a fresh process (GB = 10^9 B; baseline = RSS after imports; "
                "ratio = (peak - baseline) / file size; naive = `safetensors.torch.load_file` + "
                "diffusers/transformers models built on CPU + `load_state_dict`):", ""]
        out.append("| loader | file | dtype | peak RSS | baseline | peak - baseline | ratio to file | vs naive "
                   "| params held | load time |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in memory:
            out.append(f"| {r['method']} | {r['format']} | {r['dtype']} | {r['peak'] / GB:.2f} GB "
                       f"| {r['baseline'] / GB:.2f} GB | {(r['peak'] - r['baseline']) / GB:.2f} GB | {r['ratio']:.3f} "
                       f"| {r['vs_naive']:.2f} | {r['model_bytes'] / GB:.2f} GB | {r['seconds']:.1f} s |")
        fp32 = [r["ratio"] for r in memory if r["method"] == "ours" and r["dtype"] == "fp32"]
        fp16 = [r["ratio"] for r in memory if r["method"] == "ours" and r["dtype"] == "fp16"]
        out.append("")
        out.append(f"Target: ratio <= {FP32_TARGET} in fp32 ({'met' if max(fp32) <= FP32_TARGET else 'NOT met'}: "
                   f"worst {max(fp32):.3f}), about half that in fp16 (worst {max(fp16):.3f}). "
                   f"Load times are with the file in the page cache.")
    if parity:
        out += ["", f"Parity at full size, fp32 (relative = max |diff| / max |reference|; the tests assert "
                f"<= {TINY_RTOL:g} at tiny size). Times: best of {repeats} forwards, reference and ours in turn:", ""]
        out.append("| model | output | max abs diff | output scale | relative | <= 1e-5 | ours | reference | ours / ref |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for r in parity:
            ok = "yes" if r["rel"] <= TINY_RTOL and r["finite"] else "no"
            out.append(f"| {r['model']} | {'x'.join(map(str, r['shape']))} | {r['diff']:.3g} | {r['scale']:.3g} "
                       f"| {r['rel']:.3g} | {ok} | {r['t_ours']:.2f} s | {r['t_ref']:.2f} s "
                       f"| {r['t_ours'] / r['t_ref']:.2f} |")
    out += ["", f"Total runtime: {total_s / 60:.1f} min ({total_s:.0f} s)."]
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to write the two 4.3 GB checkpoints (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint files at the end")
    parser.add_argument("--reuse", action="store_true",
                        help="use the checkpoints already in --workdir (from a run with --keep) instead of writing them")
    parser.add_argument("--skip-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--skip-parity", action="store_true", help="skip the parity checks against diffusers/transformers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="forwards of each model for the timings (best is kept)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the forwards")
    parser.add_argument("--child", nargs=2, metavar=("NAME", "KWARGS_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:  # a subprocess started by in_subprocess
        child_main(CHILDREN, *args.child)
        return

    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    made_dir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="sd-full-size-")) if made_dir else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    needed = 2 * 4.3 * GB
    free = shutil.disk_usage(workdir).free
    if not args.reuse and free < needed * 1.1:
        raise SystemExit(f"{workdir} has {free / GB:.1f} GB free; this benchmark writes {needed / GB:.1f} GB. "
                         f"Pass --workdir on a larger disk.")

    # Versions without importing diffusers / transformers: the parent stays small (see peak_rss).
    env = {"torch": torch.__version__, "diffusers": version("diffusers"), "transformers": version("transformers"),
           "CPU threads": torch.get_num_threads(), "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    paths = {fmt: workdir / name for fmt, name in FILE_NAMES.items()}
    try:
        print("== 1. writing full-size checkpoints")
        if args.reuse and all(p.exists() for p in paths.values()):
            print(f"  reusing {', '.join(str(p) for p in paths.values())}")
        else:
            in_subprocess(__file__, "write", safetensors=str(paths["safetensors"]), ckpt=str(paths["ckpt"]), seed=args.seed)
        sizes = {fmt: p.stat().st_size for fmt, p in paths.items()}
        for fmt, size in sizes.items():
            print(f"  {paths[fmt].name}: {size / GB:.3f} GB")

        memory = []
        if not args.skip_memory:
            print("== 2. peak memory of loading (fresh process each)")
            memory = measure_memory(paths)

        parity = []
        if not args.skip_parity:
            print("== 3. parity at full size (fp32)")
            parity = check_parity(paths["safetensors"], args.seed, args.repeats)
    finally:
        if not args.keep:
            for p in paths.values():
                p.unlink(missing_ok=True)
            if made_dir:
                shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {', '.join(str(p) for p in paths.values())}")

    print()
    print(report(env, sizes, memory, parity, args.repeats, time.perf_counter() - start))


if __name__ == "__main__":
    main()
