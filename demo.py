# ---
# jupyter:
#   # demo.ipynb's source, in jupytext's percent format: "# %%" starts a code cell, "# %% [markdown]" a markdown
#   # cell written as comments. Edit the notebook here, never in demo.ipynb; then run
#   # python scripts/make_demo_notebook.py to rebuild demo.ipynb with its outputs.
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Stable Diffusion from scratch: a guided tour
#
# This notebook shows, one picture at a time, the ideas of Umar Jamil's video
# [*Coding Stable Diffusion from scratch in PyTorch*](https://github.com/hkproj/pytorch-stable-diffusion), using the
# code of this repository (`sd/`). Each section says which part of the video it belongs to and which file implements
# it, so you can put the code, the video and the pictures side by side.
#
# It runs top to bottom on an ordinary CPU in a few minutes with the small model this repository ships,
# `weights/sd-shapes.safetensors`: the same three networks as Stable Diffusion 1.5, only narrower, trained from scratch
# on 64×64 pictures of coloured shapes with captions such as *"a red circle on a blue background"*. If you have put
# the real Stable Diffusion v1.5 weights in `weights/` (see `weights/README.md`), the same cells use them and make
# 512×512 pictures; then use a GPU, as on a CPU every picture takes minutes.
#
# **Contents.** 1 The noise schedule · 2 Adding noise · 3 Text to image, step by step · 4 Classifier-free guidance
# and negative prompts · 5 Samplers · 6 Image to image and inpainting · 7 Cross-attention maps · 8 Inside the models
# · 9 Training · 10 Guidance functions
#
# **Words used throughout.**
# - *Latents*: the compressed picture the diffusion model works on: 4 numbers for each 8×8 patch of pixels in SD 1.5
#   (for each 4×4 patch in the small model). The VAE's *encoder* makes them from a picture, its *decoder* turns them
#   back into one.
# - *Timestep t*: how noisy something is, from 0 (clean) to 999 (pure noise).
# - *UNet*: the network that looks at noisy latents, the timestep and the prompt, and predicts the noise in them.
# - *CLIP text encoder*: turns the prompt into the numbers the UNet reads (its "context").
# - *Seed*: the number that fixes the random noise; the same seed gives the same picture.

# %%
from pathlib import Path
import time
import warnings

import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

# tqdm's notebook progress bars want ipywidgets; this notebook turns progress bars off anyway.
warnings.filterwarnings("ignore", message="IProgress not found")
import sd
from sd.model_loader import checkpoint_image_size
from sd.pipeline import image_to_tensor, to_uint8

# %matplotlib inline
plt.rcParams.update({"figure.dpi": 72, "font.size": 8, "axes.titlesize": 8, "image.interpolation": "nearest"})

# The real SD 1.5 weights if you have them, otherwise the small model that ships with the repository.
SD15 = [Path("weights/v1-5-pruned-emaonly.safetensors"), Path("weights/v1-5-pruned-emaonly.ckpt")]
EMBEDDED = Path("weights/sd-shapes.safetensors")
CHECKPOINT = next((path for path in SD15 if path.is_file()), EMBEDDED)
SIZE = checkpoint_image_size(CHECKPOINT)  # the size it was trained at: 512 for SD 1.5, 64 for the small one
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# {"clip", "encoder", "decoder", "diffusion"}, in float32 (dtype=torch.float16 halves the memory on a GPU)
models = sd.preload_models_from_standard_weights(CHECKPOINT, device=DEVICE)
LATENT_SIZE = SIZE // models["decoder"].config.downscale
print(f"{CHECKPOINT} on {DEVICE}: {SIZE}x{SIZE} pictures from {LATENT_SIZE}x{LATENT_SIZE} latents")


# %% [markdown]
# Two small helpers: `show` draws pictures in a grid, `decode` turns latents into pictures with the VAE decoder.
# Everything else in this notebook is the library's own API: `sd.generate(...)` and the modules in `sd/`. To try
# `show`: a few of the pictures the small model learned from (`sd.training.datasets.ShapesDataset`), with their
# captions.

# %%
def show(images, titles=None, ncols=None, row_labels=None, size=1.4, title=None):
    # Pictures (PIL images or (H, W, 3) arrays) in a grid of ncols columns, with a title over each.
    images = list(images)
    ncols = ncols or len(images)
    nrows = -(-len(images) // ncols)
    width = size * ncols + (0.9 if row_labels else 0)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, size * nrows + 0.3), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([]), ax.set_yticks([])
        ax.spines[:].set_visible(False)
        if i < len(images):
            ax.imshow(images[i])
            if titles and titles[i]:
                ax.set_title(titles[i])
        if row_labels and i % ncols == 0:
            ax.set_ylabel(row_labels[i // ncols])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    plt.show()


@torch.no_grad()
def decode(latents):
    # Latents (B, 4, h, w) -> B PIL pictures, through the VAE decoder.
    return [Image.fromarray(a) for a in to_uint8(models["decoder"](latents.to(DEVICE)))]


# What every sd.generate call below shares; progress=False keeps the outputs free of progress bars.
COMMON = dict(models=models, height=SIZE, width=SIZE, progress=False)

from sd.training.datasets import ShapesDataset

examples = [ShapesDataset(size=64)[i] for i in range(6)]  # (image (3, 64, 64) in [-1, 1], caption)
show(to_uint8(torch.stack([image for image, _ in examples])),
     titles=[caption.replace(" on ", "\non ") for _, caption in examples], size=1.7)

# %% [markdown]
# ## 1. The noise schedule
# *Video: "DDPM sampler". Code: `sd/schedule.py` (`make_betas`, `make_alphas_cumprod`).*
#
# Diffusion models learn to undo noise. During training, a picture is made noisier in 1000 small steps: step t mixes
# in a little fresh noise, of variance β_t. SD 1.5 lets β grow from 0.00085 to 0.012 (numbers from its
# `v1-inference.yaml`). What matters is the total after t steps, ᾱ_t = (1 − β_1)(1 − β_2)…(1 − β_t), because the
# noisy picture at step t can be made in one go from the clean picture x_0 and pure noise ε:
#
#   **x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε**
#
# So √ᾱ_t is how much of the picture is left, and √(1 − ᾱ_t) how much noise there is. The *signal-to-noise ratio*
# ᾱ_t / (1 − ᾱ_t) falls from about 1000 to about 0.005, so it needs a log scale. The dots mark the 20 timesteps a
# 20-step DDPM or DDIM sampler visits when it generates a picture (section 3).

# %%
from sd.schedule import leading_timesteps, make_alphas_cumprod, make_betas

betas = make_betas()                          # β_t for t = 0 .. 999
alphas_cumprod = make_alphas_cumprod(betas)   # ᾱ_t
snr = alphas_cumprod / (1 - alphas_cumprod)
visited = leading_timesteps(20)               # 951, 901, ..., 1

fig, axes = plt.subplots(1, 3, figsize=(11, 2.6))
axes[0].plot(betas)
axes[0].set(title="β_t: noise added at step t", xlabel="timestep t")
axes[1].plot(alphas_cumprod.sqrt(), label="√ᾱ_t  (picture)")
axes[1].plot((1 - alphas_cumprod).sqrt(), label="√(1 − ᾱ_t)  (noise)")
axes[1].plot(visited, alphas_cumprod[visited].sqrt(), ".", color="C0")
axes[1].set(title="how much picture and noise x_t holds", xlabel="timestep t")
axes[1].legend()
axes[2].semilogy(snr)
axes[2].semilogy(visited, snr[visited], ".", color="C0")
axes[2].set(title="signal-to-noise ratio ᾱ_t / (1 − ᾱ_t)", xlabel="timestep t")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 2. The forward process: adding noise
# *Video: "DDPM sampler" (`add_noise`). Code: `sd/ddpm.py` (`DDPMSampler.add_noise`).*
#
# The formula above in action: one picture and one draw of noise ε, mixed at growing t. The top row adds the noise
# to the pixels, the way diffusion is usually drawn. Stable Diffusion, though, is a *latent* diffusion model: it adds
# the noise to the VAE's latents, not to the pixels, and the bottom row shows what the decoder makes of those noisy
# latents. Either way, at t = 999 nothing of the picture is left: that is where generating a picture starts.

# %%
from sd.training.datasets import draw
from sd.ddpm import DDPMSampler

picture = draw("circle", "red", "blue", size=SIZE)   # a flat red disc on blue, like the training pictures
x0 = image_to_tensor(picture, SIZE, SIZE).to(DEVICE)  # (1, 3, H, W) in [-1, 1]
timesteps = [0, 100, 250, 500, 750, 999]
generator = torch.Generator().manual_seed(0)
forward = DDPMSampler(generator)

with torch.no_grad():
    latents0 = models["encoder"](x0)  # (1, 4, h, w): the encoder's latents (no noise given: its mean)
    pixel_noise = torch.randn(x0.shape, generator=generator).to(DEVICE)
    latent_noise = torch.randn(latents0.shape, generator=generator).to(DEVICE)
    noisy_pixels = torch.cat([forward.add_noise(x0, t, pixel_noise) for t in timesteps])
    noisy_latents = torch.cat([forward.add_noise(latents0, t, latent_noise) for t in timesteps])

show([*to_uint8(noisy_pixels), *decode(noisy_latents)], ncols=len(timesteps), size=1.3,
     titles=[f"t = {t}" for t in timesteps] + [None] * len(timesteps),
     row_labels=["noise on pixels", "noise on latents,\ndecoded"])

# %% [markdown]
# ## 3. Text to image, step by step
# *Video: "Pipeline". Code: `sd/pipeline.py` (`generate`), `sd/samplers/ddim.py`.*
#
# Generating runs the forward process backwards. It starts from pure noise. At every step the UNet, given the prompt,
# predicts the noise ε̂ in the current latents x_t, and the sampler removes part of it, landing on a less noisy x_t at
# an earlier t. From ε̂ you can also compute the sampler's current guess of the finished picture, by solving the
# formula of section 1 for x_0:
#
#   **x̂_0 = (x_t − √(1 − ᾱ_t) · ε̂) / √ᾱ_t**
#
# `sd.generate(..., callback=fn)` calls `fn(i, t, latents, pred_original)` after each step, so we can keep both and
# decode them. Top row: the latents x_t after the step, still noisy until the end. Bottom row: the prediction x̂_0, in
# which the layout is settled within the first few steps; the rest of the steps sharpen it. This uses the DDIM
# sampler (`sampler_name="ddim"`), whose latents are on the scale the decoder expects.

# %%
prompt = "a red circle on a blue background"
trajectory = []  # (step, timestep, latents x_t, predicted x̂_0) after each step

def record(i, t, latents, pred_original):
    trajectory.append((i, t, latents.clone(), pred_original.clone()))

image = sd.generate(prompt, seed=0, sampler_name="ddim", n_inference_steps=20, callback=record,
                    **COMMON)  # (H, W, 3) uint8

shown = [0, 2, 4, 7, 11, 19]  # steps to look at
latents = decode(torch.cat([trajectory[i][2] for i in shown]))
predictions = decode(torch.cat([trajectory[i][3] for i in shown]))
show(latents + predictions, ncols=len(shown),
     titles=[f"step {i + 1}, t = {trajectory[i][1]}" for i in shown] + [None] * len(shown),
     row_labels=["latents x_t", "prediction x̂_0"], title=f'"{prompt}", seed 0, DDIM, 20 steps')

# %% [markdown]
# **A cheap preview.** Decoding costs a run of the VAE decoder, which for SD 1.5 at 512×512 takes longer than a UNet
# step. Image apps show a live preview instead, using a trick: each latent pixel's 4 numbers are close to a linear
# function of the colour of its patch, so multiplying by a 4×3 matrix turns latents into a small, blurry RGB picture
# almost for free (`sd/inspect/preview.py`, `LatentPreview`; SD 1.5's matrix is the one AUTOMATIC1111 and ComfyUI use, and
# for the small model it is fitted by least squares on a few encoded pictures). Top: the preview of x̂_0 at every
# other step, one pixel per latent pixel; bottom: the decoder's picture of the same latents. On the small model's
# VAE the linear map explains only about three quarters of the colours, so its preview gets them roughly; the layout
# shows all the same.

# %%
from sd.inspect.preview import LatentPreview

preview = LatentPreview.for_models(models)
steps = list(range(1, 20, 2))
predictions = torch.cat([trajectory[i][3] for i in steps])

start = time.perf_counter()
previews = preview(predictions)  # a 4x3 matrix product per latent pixel: pictures at the latents' size
preview_ms = (time.perf_counter() - start) * 1000 / len(steps)
start = time.perf_counter()
decoded = decode(predictions)
decode_ms = (time.perf_counter() - start) * 1000 / len(steps)

show(previews + decoded, ncols=len(steps), size=1.0,
     titles=[f"step {i + 1}" for i in steps] + [None] * len(steps),
     row_labels=[f"preview\n{preview_ms:.2f} ms each", f"decoder\n{decode_ms:.1f} ms each"])

# %% [markdown]
# ## 4. Classifier-free guidance
# *Video: "Pipeline" (classifier-free guidance). Code: `noise_model` inside `generate` in `sd/pipeline.py`.*
#
# At every step the UNet runs twice: once with the prompt and once with an empty prompt. (It learned both: during
# training, one caption in ten was replaced by an empty one.) The two noise predictions are combined as
#
#   **ε̂ = ε̂(empty) + s · (ε̂(prompt) − ε̂(empty))**
#
# The difference is "what the prompt changes", and the guidance scale s (`cfg_scale`) exaggerates it. With s = 1 the
# result is the prompt's prediction alone, the same as `do_cfg=False`, which skips the run with the empty prompt.
# A larger s follows the prompt more closely (here: the right background colour and the right shape), at the cost of
# variety and, when s is large, of over-saturated colours. Same seed in every column.

# %%
prompts = ["a red circle on a blue background", "a black triangle on a blue background"]
settings = {"do_cfg=False": dict(do_cfg=False)}
settings |= {f"cfg_scale={s}": dict(cfg_scale=s) for s in (1, 3, 7.5, 15)}
results = {label: sd.generate(prompts, seed=0, sampler_name="dpmpp_2m_karras", n_inference_steps=20,
                              **options, **COMMON)
           for label, options in settings.items()}

show([results[label][p] for p in range(len(prompts)) for label in settings], ncols=len(settings),
     titles=list(settings) + [None] * len(settings), row_labels=[p.replace(" on ", "\non ") for p in prompts])

# %% [markdown]
# **Negative prompts.** The empty prompt in the formula can be any text: `negative_prompt=` replaces it, and guidance
# then pushes *away* from it, ε̂ = ε̂(negative) + s · (ε̂(prompt) − ε̂(negative)). Below, the prompt leaves the colour
# open ("a circle on a blue background") and the model chooses purple; a negative prompt that names purple makes it
# choose something else. A negative prompt pushes away from everything it says: "a red circle" also pushes away from
# *circle*, and the circle nearly disappears. The small model never saw a negative prompt in training (only captions
# and empty ones), so the push can overshoot into a dark colour; SD 1.5 takes negative prompts such as
# "blurry, low quality" in its stride.

# %%
prompt = "a circle on a blue background"
negatives = ["", "purple", "a purple circle", "a red circle"]
images = [sd.generate(prompt, negative_prompt=negative, seed=0, sampler_name="dpmpp_2m_karras",
                      n_inference_steps=20, **COMMON)
          for negative in negatives]
show(images, titles=[f'negative: "{n}"' for n in negatives], size=1.8, title=f'prompt: "{prompt}"')

# %% [markdown]
# ## 5. Samplers
# *Video: "DDPM sampler". Code: `sd/samplers/__init__.py` (the list), `sd/ddpm.py`, `sd/samplers/ddim.py`,
# `sd/samplers/euler.py`, `sd/samplers/heun.py`, `sd/samplers/lms.py`, `sd/samplers/dpm_solver.py`.*
#
# The UNet only predicts noise; the sampler decides how to use that prediction to step from one timestep to an
# earlier one. The video codes DDPM (Ho et al. 2020), which adds fresh random noise at every step and needs about 50
# steps. Later methods see generation as solving a differential equation from noise to picture and take fewer,
# better-aimed steps: DDIM, Euler, Heun (two UNet runs per step), linear multistep (LMS), DPM-Solver++; "karras"
# spaces the steps more densely at low noise (Karras et al. 2022). All nine, same seed, 20 steps:

# %%
from sd.samplers import SAMPLERS

prompt = "a green triangle on a white background"
by_sampler = {name: sd.generate(prompt, seed=0, sampler_name=name, n_inference_steps=20, **COMMON)
              for name in SAMPLERS}
show(by_sampler.values(), titles=list(by_sampler), size=1.3, title=f'"{prompt}", seed 0, 20 steps')


# %% [markdown]
# **How many steps are enough?** Each sampler's picture after 2 to 50 steps, compared with a reference made with 200
# steps of DPM++ 2M: the error is the mean difference per pixel (on the 0–255 scale). The deterministic samplers all
# solve the same equation from the same starting noise, so their error shrinks as the steps grow; on a log-log plot
# a steeper line means a higher-order method: Heun and DPM++ 2M (second order) get within about a pixel value by 30
# steps, while DDIM and Euler (first order) creep down. DDPM and Euler ancestral (dashed) add new noise at every
# step: they do not converge to one picture but make a different, equally valid one, so their error stays high by
# design. LMS (fourth order, from several past steps) goes wrong from about 8 to 30 steps on this small model with
# guidance 7.5, as in the 20-step picture above: high-order multistep methods amplify errors when the guided noise
# prediction changes fast. That is the method, not a bug: diffusers' `LMSDiscreteScheduler` gives the same pictures.

# %%
def picture(sampler_name, n_steps):
    image = sd.generate(prompt, seed=0, sampler_name=sampler_name, n_inference_steps=n_steps, **COMMON)
    return image.astype(np.float64)

step_counts = [2, 3, 5, 8, 12, 20, 30, 50]
reference = picture("dpmpp_2m", 200)
errors = {name: [np.abs(picture(name, n) - reference).mean() for n in step_counts] for name in SAMPLERS}

fig, ax = plt.subplots(figsize=(6, 3.6))
for name, errs in errors.items():
    ax.loglog(step_counts, errs, "o-" if name not in ("ddpm", "euler_a") else "o--", label=name, markersize=3)
ax.set(xlabel="steps", ylabel="mean |pixel − reference|  (0–255)",
       title="distance from a 200-step DPM++ 2M picture")
ax.set_xticks(step_counts, [str(n) for n in step_counts], minor=False)
ax.set_xticks([], minor=True)
ax.legend(fontsize=7, ncol=2)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 6. Image to image and inpainting
# *Video: "Pipeline" (image to image, `strength`). Code: `sd/pipeline.py`; `set_strength` in `sd/ddpm.py`,
# `start_step` in `sd/schedule.py`.*
#
# Image to image starts from a picture instead of pure noise: encode it, noise it to a middle timestep (section 2)
# and run only the remaining steps. `strength` says how far up the noise ladder to go: 0.2 keeps almost everything
# (only the last 20% of the steps run, from t ≈ 200), 1.0 starts from pure noise and forgets the picture. In between,
# the result keeps the layout (position and size) and takes what the prompt asks for.

# %%
start_picture = draw("circle", "red", "blue", size=SIZE)
prompt = "a green triangle on a blue background"
strengths = [0.2, 0.4, 0.5, 0.6, 0.8, 1.0]
edited = [sd.generate(prompt, input_image=start_picture, strength=s, seed=0,
                      sampler_name="dpmpp_2m_karras", n_inference_steps=20, **COMMON)
          for s in strengths]
show([start_picture, *edited], titles=["start"] + [f"strength {s}" for s in strengths],
     title=f'"{prompt}"')

# %% [markdown]
# **Inpainting.** A mask says which pixels to repaint (white) and which to keep (black). With a standard checkpoint,
# after every step the part outside the mask is replaced by the original latents noised to the same level, so the
# model paints the hole to fit what is around it ("Keep what lies outside the mask" in `sd/pipeline.py`).
# `paste_back=True` also copies the original pixels outside the mask into the result at the end: they come back
# exactly, instead of slightly softened by the trip through the VAE.

# %%
start_picture = draw("circle", "red", "white", size=SIZE, radius=SIZE * 0.22)
mask = Image.new("L", (SIZE, SIZE), 0)  # black: keep
low, high = SIZE * 3 // 16, SIZE * 13 // 16
mask.paste(255, (low, low, high, high))  # a white square over the circle: repaint
prompt = "a green triangle on a white background"
inpaint = dict(input_image=start_picture, mask_image=mask, strength=1.0, seed=4,
               sampler_name="dpmpp_2m_karras", n_inference_steps=20, **COMMON)
painted = sd.generate(prompt, **inpaint)
pasted = sd.generate(prompt, paste_back=True, **inpaint)
show([start_picture, mask.convert("RGB"), painted, pasted], size=1.8, title=f'"{prompt}"',
     titles=["picture", "mask (white = repaint)", "inpainted", "inpainted, paste_back"])

# %% [markdown]
# ## 7. Where does each word look? Cross-attention maps
# *Video: "Attention" and "UNET" (the cross-attention `attention_2` of `UNET_AttentionBlock`). Code:
# `sd/attention.py`, `sd/diffusion.py`, `sd/inspect/attention_maps.py`.*
#
# The prompt reaches the picture only through cross-attention. In each attention block of the UNet, every latent
# pixel makes a query, every token of the prompt a key, and softmax(Q·Kᵀ / √d) says how much each pixel takes from
# each token. `sd.generate(..., attention_maps=AttentionMaps())` records these weights for each picture, averaged over
# heads, layers and steps. Below, each word's map is drawn over the picture (bright = the pixels that attend to that
# word most; each map is scaled to its own maximum). Much of the attention goes to the start-of-text token, which
# works as a "nothing in particular" slot; it is left out here.

# %%
from sd.inspect.attention_maps import AttentionMaps

prompt = "a red circle on a blue background"
maps = AttentionMaps()
image = sd.generate(prompt, seed=0, sampler_name="dpmpp_2m_karras", n_inference_steps=20,
                    attention_maps=maps, **COMMON)
words = maps.words(0)  # [(token, map (h, w)), ...] for the prompt's own tokens

fig, axes = plt.subplots(1, len(words) + 1, figsize=(1.4 * (len(words) + 1), 1.8))
axes[0].imshow(image)
axes[0].set_title("picture")
for ax, (word, attention) in zip(axes[1:], words):
    ax.imshow(image.mean(axis=2), cmap="gray", vmin=0, vmax=255)  # the picture in grey ...
    ax.imshow(attention / attention.max(), cmap="inferno", alpha=0.7, vmin=0, vmax=1,  # ... the map over it,
              interpolation="bilinear", extent=(-0.5, SIZE - 0.5, SIZE - 0.5, -0.5))  # stretched to fit
    ax.set_title(f'"{word}"')
for ax in axes:
    ax.axis("off")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 8. Inside the models
# *Video: "VAE encoder", "VAE decoder", "CLIP", "UNET". Code: `sd/encoder.py`, `sd/decoder.py`, `sd/clip.py`,
# `sd/diffusion.py`.*
#
# The VAE encoder shrinks the picture 8 times in each direction (the small model: 4 times) into 4 channels, and
# multiplies them by a constant (0.18215 for SD 1.5) so that they have about unit variance. Below: a picture, its 4
# latent channels (blue below zero, red above), and the decoder's reconstruction from them. The latents still look
# like the picture, which is why the cheap preview of section 3 works, and why diffusion on latents is so much
# cheaper than on pixels while losing little.

# %%
picture = draw("square", "yellow", "purple", size=SIZE)
with torch.no_grad():
    latents = models["encoder"](image_to_tensor(picture, SIZE, SIZE).to(DEVICE))  # (1, 4, h, w)
reconstruction = decode(latents)[0]

fig, axes = plt.subplots(1, 6, figsize=(10, 1.9))
axes[0].imshow(picture)
axes[0].set_title(f"picture\n{SIZE}x{SIZE}")
limit = latents.abs().max().item()
for c in range(4):
    axes[c + 1].imshow(latents[0, c].cpu(), cmap="coolwarm", vmin=-limit, vmax=limit)
    axes[c + 1].set_title(f"latent channel {c}\n{LATENT_SIZE}x{LATENT_SIZE}")
axes[5].imshow(reconstruction)
error = np.abs(np.asarray(reconstruction, dtype=float) - np.asarray(picture, dtype=float)).mean()
axes[5].set_title(f"decoded\nmean error {error:.1f}/255")
for ax in axes:
    ax.axis("off")
fig.tight_layout()
plt.show()

# %% [markdown]
# **Where the parameters are.** The UNet holds most of them. SD 1.5's counts come from building the full-size
# models on PyTorch's `meta` device, which creates their structure without allocating any memory for weights.

# %%
from sd.clip import CLIPConfig
from sd.decoder import VAEConfig
from sd.diffusion import DiffusionConfig
from sd.model_loader import build_models

def parameter_counts(models):
    n = lambda name: sum(p.numel() for p in models[name].parameters())
    return {"UNet": n("diffusion"), "CLIP text encoder": n("clip"),
            "VAE (encoder + decoder)": n("encoder") + n("decoder")}

# The default configs are SD 1.5's; on the meta device the models have shapes but no weights.
full_size = build_models({"clip": CLIPConfig(), "vae": VAEConfig(), "diffusion": DiffusionConfig()},
                         device="meta")
counts = {"SD 1.5": parameter_counts(full_size)}
if CHECKPOINT == EMBEDDED:
    counts["the small model"] = parameter_counts(models)

fig, ax = plt.subplots(figsize=(7, 2.4))
parts = list(counts["SD 1.5"])
width = 0.8 / len(counts)
for k, (label, count) in enumerate(counts.items()):
    bars = ax.barh([i + k * width for i in range(len(parts))], list(count.values()), height=width,
                   label=label)
    ax.bar_label(bars, labels=[f"{v:,}" for v in count.values()], fontsize=7, padding=2)
ax.set_yticks([i + width * (len(counts) - 1) / 2 for i in range(len(parts))], parts)
ax.set_xscale("log")
ax.set_xlim(1e5, 2e10)
ax.set_xlabel("parameters (log scale)")
ax.legend(loc="upper right")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 9. Training
# *Video: the training objective is explained but not coded. Code: `sd/training/train.py` (`train_diffusion`),
# `sd/training/datasets.py` (`ShapesDataset`).*
#
# Training is the forward process plus a guessing game. Take a training picture and its caption; encode the picture;
# pick a random timestep t and random noise ε; make x_t as in section 2; ask the UNet to predict ε from x_t, t and
# the caption's CLIP embedding. The loss is the squared error **‖ε − ε̂‖²** (Ho et al. 2020, eq. 14), and the AdamW
# optimiser changes the UNet's weights to lower it, one batch at a time.
#
# Here a *new*, small UNet (about a million parameters) starts from random weights and trains for 300 steps of 16
# pictures on the synthetic shapes, reusing the small model's VAE and text encoder unchanged. That takes a minute or
# two on a CPU. The shipped model was trained the same way (3000 steps, 40 minutes; `weights/README.md`).

# %%
import tempfile

from sd.training.datasets import ShapesDataset
from sd.diffusion import Diffusion, DiffusionConfig
from sd.training.train import TrainConfig, checkpoint_path, load_ema, train_diffusion

# The small model's VAE and text encoder (whatever CHECKPOINT is), and a new UNet with random weights:
# SD's architecture, two levels instead of four, 32 channels instead of 320.
shapes = models if CHECKPOINT == EMBEDDED else sd.preload_models_from_standard_weights(EMBEDDED, DEVICE)
torch.manual_seed(0)
unet = Diffusion(DiffusionConfig(model_channels=32, channel_mult=(1, 2), n_res_blocks=1,
                                 attention_levels=(False, True), n_heads=4, n_groups=8,
                                 d_context=shapes["clip"].config.d_model))
student = {**shapes, "diffusion": unet}
config = TrainConfig(
    steps=300,
    batch_size=16,
    lr=2e-3,                   # high for a UNet, fine for a small one trained briefly
    warmup_steps=20,
    ema_decay=0.99,            # the weights used for sampling average the last ~100 steps
    train_text_encoder=False,  # the small model's text encoder already knows the captions
    device=DEVICE,
)
sample_prompts = ["a red circle on a blue background", "a yellow square on a black background",
                  "a green triangle on a white background"]
sample = dict(seed=0, sampler_name="ddim", n_inference_steps=20, height=64, width=64, progress=False)

before = sd.generate(sample_prompts, models=student, **sample)
with tempfile.TemporaryDirectory() as run_dir:  # train_diffusion writes a checkpoint at the end
    losses = train_diffusion(student, ShapesDataset(size=64), config, run_dir, progress=False)
    trained = load_ema(student, checkpoint_path(run_dir, config.steps))  # the averaged (EMA) weights
after = sd.generate(sample_prompts, models=trained, **sample)
shipped = sd.generate(sample_prompts, models=shapes, **sample)

fig, ax = plt.subplots(figsize=(6, 2.6))
ax.plot(losses, alpha=0.3, label="each step")
window = 20
ax.plot(range(window - 1, len(losses)), np.convolve(losses, np.ones(window) / window, mode="valid"),
        label=f"average of {window} steps")
ax.set(yscale="log", xlabel="training step", ylabel="loss ‖ε − ε̂‖²",
       title="training a new UNet on the shapes")
ax.legend()
fig.tight_layout()
plt.show()
show([*before, *after, *shipped], ncols=len(sample_prompts), size=1.3,
     titles=[p.replace(" on ", "\non ") for p in sample_prompts] + [None] * 6,
     row_labels=["random UNet", f"after {config.steps} steps", "shipped model\n(3000 steps)"])


# %% [markdown]
# ## 10. Guidance functions: steering with any loss
# *Not in the video; from unit 2 ("Fine-tuning and guidance") of the
# [Hugging Face diffusion course](https://huggingface.co/learn/diffusion-course/unit2/1). Code: `guide` inside
# `generate` in `sd/pipeline.py`. Reference: Dhariwal & Nichol 2021, eq. 14.*
#
# Classifier-free guidance steers with a prompt. You can also steer with any function of the picture that PyTorch
# can differentiate: at every step, decode the prediction x̂_0, compute a loss on it, and nudge the noise prediction
# along the loss's gradient, so that the sampler moves toward pictures with a lower loss. Here the loss is the
# course's colour loss, "how far the blue channel is from 0.9", and `guidance_fn_scale` says how hard to push (200
# when not given, the course's value; the loss is an average over every pixel, so its gradient is small and the
# scale large). Same prompt, same seed. The small model knows only eight flat colours, so instead of tinting the
# picture blue it tips over, between 100 and 200, to a background it knows that is bluer.

# %%
def blue_loss(images):
    # images: the decoded prediction (B, 3, H, W), colours in [0, 1]. Low when every pixel is strongly blue.
    return (images[:, 2] - 0.9).abs().mean()

prompt = "a yellow square on a green background"
scales = [0, 100, 200, 300]
bluer = [sd.generate(prompt, seed=0, sampler_name="dpmpp_2m_karras", n_inference_steps=20, **COMMON,
                     **(dict(guidance_fn=blue_loss, guidance_fn_scale=s) if s else {}))
         for s in scales]
blue = [image[..., 2].mean() for image in bluer]  # the blue channel, 0..255
titles = [("no guidance_fn" if s == 0 else f"guidance_fn_scale={s}") + f"\nmean blue {b:.0f}/255"
          for s, b in zip(scales, blue)]
show(bluer, size=1.8, titles=titles, title=f'"{prompt}", seed 0')

# %% [markdown]
# ## Where next
# - `README.md`: the library's API, the `sd` command (`sd generate`, `sd img2img`, `sd inpaint`, `sd train`) and the
#   table of which file holds which part of the video.
# - `benchmarks/`: how each sampler converges, how well the small model follows its prompts.
# - To change this notebook: edit its source, `demo.py`, then run `python scripts/make_demo_notebook.py`.
