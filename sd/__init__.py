"""sd: Stable Diffusion v1.5 written from scratch in PyTorch.

Mirrors Umar Jamil's "Coding Stable Diffusion from scratch in PyTorch"
(github.com/hkproj/pytorch-stable-diffusion) and the original CompVis code
(github.com/CompVis/stable-diffusion), checked number for number against diffusers and transformers.

The tutorial's nine files are here at the top: attention, clip, encoder, decoder, diffusion, ddpm,
model_converter, model_loader, pipeline. What the tutorial does not have sits in folders named by role:
samplers/ (DDIM ... DPM++ and their registry), inspect/ (attention maps, latent previews),
training/ (the training loop and its datasets); beside them schedule (the noise schedule), tokenizer,
checkpoint_io (reading checkpoint files safely), checks (argument checks), devices (where models run), images
(input images normalised), files (every write atomic), the speed-ups (tome, deepcache, vae_tiling, speedups), what
AUTOMATIC1111 users bring (prompt_parser and conditioning: its prompt syntax; embeddings; lora), diffusers_format
(diffusers' names for the same blocks, and its folders) and cli (the `sd` command).

The public API:
    sd.preload_models_from_standard_weights(path, device, dtype)  -> {"clip", "encoder", "decoder", "diffusion"}
    sd.save_standard_weights(models, path)
    sd.generate(prompt, ..., models=..., output_type="np" | "pil")  -> uint8 array(s), or a list of PIL images
    sd.encode_prompt(models, prompts, clip_skip=1, prompt_syntax="a1111") -> the context (B, 77·k, 768)
    sd.load_embedding(models, path, token=None)                  -> the token a prompt names it by
    sd.apply_lora(models, path, multiplier=1.0)                   -> a handle; handle.remove() undoes it exactly
    sd.load_tokenizer(), sd.tokenize(prompts)                     -> CLIPTokenizer, token ids (B, 77)
    sd.AttentionMaps()          generate(..., attention_maps=...) fills it with per-token cross-attention maps
    sd.LatentPreview.for_models(models)(latents)                  -> cheap RGB previews of latents
    sd.samplers.SAMPLERS                                          -> the sampler names generate() accepts
    sd.NonFiniteError           what generate() raises when NaN/inf appears, naming where
"""

from . import interrupts

# A Ctrl-C that lands while torch's C++ side starts up can abort the process (pybind11 ends in std::terminate),
# and one inside numpy's extension breaks its import for good: it waits until both are loaded, then is raised.
with interrupts.deferred_sigint():
    import numpy
    import torch
del numpy, torch  # loaded for the modules below, not part of sd's API

from . import samplers
from .checks import NonFiniteError
from .embeddings import load_embedding
from .inspect.attention_maps import AttentionMaps
from .inspect.preview import LatentPreview
from .model_loader import preload_models_from_standard_weights, save_standard_weights
from .lora import apply_lora
from .pipeline import encode_prompt, generate
from .tokenizer import load_tokenizer, tokenize

__all__ = [
    "AttentionMaps", "LatentPreview", "NonFiniteError", "apply_lora", "encode_prompt", "generate", "load_embedding",
    "load_tokenizer", "preload_models_from_standard_weights", "samplers", "save_standard_weights", "tokenize",
]
