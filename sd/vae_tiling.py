"""Tiled VAE decode and encode: overlapping tiles run one at a time and blended, so 1024x1024 and more fit in a few GB.

No tutorial counterpart. The idea of diffusers' AutoencoderKL.tiled_decode / tiled_encode, written anew: every tile is
full-size (the tiles are spread evenly so that the last one ends at the border), and the overlaps are blended with
linear ramps normalised to sum to one: a weighted average of the windows over their summed weights, as MultiDiffusion
fuses them (Bar-Tal et al. 2023, "MultiDiffusion: Fusing Diffusion Paths for Controlled Image Generation"), where
diffusers blends each tile into the one before it and crops.

A tile sees only itself: the mid-block's global attention and each GroupNorm's statistics are those of the tile, not of
the whole image, so a tiled result is close to the untiled one, not equal to it (the blending hides the seams). Call
under torch.no_grad() (generate() does): with autograd on, every tile's activations are kept for the backward pass.
"""

import torch

from .checks import check, is_int
from .decoder import VAEConfig
from .devices import run_in_dtype

DECODE_TILE = 64      # latents per tile side: 512 image pixels, the size SD 1.5 was trained at
DECODE_OVERLAP = 16   # latents shared by neighbouring tiles: 128 pixels, diffusers' tile_overlap_factor 0.25
ENCODE_TILE = DECODE_TILE * VAEConfig().downscale        # the same in image pixels: 512
ENCODE_OVERLAP = DECODE_OVERLAP * VAEConfig().downscale  # 128


# --- the layout along one axis ---------------------------------------------------------------------------------------


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where the tiles along an axis of `length` start: one tile if it fits, else the fewest tiles of `tile` that share
    at least `overlap` with each neighbour, spread evenly from 0 to length - tile (every tile full-size, none nearly
    on top of another as a last tile pushed back alone could be)."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    gaps = -(-(length - tile) // stride)  # ceil: the fewest steps of at most `stride` from 0 to length - tile
    return [i * (length - tile) // gaps for i in range(gaps + 1)]


def _ramp(size: int, rise: int, fall: int) -> torch.Tensor:
    """(size,) weights: 1 in the middle, rising linearly over the first `rise` and falling over the last `fall` places.
    Sampled at the pixel centres (x + 0.5), so no weight is zero and two ramps over the same span sum to exactly 1."""
    x = torch.arange(size, dtype=torch.float32) + 0.5
    up = x / rise if rise else torch.ones(size)
    down = (size - x) / fall if fall else torch.ones(size)
    return torch.minimum(up, down).clamp(max=1)


def blend_weights(length: int, tile: int, overlap: int, scale: int = 1) -> list[tuple[int, torch.Tensor]]:
    """(start, weights) of each tile along an axis, both at `scale` output places per input place: each tile ramps
    over what it shares with each neighbour, normalised so that the weights of all tiles sum to 1 at every place.
    The 2D weight of a tile is the outer product of its row and column weights, so it sums to 1 over the grid too."""
    size = min(tile, length) * scale
    starts = [s * scale for s in tile_starts(length, tile, overlap)]
    ends = [s + size for s in starts]
    ramps = [_ramp(size, rise=ends[i - 1] - s if i else 0, fall=e - starts[i + 1] if i + 1 < len(starts) else 0)
             for i, (s, e) in enumerate(zip(starts, ends))]
    total = torch.zeros(length * scale)
    for s, w in zip(starts, ramps):
        total[s:s + size] += w
    return [(s, w / total[s:s + size]) for s, w in zip(starts, ramps)]


# --- checks ----------------------------------------------------------------------------------------------------------


def _check_tiling(tile, overlap, unit: str, downscale: int = 1) -> None:
    check(is_int(tile) and tile > 0, f"tile must be a positive integer ({unit}), got {tile!r}")
    check(is_int(overlap) and 0 <= overlap < tile, f"overlap must be an integer from 0 to tile - 1 = {tile - 1} "
          f"({unit}), got {overlap!r}")
    check(tile % downscale == 0 and overlap % downscale == 0, f"tile and overlap must be multiples of the VAE's "
          f"downscale {downscale} (image pixels per latent), got tile={tile}, overlap={overlap}")


def _check_4d(x, name: str, channels: int) -> None:
    check(isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] == channels,
          f"{name} must be a tensor of shape (B, {channels}, H, W), got "
          f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")


# --- the shared loop -------------------------------------------------------------------------------------------------


def _run_tiled(model, inputs: list[tuple[torch.Tensor, int]], grid: tuple[int, int], tile: int, overlap: int,
               out_channels: int, out_scale: int) -> torch.Tensor:
    """Blend model(*tiles) over a grid of (h, w) cells tiled by `tile` cells: each input holds `scale` places per cell,
    the output `out_scale`. One tile's activations at a time; the output accumulates in float32."""
    h, w = grid
    first = inputs[0][0]
    out = torch.zeros(first.shape[0], out_channels, h * out_scale, w * out_scale, device=first.device)  # (B, C, H, W)
    rows, cols = blend_weights(h, tile, overlap, out_scale), blend_weights(w, tile, overlap, out_scale)
    th, tw = min(tile, h), min(tile, w)  # cells per tile
    for y, wy in rows:
        for x, wx in cols:
            cy, cx = y // out_scale, x // out_scale  # the tile's first cell
            tiles = [t[:, :, cy * s:(cy + th) * s, cx * s:(cx + tw) * s] for t, s in inputs]
            weight = (wy[:, None] * wx[None, :]).to(out.device)  # (th * out_scale, tw * out_scale)
            decoded = run_in_dtype(model, *tiles)  # (B, out_channels, th * out_scale, tw * out_scale)
            out[:, :, y:y + th * out_scale, x:x + tw * out_scale] += decoded * weight
    return out


# --- the public API --------------------------------------------------------------------------------------------------


def decode_tiled(decoder, latents: torch.Tensor, tile: int = DECODE_TILE,
                 overlap: int = DECODE_OVERLAP) -> torch.Tensor:
    """latents (B, 4, h, w) -> image (B, 3, h*8, w*8) in float32, as sd.pipeline.decode gives, by tiles of `tile`
    latents sharing `overlap` latents with each neighbour. Latents that fit in one tile give run_in_dtype(decoder,
    latents): decoder(latents) exactly for a float32 decoder."""
    cfg = decoder.config
    _check_tiling(tile, overlap, "latents")
    _check_4d(latents, "latents", cfg.latent_channels)
    h, w = latents.shape[2:]
    if h <= tile and w <= tile:
        return run_in_dtype(decoder, latents)
    return _run_tiled(decoder, [(latents, 1)], (h, w), tile, overlap, cfg.image_channels, cfg.downscale)


def encode_tiled(encoder, image: torch.Tensor, noise: torch.Tensor | None = None, tile: int = ENCODE_TILE,
                 overlap: int = ENCODE_OVERLAP) -> torch.Tensor:
    """image (B, 3, H, W) in [-1, 1] -> latents (B, 4, H/8, W/8) in float32, by tiles of `tile` image pixels sharing
    `overlap` pixels with each neighbour; each tile gets its slice of `noise` (N(0, 1) of the latent shape, or None
    for the mean). An image that fits in one tile gives run_in_dtype(encoder, image, noise): encoder(image, noise)
    exactly for a float32 encoder."""
    cfg = encoder.config
    d = cfg.downscale
    _check_tiling(tile, overlap, "image pixels", d)
    _check_4d(image, "image", cfg.image_channels)
    B, _, H, W = image.shape
    check(H % d == 0 and W % d == 0, f"image height and width must be multiples of {d}, got {H}x{W}")
    latent_shape = (B, cfg.latent_channels, H // d, W // d)
    check(noise is None or (isinstance(noise, torch.Tensor) and tuple(noise.shape) == latent_shape),
          f"noise must be None or a tensor of the latent shape {latent_shape}, got "
          f"{tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__}")
    inputs = [(image, d)] + ([] if noise is None else [(noise, 1)])
    if H <= tile and W <= tile:
        return run_in_dtype(encoder, *(t for t, _ in inputs))
    return _run_tiled(encoder, inputs, (H // d, W // d), tile // d, overlap // d, cfg.latent_channels, 1)
