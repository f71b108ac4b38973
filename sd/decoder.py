"""VAE decoder: latents (B, 4, H/8, W/8) -> image (B, 3, H, W) in about [-1, 1]; plus the blocks and config the encoder shares.

Tutorial part: "VAE decoder" (hkproj decoder.py: VAE_AttentionBlock, VAE_ResidualBlock, VAE_Decoder).
Original: ldm/modules/diffusionmodules/model.py (Decoder, ResnetBlock, AttnBlock) with
configs/stable-diffusion/v1-inference.yaml (first_stage_config). Reference: Rombach et al. 2022,
"High-Resolution Image Synthesis with Latent Diffusion Models", sec. 3.1.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import SelfAttention
from .checks import check, check_config_fields


@dataclass(frozen=True)
class VAEConfig:
    image_channels: int = 3
    latent_channels: int = 4                                # v1-inference.yaml: z_channels
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # ch=128 x ch_mult (1, 2, 4, 4); 3 halvings: 512 px -> 64
    layers_per_block: int = 2                               # num_res_blocks (the decoder uses one more per level)
    n_groups: int = 32                                      # GroupNorm groups (ldm Normalize)
    norm_eps: float = 1e-6                                  # ldm Normalize uses 1e-6, not PyTorch's default 1e-5
    latent_scale: float = 0.18215                           # v1-inference.yaml: scale_factor, gives latents ~unit variance

    def __post_init__(self):
        check_config_fields(self)
        bad = [c for c in self.block_out_channels if c % self.n_groups]
        check(not bad, f"VAEConfig: block_out_channels {bad} must be divisible by n_groups={self.n_groups} "
              f"(GroupNorm splits each width into n_groups groups)")

    @property
    def downscale(self) -> int:
        """Pixels per latent cell along each side (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def tiny(cls) -> "VAEConfig":
        """Small VAE for tests: same structure, two levels (factor 2), narrow channels."""
        return cls(block_out_channels=(32, 64), layers_per_block=1, n_groups=8)


class VAE_AttentionBlock(nn.Module):
    """Single-head self-attention over all H*W pixels, with a residual connection."""

    def __init__(self, channels: int, cfg: VAEConfig):
        super().__init__()
        self.groupnorm = nn.GroupNorm(cfg.n_groups, channels, eps=cfg.norm_eps)
        self.attention = SelfAttention(1, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.groupnorm(x).view(B, C, H * W).transpose(1, 2)  # (B, H*W, C)
        h = self.attention(h)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class VAE_ResidualBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, plus the input (through a 1x1 conv when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, cfg: VAEConfig):
        super().__init__()
        self.groupnorm_1 = nn.GroupNorm(cfg.n_groups, in_channels, eps=cfg.norm_eps)
        self.conv_1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.groupnorm_2 = nn.GroupNorm(cfg.n_groups, out_channels, eps=cfg.norm_eps)
        self.conv_2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels == out_channels:
            self.residual_layer = nn.Identity()
        else:
            self.residual_layer = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_1(F.silu(self.groupnorm_1(x)))
        h = self.conv_2(F.silu(self.groupnorm_2(h)))
        return h + self.residual_layer(x)


class VAE_Decoder(nn.Sequential):
    def __init__(self, cfg: VAEConfig = VAEConfig()):
        ch = cfg.block_out_channels[-1]
        layers: list[nn.Module] = [
            nn.Conv2d(cfg.latent_channels, cfg.latent_channels, kernel_size=1),  # post_quant_conv
            nn.Conv2d(cfg.latent_channels, ch, kernel_size=3, padding=1),
            VAE_ResidualBlock(ch, ch, cfg),
            VAE_AttentionBlock(ch, cfg),
            VAE_ResidualBlock(ch, ch, cfg),
        ]
        # Widest level first; each level but the last doubles the size: (B, 512, H/8, W/8) -> (B, 128, H, W).
        for level in reversed(range(len(cfg.block_out_channels))):
            out = cfg.block_out_channels[level]
            for _ in range(cfg.layers_per_block + 1):
                layers.append(VAE_ResidualBlock(ch, out, cfg))
                ch = out
            if level != 0:
                layers += [nn.Upsample(scale_factor=2), nn.Conv2d(ch, ch, kernel_size=3, padding=1)]
        layers += [
            nn.GroupNorm(cfg.n_groups, ch, eps=cfg.norm_eps),
            nn.SiLU(),
            nn.Conv2d(ch, cfg.image_channels, kernel_size=3, padding=1),
        ]
        super().__init__(*layers)
        self.config = cfg

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z: scaled latents (B, 4, h, w) -> image (B, 3, h*8, w*8), roughly in [-1, 1] (not clamped)."""
        if z.dim() != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"VAE_Decoder expects latents of shape (B, {self.config.latent_channels}, h, w), got {tuple(z.shape)}")
        x = z / self.config.latent_scale  # undo the encoder's scaling (a new tensor: z is left as it was)
        for module in self:
            x = module(x)
        return x
