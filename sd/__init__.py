"""sd: Stable Diffusion v1.5 written from scratch in PyTorch.

Mirrors Umar Jamil's "Coding Stable Diffusion from scratch in PyTorch"
(github.com/hkproj/pytorch-stable-diffusion) and the original CompVis code
(github.com/CompVis/stable-diffusion), checked number for number against diffusers and transformers.

The public API, imported on first use so that `import sd` stays quick:
    sd.preload_models_from_standard_weights(path, device, dtype)  -> {"clip", "encoder", "decoder", "diffusion"}
    sd.save_standard_weights(models, path)
    sd.generate(prompt, models=..., ...)                          -> list of PIL images
    sd.load_tokenizer(), sd.tokenize(prompts)                     -> CLIPTokenizer, token ids (B, 77)
    sd.AttentionMaps()          generate(..., attention_maps=...) fills it with per-token cross-attention maps
    sd.LatentPreview.for_models(models)(latents)                  -> cheap RGB previews of latents
Submodules (sd.pipeline, sd.samplers, sd.schedule, ...) are imported on first use too.
"""

import importlib
from pathlib import Path

_API = {
    "preload_models_from_standard_weights": "model_loader",
    "save_standard_weights": "model_loader",
    "generate": "pipeline",
    "load_tokenizer": "tokenizer",
    "tokenize": "tokenizer",
    "AttentionMaps": "attention_maps",
    "LatentPreview": "preview",
}
_SUBMODULES = {p.stem for p in Path(__file__).parent.glob("*.py")} - {"__init__", "__main__"}
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'sd' has no attribute {name!r}")
