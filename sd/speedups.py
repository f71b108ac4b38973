"""The optional speed-ups and memory savers of generate(), each off by default and each checked before any work.

No tutorial counterpart. Token Merging (sd.tome, Bolya & Hoffman 2023) and DeepCache (sd.deepcache, Ma et al. 2023)
trade a little quality for speed; attention slicing (sd.attention) and the tiled VAE (sd.vae_tiling) trade a little
speed for memory. README "Speed" gives what each costs and saves, as benchmarks/speed.py measured it.
"""

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from .attention import check_slice_size, sliced_attention
from .checks import check
from .deepcache import INTERVAL as DEEPCACHE_INTERVAL, check_interval, deep_cache
from .tome import RATIO as TOME_RATIO, check_ratio, merged_tokens

TOME_SEED = 0  # Token Merging's random destinations: the same for every call, so a seed keeps its image


@dataclass(frozen=True)
class Speedups:
    """generate()'s speed-up options, checked as they are made; applied() puts them on the models for a block."""
    tome_ratio: float = 0.0               # fraction of the top-level self-attention's tokens merged; 0 = off
    deepcache_interval: int = 0           # recompute the UNet's deep features every this many calls; 0 or 1 = off
    attention_slice_size: int | None = None  # queries per attention slice; None = all at once
    vae_tiling: bool = False              # decode and encode in overlapping tiles, blended

    def __post_init__(self):
        check_ratio(self.tome_ratio)
        check_interval(self.deepcache_interval)
        check_slice_size(self.attention_slice_size)
        check(isinstance(self.vae_tiling, bool), f"vae_tiling must be True or False, got {self.vae_tiling!r}")

    @contextlib.contextmanager
    def applied(self, models: Mapping[str, torch.nn.Module]) -> Iterator[None]:
        """While the block runs, the UNet merges tokens and caches deep features, and every model's attention is
        sliced, as asked; on leaving (also on an error) every model is as it was."""
        diffusion = models["diffusion"]
        generator = torch.Generator().manual_seed(TOME_SEED)
        with merged_tokens(diffusion, self.tome_ratio, generator), \
                deep_cache(diffusion, self.deepcache_interval), \
                sliced_attention(models, self.attention_slice_size):
            yield
