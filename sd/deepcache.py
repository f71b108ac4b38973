"""DeepCache: reuse the UNet's deep features across denoising steps and recompute them every `interval` calls.

No tutorial counterpart. Reference: Ma, Fang & Wang 2023, "DeepCache: Accelerating Diffusion Models for Free"
(arXiv 2312.00858), section 3.2 and its uniform 1:N strategy. Adjacent steps change the UNet's high-level features
little, while the skip connection of its first, highest-resolution blocks carries the detail that does change. So
every `interval`-th call (and the first WHOLE_FIRST) runs the whole UNet and keeps the feature map that its last
`branch + 1` decoder blocks start from; each call in between runs only the first `branch + 1` encoder blocks
(conv_in and `branch` blocks of the top level) and those decoder blocks, on the kept feature: most of the UNet is
skipped (a shallow call of SD 1.5 takes 0.31x the time of a whole one: benchmarks/speedups.py).
"""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .checks import check, is_int

INTERVAL = 3  # the paper's N for SD 1.5 at 20-50 steps: one full call, then two on the kept features
BRANCH = 1  # the paper's shallowest skip branch for SD 1.5: conv_in + the first top-level block, and their decoders
WHOLE_FIRST = 2  # calls that are always whole: the first steps set the layout and colours (with only the first
                 # whole, the embedded model's prompt adherence fell from 100% to 93% at interval 3; with two, 100%)


@dataclass
class DeepCache:
    """The state of one generation: how many UNet calls have run, and the deep feature kept from the last full one."""
    interval: int
    branch: int = BRANCH
    whole_first: int = WHOLE_FIRST
    calls: int = 0
    features: torch.Tensor | None = None

    def reusable(self, x: torch.Tensor) -> bool:
        """Whether this call (the next one) may run the shallow path on the kept feature; counts the call."""
        due = self.calls % self.interval == 0 or self.calls < self.whole_first
        self.calls += 1
        kept = self.features
        return not due and kept is not None and kept.shape[0] == x.shape[0] and kept.device == x.device


def check_interval(interval) -> None:
    check(is_int(interval) and interval >= 0, f"deepcache_interval must be a whole number of UNet calls >= 0 "
          f"(0 or 1: off, e.g. {INTERVAL}), got {interval!r}")


@contextlib.contextmanager
def deep_cache(diffusion, interval: int, branch: int = BRANCH) -> Iterator[DeepCache | None]:
    """While the block runs, the Diffusion model `diffusion` recomputes its deep features every `interval` calls
    and reuses them in between; interval 1 (or 0) is off: the block runs exactly as without."""
    check_interval(interval)
    unet = diffusion.unet
    check(is_int(branch) and 0 <= branch < len(unet.encoders),
          f"DeepCache branch must be in 0..{len(unet.encoders) - 1}, got {branch!r}")
    if interval <= 1:
        yield None
        return
    before, unet.deep_cache = unet.deep_cache, DeepCache(interval, branch)
    try:
        yield unet.deep_cache
    finally:
        unet.deep_cache = before
