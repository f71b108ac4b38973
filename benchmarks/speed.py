"""Speed of sd against diffusers at full SD 1.5 size, with the same weights in both, interleaved in one process.

Measures (median seconds over --reps, wall clock; ours, diffusers, ours, diffusers, ... after one untimed warm-up
call each, whose outputs are the ones compared):
  1. one UNet forward with classifier-free guidance (batch 2, size/8 latents, 77x768 context), fp32 and bf16;
  2. the VAE decode of one size/8 latent to a size x size image, fp32 and bf16;
  3. a whole --steps-step dpmpp_2m_karras text-to-image at CFG 7.5 in bf16 (--image-reps, no warm-up): our
     generate(), diffusers' StableDiffusionPipeline with DPMSolverMultistepScheduler(use_karras_sigmas=True,
     algorithm_type="dpmsolver++") from the same start noise, and ours with tome_ratio=0.5, deepcache_interval=3
     (where generate() has them);
plus how far bf16 moves our outputs from fp32, and whether ours-bf16 sits as close to diffusers-bf16 as diffusers-bf16
sits to diffusers-fp32; the peak RSS of our bf16 generation (load + one image) in a fresh process (target <= 3.5 GB);
the machine, versions and load average. --device cuda: fp16 instead of bf16, synchronized timings, and
torch.cuda.max_memory_allocated for the peak.
Weights: --checkpoint (an SD 1.5 .safetensors / EMA-only .ckpt), else a random-weight checkpoint in the real layout and
size (4.27 GB, written as benchmarks/full_size_load.py does; random weights cost the same time as real ones).
Cost at 512x512, 20 steps on 2 CPU cores: about 1-1.5 h, estimated (each image is minutes, the memory check makes one
more; writing the random checkpoint 1-2 min), ~12 GB RAM at peak (--skip-fp32: ~9.5 GB), 4.3 GB of temporary disk;
--size 128 --steps 2 --reps 1 --skip-fp32: 1-3 min. --skip-fp32, --skip-image, --size 256,
--steps and --reps make it cheaper; run it on a quiet machine (it warns when the load average says otherwise).
Run from anywhere: python benchmarks/speed.py [--checkpoint PATH] [--reps 3] [--image-reps 1] [--device cuda]
Units: seconds (time.perf_counter); GB = 10^9 bytes; pixel differences in 8-bit levels (0-255).
"""

import argparse
import gc
import inspect
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # tests/reference.py: random weights and the diffusers / transformers references

from children import child_main, in_subprocess  # noqa: E402  (benchmarks/: beside this file)
from full_size_load import vm_hwm  # noqa: E402
from sd.devices import resolve_device  # noqa: E402
from sd.model_converter import CLIP_PREFIXES, EMA_PREFIX, UNET_PREFIX, VAE_PREFIX  # noqa: E402
from sd.model_loader import preload_models_from_standard_weights, save_standard_weights  # noqa: E402
from sd.pipeline import generate, to_uint8  # noqa: E402

GB = 1e9
RANDOM_CHECKPOINT = "sd15-random.safetensors"  # full_size_load.py's name: its --keep files serve --reuse here
RSS_TARGET = 3.5 * GB          # the bound on our 512x512 bf16 generation, load included
QUIET_LOAD = 0.5               # a 1-minute load average above this before starting: the timings share the CPU
SAMPLER = "dpmpp_2m_karras"
CFG_SCALE = 7.5
PROMPT = "a photograph of an astronaut riding a horse"
T_UNET = 981                   # a timestep near the start of sampling, as full_size_load.py's parity check uses
ACCELERATIONS = {"tome_ratio": 0.5, "deepcache_interval": 3}  # generate()'s ToMe and DeepCache options
# SD 1.5's scheduler_config.json (as tests/test_samplers.py); with use_karras_sigmas=True and dpmsolver++ the
# DPMSolverMultistepScheduler our dpmpp_2m_karras matches step for step there.
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      steps_offset=1, use_karras_sigmas=True, algorithm_type="dpmsolver++")


# ------------------------------------------------------------------------------------------------
# The machine
# ------------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    info = {"CPU": cpu_model(), "cores": os.cpu_count(), "torch threads": torch.get_num_threads(),
            "AMX": torch.cpu._is_amx_tile_supported(), "AVX-512-BF16": torch.cpu._is_avx512_bf16_supported()}
    if device.type == "cuda":
        info["GPU"] = torch.cuda.get_device_name(device)
    info.update({"torch": torch.__version__, "diffusers": version("diffusers"), "transformers": version("transformers")})
    return info


def load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


# ------------------------------------------------------------------------------------------------
# Timing and comparing
# ------------------------------------------------------------------------------------------------

def timed(fn, device: torch.device):
    """(fn(), its wall-clock seconds); on CUDA the queued work is waited for on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


def interleaved(runs: dict, reps: int, device: torch.device, warmup: bool = True) -> tuple[dict, dict]:
    """Each run in turn, reps times (ours, diffusers, ours, diffusers, ...): (first outputs, median seconds).
    warmup: one untimed call of each first, whose output is the one returned (it pays for the allocator's first use)."""
    outputs, times = {}, {name: [] for name in runs}
    if warmup:
        for name, fn in runs.items():
            outputs[name] = fn()
    for _ in range(reps):
        for name, fn in runs.items():
            out, seconds = timed(fn, device)
            outputs.setdefault(name, out)
            times[name].append(seconds)
            print(f"    {name}: {seconds:.2f} s", flush=True)
    return outputs, {name: statistics.median(t) for name, t in times.items()}


def difference(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = (a.float() - b.float()).abs()
    return {"max": d.max().item(), "mean": d.mean().item(), "scale": b.float().abs().max().item()}


def pixel_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two uint8 images, in 8-bit levels."""
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ------------------------------------------------------------------------------------------------
# Weights: a random checkpoint in the real layout, and the diffusers / transformers references from the same file
# ------------------------------------------------------------------------------------------------

def reference_state(path: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The file's tensors under the given prefixes: a .safetensors read by the safetensors library (not our reader),
    a .ckpt through sd.checkpoint_io (torch's weights-only unpickler; views of the mapped file)."""
    from safetensors import safe_open

    from sd.checkpoint_io import open_checkpoint

    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefixes)}
    ckpt = open_checkpoint(path)
    if any(k.startswith(EMA_PREFIX + "diffusion_model") for k in ckpt):
        # We would load the EMA copy, diffusers' converter (as tests/reference.py calls it) the other one.
        raise SystemExit(f"{path.name} holds two sets of UNet weights (EMA and not, as v1-5-pruned.ckpt): pass "
                         f"v1-5-pruned-emaonly.safetensors or .ckpt, so that both libraries load the same weights")
    return {k: v for k, v in ckpt.items() if k.startswith(prefixes)}


def child_write(path: str, seed: int) -> dict:
    """In a subprocess: the four full-size models with random weights, saved in the released layout."""
    from reference import random_models

    t0 = time.perf_counter()
    models = random_models({}, seed=seed)  # {}: every config at its SD 1.5 default
    save_standard_weights(models, path)
    print(f"  wrote {path} (random weights, seed {seed}) in {time.perf_counter() - t0:.0f} s", flush=True)
    return {}


def child_memory(path: str, device: str, size: int, steps: int, seed: int, threads: int | None) -> dict:
    """In a fresh process: load in the half dtype, make one image; the process's peak memory."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    half = half_dtype(device)
    t0 = time.perf_counter()
    models = preload_models_from_standard_weights(path, device=device, dtype=half)
    load_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _, generate_s = timed(lambda: generate(PROMPT, models=models, sampler_name=SAMPLER, n_inference_steps=steps,
                                           seed=seed, height=size, width=size, cfg_scale=CFG_SCALE, progress=False),
                          device)
    result = {"hwm": vm_hwm(), "load_s": load_s, "generate_s": generate_s}
    if device.type == "cuda":
        result["cuda_peak"] = torch.cuda.max_memory_allocated(device)
    return result


CHILDREN = {"write": child_write, "memory": child_memory}


def half_dtype(device: torch.device) -> torch.dtype:
    """bf16 on the CPU (fp16 is slow there and too narrow for the VAE), fp16 on CUDA."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


# ------------------------------------------------------------------------------------------------
# The measurements
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def time_models(ours: dict, refs: dict, dtype: torch.dtype, size: int, reps: int, device: torch.device,
                seed: int) -> tuple[list[dict], dict]:
    """Item 1 and 2 in one dtype: (table rows, outputs by name)."""
    cfg, vae_cfg = ours["diffusion"].config, ours["decoder"].config
    g = torch.Generator().manual_seed(seed)
    h = size // vae_cfg.downscale
    latent = torch.randn(1, cfg.in_channels, h, h, generator=g)
    x = torch.cat([latent] * 2).to(device, dtype)  # CFG: the unconditional and conditional halves in one batch
    context = torch.randn(2, 77, cfg.d_context, generator=g).to(device, dtype)
    t = torch.tensor(T_UNET, device=device)
    z = torch.randn(1, vae_cfg.latent_channels, h, h, generator=g).to(device, dtype)
    name = dtype_name(dtype)
    rows, outputs = [], {}

    print(f"  UNet forward, {name}")
    out, med = interleaved({"ours": lambda: ours["diffusion"](x, context, t),
                            "diffusers": lambda: refs["unet"](x, t, encoder_hidden_states=context).sample},
                           reps, device)
    rows.append({"item": f"UNet forward, CFG batch 2, {h}x{h} latents, {name}", "kind": "unet", **med})
    outputs.update({f"unet ours {name}": out["ours"].float().cpu(), f"unet diffusers {name}": out["diffusers"].float().cpu()})

    print(f"  VAE decode, {name}")
    out, med = interleaved({"ours": lambda: ours["decoder"](z),
                            "diffusers": lambda: refs["vae"].decode(z / vae_cfg.latent_scale).sample},
                           reps, device)
    rows.append({"item": f"VAE decode {h}x{h} -> {size}x{size}, {name}", "kind": "vae", **med})
    outputs.update({f"vae ours {name}": out["ours"].float().cpu(), f"vae diffusers {name}": out["diffusers"].float().cpu()})
    return rows, outputs


def diffusers_pipeline(refs: dict, clip, device: torch.device):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from sd.tokenizer import load_tokenizer

    pipe = StableDiffusionPipeline(vae=refs["vae"], text_encoder=clip, tokenizer=load_tokenizer(), unet=refs["unet"],
                                   scheduler=DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def time_images(ours: dict, pipe, dtype: torch.dtype, size: int, steps: int, reps: int, device: torch.device,
                seed: int) -> tuple[list[dict], dict, str | None]:
    """Item 3: (table rows, first images by name as uint8 (H, W, 3), a note on a skipped row)."""
    h = size // ours["decoder"].config.downscale
    # generate()'s first draw from a CPU generator seeded with seed (pipeline.prepare_latents): the same start for
    # diffusers, in its dtype (it keeps the latents there; ours keeps them in fp32).
    start = torch.randn(1, ours["diffusion"].config.out_channels, h, h, generator=torch.Generator().manual_seed(seed))
    common = dict(models=ours, sampler_name=SAMPLER, n_inference_steps=steps, seed=seed, height=size, width=size,
                  cfg_scale=CFG_SCALE, progress=False)
    runs = {"ours": lambda: generate(PROMPT, **common),
            "diffusers": lambda: (pipe(PROMPT, height=size, width=size, num_inference_steps=steps,
                                       guidance_scale=CFG_SCALE, latents=start.to(device, dtype),
                                       output_type="np").images[0] * 255).round().astype(np.uint8)}
    note = None
    if set(ACCELERATIONS) <= set(inspect.signature(generate).parameters):
        runs["ours accelerated"] = lambda: generate(PROMPT, **common, **ACCELERATIONS)
    else:
        note = (f"ours with {', '.join(f'{k}={v}' for k, v in ACCELERATIONS.items())}: skipped, this generate() "
                f"has no {' / '.join(ACCELERATIONS)}")
    print(f"  {size}x{size} txt2img, {steps} steps {SAMPLER}, {dtype_name(dtype)}")
    with torch.inference_mode():
        images, med = interleaved(runs, reps, device, warmup=False)
    name = dtype_name(dtype)
    labels = {"ours": f"txt2img {size}x{size}, {steps} steps, {name}",
              "ours accelerated": f"txt2img, ours + ToMe {ACCELERATIONS['tome_ratio']} + DeepCache "
                                  f"{ACCELERATIONS['deepcache_interval']} (diffusers: plain), {name}"}
    rows = [{"item": labels["ours"], "kind": "image", "ours": med["ours"], "diffusers": med["diffusers"]}]
    if "ours accelerated" in med:
        rows.append({"item": labels["ours accelerated"], "kind": "image", "ours": med["ours accelerated"],
                     "diffusers": med["diffusers"]})
    return rows, images, note


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------

def report(args, env: dict, rows: list[dict], outputs: dict, images: dict, memory: dict | None, notes: list[str],
           loads: tuple[str, str], parent_hwm: int, total_s: float, half: str) -> str:
    out = [f"### Speed of sd against diffusers, SD 1.5 at {args.size}x{args.size} (`benchmarks/speed.py`)", "",
           ", ".join(f"{k}: {v}" for k, v in env.items()), "",
           f"Weights: {args.checkpoint or 'random, in the real layout and size'}; device {args.device}; median of "
           f"{args.reps} (models) / {args.image_reps} (images), ours and diffusers in turn. "
           f"Load average (1 / 5 / 15 min) before {loads[0]}, after {loads[1]}.", ""]
    out += ["| item | ours | diffusers | ours / diffusers | ours per image | diffusers per image |",
            "|---|---|---|---|---|---|"]
    for r in rows:
        per = args.steps if r["kind"] == "unet" else 1  # a UNet row's share of one image: one forward per step
        out.append(f"| {r['item']} | {r['ours']:.2f} s | {r['diffusers']:.2f} s | {r['ours'] / r['diffusers']:.2f} "
                   f"| {per * r['ours']:.1f} s | {per * r['diffusers']:.1f} s |")
    out += ["", f"Per image: a UNet row times {args.steps} steps (the UNet's share of one image; CFG is in the batch), "
            f"a decode row once, an image row as measured. ours / diffusers < 1: ours is faster."]

    comparisons = []  # (what, outputs a and b, is an image)
    for kind, what in (("unet", "UNet output"), ("vae", "decoded image")):
        pairs = [(f"our {what}: {half} vs fp32", f"{kind} ours {half}", f"{kind} ours fp32"),
                 (f"{what}: ours-{half} vs diffusers-{half}", f"{kind} ours {half}", f"{kind} diffusers {half}"),
                 (f"{what}: diffusers-{half} vs diffusers-fp32", f"{kind} diffusers {half}", f"{kind} diffusers fp32"),
                 (f"{what}: ours-fp32 vs diffusers-fp32 (parity)", f"{kind} ours fp32", f"{kind} diffusers fp32")]
        comparisons += [(w, a, b, kind == "vae") for w, a, b in pairs if a in outputs and b in outputs]
    if comparisons:
        out += ["", "| comparison | max abs diff | mean abs diff | max abs of the second | mean 8-bit pixel diff |",
                "|---|---|---|---|---|"]
        for what, a, b, image in comparisons:
            d = difference(outputs[a], outputs[b])
            pixels = f"{pixel_difference(to_uint8(outputs[a]), to_uint8(outputs[b])):.3f}" if image else "-"
            out.append(f"| {what} | {d['max']:.4g} | {d['mean']:.4g} | {d['scale']:.4g} | {pixels} |")
        if "unet diffusers fp32" in outputs:
            ours_d = difference(outputs[f"unet ours {half}"], outputs[f"unet diffusers {half}"])["mean"]
            ref_d = difference(outputs[f"unet diffusers {half}"], outputs["unet diffusers fp32"])["mean"]
            ratio = f"{ours_d / ref_d:.2f}" if ref_d else "n/a"
            out += ["", f"UNet in {half}: mean |ours-{half} - diffusers-{half}| {ours_d:.3g} against mean "
                    f"|diffusers-{half} - diffusers-fp32| {ref_d:.3g}, ratio {ratio} (at or below 1: ours departs from "
                    f"diffusers in {half} no more than diffusers' own {half} departs from its fp32)."]
    if images:
        out += ["", f"Images ({args.size}x{args.size}, same start noise): ours vs diffusers mean 8-bit pixel diff "
                f"{pixel_difference(images['ours'], images['diffusers']):.2f}"
                + (f"; ours accelerated vs ours plain {pixel_difference(images['ours accelerated'], images['ours']):.2f}"
                   if "ours accelerated" in images else "") + "."]
    if memory:
        hwm = memory["hwm"]
        line = (f"Peak memory of our {args.size}x{args.size} {half} generation, fresh process (load + one image, "
                f"{args.steps} steps): VmHWM {hwm / GB:.2f} GB")
        if "cuda_peak" in memory:
            line += f", torch.cuda.max_memory_allocated {memory['cuda_peak'] / GB:.2f} GB"
        else:
            line += (f" (target <= {RSS_TARGET / GB:g} GB at 512x512: "
                     f"{'met' if hwm <= RSS_TARGET else 'NOT met'}{'' if args.size == 512 else ', at another size'})")
        out += ["", line + f"; load {memory['load_s']:.1f} s, generate {memory['generate_s']:.1f} s."]
    if notes:
        out += [""] + [f"Note: {n}" for n in notes]
    out += ["", f"This process's peak RSS {parent_hwm / GB:.2f} GB; total runtime {total_s / 60:.1f} min "
            f"({total_s:.0f} s)."]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="an SD 1.5 checkpoint (default: write a random-weight one of the real size)")
    parser.add_argument("--device", default="cpu", help="cpu (bf16) or cuda (fp16)")
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (latents: size / 8)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps of the images")
    parser.add_argument("--reps", type=int, default=3, help="timed calls of each model, ours and diffusers in turn")
    parser.add_argument("--image-reps", type=int, default=1, help="timed images of each kind (minutes each on a CPU)")
    parser.add_argument("--skip-fp32", action="store_true", help="time only the half dtype (and skip what compares with fp32)")
    parser.add_argument("--skip-image", action="store_true", help="skip the whole images and the memory check")
    parser.add_argument("--skip-memory", action="store_true", help="skip the peak-memory subprocess")
    parser.add_argument("--seed", type=int, default=0, help="the random weights' and the inputs' seed")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to write the 4.3 GB random checkpoint (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the random checkpoint at the end")
    parser.add_argument("--reuse", action="store_true", help=f"use {RANDOM_CHECKPOINT} already in --workdir")
    parser.add_argument("--child", nargs=2, metavar=("NAME", "KWARGS_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("size", "steps", "reps", "image_reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.size % 8:
        parser.error(f"--size must be a multiple of 8 (the VAE's downscale), got {args.size}")
    try:
        args.device = resolve_device(args.device)
    except ValueError as e:
        parser.exit(2, f"{parser.prog}: {e}\n")
    if args.device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device}")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        parser.error(f"--checkpoint {args.checkpoint}: no such file")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:  # a subprocess started by in_subprocess
        child_main(CHILDREN, *args.child)
        return

    start_s = time.perf_counter()
    load_before = load_average()
    if os.getloadavg()[0] > QUIET_LOAD:
        print(f"warning: the 1-minute load average is {os.getloadavg()[0]:.2f} (> {QUIET_LOAD}): other work shares "
              f"the CPU, so the timings will be slow and noisy", flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, half = args.device, half_dtype(args.device)
    env = machine(device)
    print(", ".join(f"{k}: {v}" for k, v in env.items()), flush=True)

    made_dir = args.checkpoint is None and args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="sd-speed-")) if made_dir else args.workdir
    path = args.checkpoint or workdir / RANDOM_CHECKPOINT
    rows, outputs, images, notes, memory = [], {}, {}, [], None
    try:
        if args.checkpoint is None:
            workdir.mkdir(parents=True, exist_ok=True)
            if args.reuse and path.exists():
                print(f"== reusing {path}")
            else:
                free = shutil.disk_usage(workdir).free
                if free < 4.3 * GB * 1.1:
                    raise SystemExit(f"{workdir} has {free / GB:.1f} GB free; the random checkpoint takes 4.3 GB. "
                                     f"Pass --workdir on a larger disk.")
                print("== writing a full-size random-weight checkpoint", flush=True)
                in_subprocess(__file__, "write", path=str(path), seed=args.seed)

        if not (args.skip_image or args.skip_memory):
            # First, while this process is small and the CPU otherwise idle.
            print(f"== peak memory of our {dtype_name(half)} generation (fresh process)", flush=True)
            memory = in_subprocess(__file__, "memory", path=str(path), device=str(device), size=args.size, steps=args.steps,
                                   seed=args.seed, threads=args.threads)
            print(f"  VmHWM {memory['hwm'] / GB:.2f} GB", flush=True)

        from reference import diffusers_unet, diffusers_vae, transformers_clip

        print("== loading both", flush=True)
        ours = preload_models_from_standard_weights(path, device=device,
                                                    dtype=half if args.skip_fp32 else torch.float32)
        refs = {"unet": diffusers_unet(ours["diffusion"].config, reference_state(path, (UNET_PREFIX,))),
                "vae": diffusers_vae(ours["decoder"].config, reference_state(path, (VAE_PREFIX,)))}
        if not args.skip_fp32:
            print("== fp32", flush=True)
            refs = {k: m.to(device) for k, m in refs.items()}
            r, o = time_models(ours, refs, torch.float32, args.size, args.reps, device, args.seed)
            rows += r
            outputs.update(o)
            del ours  # the half copies come from the file, as a user loads them; the fp32 ones go first
            gc.collect()
            ours = preload_models_from_standard_weights(path, device=device, dtype=half)
        refs = {k: m.to(device, half) for k, m in refs.items()}  # in place: the fp32 weights are freed
        gc.collect()
        print(f"== {dtype_name(half)}", flush=True)
        r, o = time_models(ours, refs, half, args.size, args.reps, device, args.seed)
        rows += r
        outputs.update(o)

        if not args.skip_image:
            # transformers' eager attention (tests/reference.py, for exact parity); the text encoder runs once per
            # image, well under 1% of its time either way.
            clip = transformers_clip(ours["clip"].config, reference_state(path, CLIP_PREFIXES)).to(device, half)
            pipe = diffusers_pipeline(refs, clip, device)
            r, images, note = time_images(ours, pipe, half, args.size, args.steps, args.image_reps, device, args.seed)
            rows += r
            notes += [note] if note else []
        del ours, refs
        gc.collect()
    finally:
        if args.checkpoint is None:
            if args.keep:
                print(f"kept {path}")
            else:
                path.unlink(missing_ok=True)
                if made_dir:
                    shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(report(args, env, rows, outputs, images, memory, notes, (load_before, load_average()), vm_hwm(),
                 time.perf_counter() - start_s, dtype_name(half)))


if __name__ == "__main__":
    main()
