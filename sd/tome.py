"""Token Merging (ToMe) for the UNet's transformer blocks: merge the most alike pixel tokens, run a layer on fewer of
them, then give every pixel its token back.

No tutorial counterpart. The method of dbolya/tomesd (tomesd/merge.py: bipartite_soft_matching_random2d), written anew.
References: Bolya & Hoffman 2023, "Token Merging for Fast Stable Diffusion" (random 2D destinations, unmerging);
Bolya et al. 2023, "Token Merging: Your ViT But Faster", sec. 3 (bipartite soft matching).
"""

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from .checks import check, is_finite_number, is_int

STRIDE = 2  # one destination token per 2x2 cell of pixels (tomesd's default sx = sy = 2)
RATIO = 0.5  # tomesd's recommended ratio for SD: half the tokens merged, a 2x2 cell kept as about two
TOP_LEVEL = 0  # merge only in the UNet's highest-resolution blocks (tomesd's max_downsample=1): most of its attention


def check_ratio(ratio, name: str = "tome_ratio") -> None:
    check(is_finite_number(ratio) and 0 <= ratio < 1,
          f"{name} must be a finite number in [0, 1) (0: off, e.g. {RATIO}), got {ratio!r}")


@contextlib.contextmanager
def merged_tokens(diffusion, ratio: float, generator: torch.Generator | None = None) -> Iterator[None]:
    """While the block runs, the self-attention of the Diffusion model's top-level transformer blocks merges `ratio`
    of its tokens (destinations drawn with `generator`; None: each cell's top-left token). Ratio 0 is off: the
    block runs exactly as without. On leaving, also on an error, the blocks are as they were."""
    from .diffusion import UNET_AttentionBlock  # diffusion.py imports this module

    check_ratio(ratio)
    blocks = [m for m in diffusion.modules() if isinstance(m, UNET_AttentionBlock) and m.level == TOP_LEVEL]
    before = [(b.token_merge_ratio, b.token_merge_generator) for b in blocks]
    for block in blocks:
        block.token_merge_ratio, block.token_merge_generator = ratio, generator
    try:
        yield
    finally:
        for block, (r, g) in zip(blocks, before):
            block.token_merge_ratio, block.token_merge_generator = r, g


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _destinations(height: int, width: int, stride: int, generator: torch.Generator | None,
                  device: torch.device) -> torch.Tensor:
    """Flat positions (n_dst,) of one destination per stride x stride cell, cells in row-major order.

    Each cell's destination is drawn uniformly within it (the top-left pixel when generator is None). A partial cell at
    the bottom or right border (height or width not a multiple of stride) gets one too, drawn within its own pixels, so
    every pixel has a destination nearby and even a 1-pixel-high image has some. One draw serves the whole batch.
    """
    rows = torch.arange(0, height, stride, device=device)  # (Hc,) top row of each cell
    cols = torch.arange(0, width, stride, device=device)  # (Wc,) left column of each cell
    if generator is None:
        dy, dx = torch.zeros_like(rows)[:, None], torch.zeros_like(cols)[None, :]
    else:
        cell_h = (height - rows).clamp(max=stride)[:, None]  # (Hc, 1) stride, or fewer in a border cell
        cell_w = (width - cols).clamp(max=stride)[None, :]  # (1, Wc)
        u = torch.rand(2, len(rows), len(cols), generator=generator, device=generator.device).to(device)
        dy, dx = (u[0] * cell_h).long(), (u[1] * cell_w).long()  # (Hc, Wc) each; u < 1, so floor(u * size) < size
    return ((rows[:, None] + dy) * width + cols[None, :] + dx).flatten()  # (Hc * Wc,)


def _sources(n_tokens: int, dst: torch.Tensor) -> torch.Tensor:
    """Flat positions (n_tokens - n_dst,) of all the other tokens, ascending."""
    is_src = torch.ones(n_tokens, dtype=torch.uint8, device=dst.device)
    is_src[dst] = 0
    # A stable sort puts the destinations (0) first, then the sources (1) in order; unlike nonzero(), it needs no
    # round trip to the CPU to learn the count, which is known.
    return is_src.argsort(stable=True)[len(dst):]


def _slots(x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, r: int) -> torch.Tensor:
    """Bipartite soft matching: the slot (B, N) of the merged sequence each token goes to.

    Each source's most similar destination by cosine similarity (in float32: in bf16 the similarities tie often); the
    r sources with the highest such similarity merge into it. The merged sequence holds the n_src - r kept sources in
    image order, then the n_dst destinations: kept source k -> slot k, destination j -> slot n_kept + j, a merged
    source -> its destination's slot.
    """
    B = x.shape[0]
    n_kept = len(src) - r
    metric = F.normalize(x.detach().float(), dim=-1)  # (B, N, C) unit vectors
    similarity = metric[:, src] @ metric[:, dst].transpose(1, 2)  # (B, n_src, n_dst)
    best, best_dst = similarity.max(dim=-1)  # (B, n_src) each
    merged = best.argsort(dim=-1, descending=True, stable=True)[:, :r]  # (B, r) source indices, ties to the first
    is_merged = torch.zeros_like(best, dtype=torch.bool).scatter_(1, merged, True)  # (B, n_src)
    kept_rank = (~is_merged).cumsum(dim=-1) - 1  # (B, n_src) place among the kept sources
    slots = torch.empty(B, x.shape[1], dtype=torch.long, device=x.device)
    slots[:, src] = torch.where(is_merged, n_kept + best_dst, kept_rank)
    slots[:, dst] = n_kept + torch.arange(len(dst), device=x.device)
    return slots


def token_merging(x: torch.Tensor, height: int, width: int, ratio: float, generator: torch.Generator | None = None,
                  stride: int = STRIDE) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                                 Callable[[torch.Tensor], torch.Tensor]]:
    """Match the tokens x (B, N, C) of a height x width image (N = height * width, row-major, as UNET_AttentionBlock
    flattens them) and return (merge, unmerge):

    merge(t): (B, N, C') -> (B, N - r, C'), r = int(N * ratio) capped at the number of sources: the kept sources, then
    the destinations, each the mean of itself and the sources merged into it. Any C', so it applies to the layer-normed
    tokens as well as to x. Computed in float32 for bf16/fp16, returned in t's dtype.
    unmerge(t): (B, N - r, C') -> (B, N, C'): every token back in its place, a merged source taking its destination's.

    Destinations: one per stride x stride cell, random within it by generator (top-left if None), the same for the
    whole batch; the matching is per image. With r == 0 both are the identity (they return t itself).
    """
    check(x.dim() == 3, f"token_merging needs tokens (B, N, C), got shape {tuple(x.shape)}")
    B, N, _ = x.shape
    check_ratio(ratio, "ratio")
    check(is_int(stride) and stride >= 1, f"stride must be a positive integer, got {stride!r}")
    check(is_int(height) and is_int(width) and height > 0 and width > 0 and height * width == N,
          f"height x width must be positive and equal the token count N = {N}, got {height!r} x {width!r}")
    dst = _destinations(height, width, stride, generator, x.device)
    src = _sources(N, dst)
    r = min(int(N * ratio), len(src))
    if r == 0:
        return _identity, _identity
    slots = _slots(x, src, dst, r)  # (B, N)
    n_merged = N - r

    def merge(t: torch.Tensor) -> torch.Tensor:
        check(t.dim() == 3 and t.shape[:2] == (B, N), f"merge needs tokens ({B}, {N}, C'), got {tuple(t.shape)}")
        C = t.shape[-1]
        work = torch.promote_types(t.dtype, torch.float32)  # a mean of bf16 values summed in bf16 would round
        out = torch.zeros(B, n_merged, C, dtype=work, device=t.device)
        # include_self=False on zeros: each slot is the plain mean of the tokens sent to it, so a kept source is itself
        # and a destination the mean of itself and its sources (tomesd's scatter of the sources with include_self=True).
        out = out.scatter_reduce(1, slots[..., None].expand(B, N, C), t.to(work), reduce="mean", include_self=False)
        return out.to(t.dtype)  # (B, N - r, C')

    def unmerge(t: torch.Tensor) -> torch.Tensor:
        check(t.dim() == 3 and t.shape[:2] == (B, n_merged),
              f"unmerge needs tokens ({B}, {n_merged}, C'), got {tuple(t.shape)}")
        return t.gather(1, slots[..., None].expand(B, N, t.shape[-1]))  # (B, N, C')

    return merge, unmerge
