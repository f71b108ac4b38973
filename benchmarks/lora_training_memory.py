"""Peak memory and seconds per step of LoRA training of the full-size SD 1.5 UNet at 512x512, batch 1, on a CPU.

The four models at SD 1.5's size with random weights, made directly in the base dtype (bf16 by default, as
`sd train --base-dtype bf16` keeps them), a rank-8 LoRA on kohya's default targets, and train_diffusion on two
512x512 pictures: the same loop `sd train --data ... --lora-rank 8` runs. Each variant (with and without gradient
checkpointing) runs in its own process, so each peak RSS (getrusage ru_maxrss) is its own; s/step is the median of
the steps after the first. Not run in CI.
Run: python benchmarks/lora_training_memory.py [--steps 4] [--dtype bf16]
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sd.model_loader import build_models
from sd.training.lora_network import LoraNetwork
from sd.training.progress import LOG_FILE, read_log
from sd.training.train import TrainConfig, train_diffusion
from sd.training.image_folder import ImageFolderDataset

SIZE = 512
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def rss_gb() -> float:
    """This process's resident memory now, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def run(steps: int, dtype: torch.dtype, checkpointing: bool) -> dict:
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # every weight made in the base dtype: no float32 copy of the UNet on the way
    try:
        models = build_models({})
    finally:
        torch.set_default_dtype(default)
    models = {name: model.eval() for name, model in models.items()}
    loaded = rss_gb()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        rng = np.random.default_rng(0)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(data / f"{i}.png")
        dataset = ImageFolderDataset(data, SIZE, caption="a photo of a sks dog")
        network = LoraNetwork(models, rank=8)
        cfg = TrainConfig(steps=steps, batch_size=1, lr=1e-4, warmup_steps=0, ema_decay=0.0, caption_dropout=0.0,
                          train_text_encoder=False, gradient_checkpointing=checkpointing, device="cpu")
        out = Path(tmp) / "out"
        train_diffusion(models, dataset, cfg, out, lora=network, progress=False)
        seconds = [row["seconds"] for row in read_log(out / LOG_FILE)]
    per_step = [b - a for a, b in zip(seconds, seconds[1:])]
    return {"loaded_gb": loaded, "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "first_step_s": seconds[0], "s_per_step": statistics.median(per_step) if per_step else seconds[0],
            "lora_params": sum(p.numel() for p in network.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--one", choices=["checkpointing", "plain"], help=argparse.SUPPRESS)  # a child's variant
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run(args.steps, DTYPES[args.dtype], args.one == "checkpointing")))
        return
    results = {}
    for variant in ("checkpointing", "plain"):
        child = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--dtype", args.dtype,
                                "--one", variant], capture_output=True, text=True)
        if child.returncode:
            print(f"{variant}: failed: {child.stderr.strip().splitlines()[-1]}")
            continue
        results[variant] = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"LoRA rank 8 (kohya's default targets) on the full-size SD 1.5 UNet, {args.dtype} base, 512x512, "
          f"batch 1, {args.steps} steps:")
    for variant, r in results.items():
        print(f"  gradient checkpointing {'on ' if variant == 'checkpointing' else 'off'}: peak RSS {r['peak_gb']:.2f} GB "
              f"(models alone {r['loaded_gb']:.2f} GB), {r['s_per_step']:.1f} s/step (first step "
              f"{r['first_step_s']:.1f} s), {r['lora_params'] / 1e6:.1f}M trained parameters")


if __name__ == "__main__":
    main()
