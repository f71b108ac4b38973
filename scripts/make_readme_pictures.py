"""Draw the README's pictures (docs/*.png) with the embedded model: the denoising trajectory, classifier-free
guidance, cross-attention maps and a guidance function. Every picture is seeded, so rerunning gives the same files.

Run from the repository root, with the test extra installed (it brings matplotlib):
    python scripts/make_readme_pictures.py [trajectory guidance_scales attention guidance_function]
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import sd  # noqa: E402
from sd.inspect.attention_maps import AttentionMaps  # noqa: E402
from sd.cli import EMBEDDED_CHECKPOINT  # noqa: E402
from sd.files import atomic_output  # noqa: E402
from sd.model_loader import checkpoint_image_size  # noqa: E402
from sd.pipeline import to_uint8  # noqa: E402
from sd.inspect.preview import LatentPreview  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"
DPI = 80
GUIDANCE_SCALE = 300.0


def savefig(fig, name: str) -> None:
    with atomic_output(DOCS / name) as tmp:  # a picture the README shows is replaced whole or not at all
        fig.savefig(tmp, dpi=DPI, format="png")


def show_row(axes, images, titles, interpolation="nearest"):
    for ax, image, title in zip(axes, images, titles):
        ax.imshow(image, interpolation=interpolation)
        ax.set_title(title, fontsize=9)
        ax.axis("off")


def trajectory(models, size):
    """x̂_0 decoded, the cheap linear preview of x̂_0, and the noisy state decoded, every few DDIM steps."""
    steps, shown = 20, [0, 2, 5, 9, 14, 19]
    states, predictions = [], []
    sd.generate("a red circle on a blue background", models=models, seed=0, n_inference_steps=steps, sampler_name="ddim",
                height=size, width=size, progress=False,
                callback=lambda i, t, latents, pred_original: (states.append((t, latents)), predictions.append(pred_original)),
                    output_type="pil")
    preview = LatentPreview.for_models(models)
    with torch.inference_mode():
        decoded_x0 = [to_uint8(models["decoder"](predictions[i]))[0] for i in shown]
        decoded_state = [to_uint8(models["decoder"](states[i][1]))[0] for i in shown]
    previews = [np.asarray(preview(predictions[i])[0]) for i in shown]
    fig, axes = plt.subplots(3, len(shown), figsize=(1.6 * len(shown), 5.2))
    show_row(axes[0], decoded_state, [f"latents, step {i + 1}" for i in shown])
    show_row(axes[1], decoded_x0, [f"x̂₀, step {i + 1}" for i in shown])
    show_row(axes[2], previews, ["x̂₀ linear preview" for _ in shown], interpolation="bilinear")
    fig.suptitle('"a red circle on a blue background", DDIM, 20 steps: decoded latents, decoded x̂₀, preview', fontsize=10)
    fig.tight_layout()
    savefig(fig, "denoising.png")


def guidance_scales(models, size):
    scales = [1.0, 2.0, 4.0, 7.5, 12.0]
    prompt = "a red circle on a green background"  # seed 0 without guidance misses it (benchmarks/adherence.py)
    images = [sd.generate(prompt, models=models, seed=0, cfg_scale=s, n_inference_steps=20, sampler_name="dpmpp_2m_karras",
                          height=size, width=size, progress=False, output_type="pil")[0] for s in scales]
    images.insert(0, sd.generate(prompt, models=models, seed=0, do_cfg=False, n_inference_steps=20,
                                 sampler_name="dpmpp_2m_karras", height=size, width=size, progress=False,
                                     output_type="pil")[0])
    fig, axes = plt.subplots(1, len(images), figsize=(1.6 * len(images), 2.0))
    show_row(axes, images, ["no CFG"] + [f"cfg_scale {s:g}" for s in scales])
    fig.suptitle(f'"{prompt}", seed 0', fontsize=10)
    fig.tight_layout()
    savefig(fig, "cfg.png")


def attention(models, size):
    maps = AttentionMaps()
    image = sd.generate("a green square on an orange background", models=models, seed=1, n_inference_steps=20,
                        sampler_name="dpmpp_2m_karras", height=size, width=size, progress=False, attention_maps=maps,
                            output_type="pil")[0]
    words = maps.words(0)
    fig, axes = plt.subplots(1, len(words) + 1, figsize=(1.6 * (len(words) + 1), 2.0))
    show_row(axes[:1], [image], ["image"])
    for ax, (word, m) in zip(axes[1:], words):
        ax.imshow(image.convert("L"), cmap="gray")
        ax.imshow((m / m.max()).numpy(), cmap="inferno", alpha=0.75, extent=(-0.5, size - 0.5, size - 0.5, -0.5),
                  interpolation="bilinear")
        ax.set_title(word, fontsize=9)
        ax.axis("off")
    fig.suptitle("cross-attention per token (heads, layers and steps averaged)", fontsize=10)
    fig.tight_layout()
    savefig(fig, "attention.png")


def guidance_function(models, size):
    def bluer(images):  # the Hugging Face diffusion course's colour loss
        return (images[:, 2] - 0.9).abs().mean()

    common = dict(prompt="a green square on a black background", models=models, n_inference_steps=20, sampler_name="ddim",
                  height=size, width=size, progress=False)
    images, titles = [], []
    for seed in (0, 1):
        images.append(sd.generate(**common, seed=seed, output_type="pil")[0])
        titles.append(f"seed {seed}")
        images.append(sd.generate(**common, seed=seed, guidance_fn=bluer, guidance_fn_scale=GUIDANCE_SCALE,
                                  output_type="pil")[0])
        titles.append("+ bluer loss")
    fig, axes = plt.subplots(1, len(images), figsize=(1.6 * len(images), 2.0))
    show_row(axes, images, titles)
    fig.suptitle("guidance_fn: a loss on the predicted image steers each step", fontsize=10)
    fig.tight_layout()
    savefig(fig, "guidance_fn.png")


def main():
    DOCS.mkdir(exist_ok=True)
    models = sd.preload_models_from_standard_weights(EMBEDDED_CHECKPOINT)
    size = checkpoint_image_size(EMBEDDED_CHECKPOINT)
    chosen = sys.argv[1:] or ["trajectory", "guidance_scales", "attention", "guidance_function"]
    for draw in (globals()[name] for name in chosen):
        draw(models, size)
        print("drew", draw.__name__)


if __name__ == "__main__":
    main()
