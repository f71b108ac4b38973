"""VAE encoder: image (B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/8, W/8), sampled from N(mean, var).

Tutorial part: "VAE encoder" (hkproj encoder.py: VAE_Encoder).
Original: ldm/modules/diffusionmodules/model.py (Encoder, Downsample) and
ldm/modules/distributions/distributions.py (DiagonalGaussianDistribution).
Reference: Kingma & Welling 2014, "Auto-Encoding Variational Bayes" (the reparameterisation z = mean + std * eps).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .decoder import VAE_AttentionBlock, VAE_ResidualBlock, VAEConfig

# DiagonalGaussianDistribution clamps the log-variance to keep exp() finite.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class VAE_Encoder(nn.Sequential):
    def __init__(self, cfg: VAEConfig = VAEConfig()):
        ch = cfg.block_out_channels[0]
        layers: list[nn.Module] = [nn.Conv2d(cfg.image_channels, ch, kernel_size=3, padding=1)]
        # Each level but the last halves the size: (B, 128, H, W) -> (B, 512, H/8, W/8).
        for level, out in enumerate(cfg.block_out_channels):
            for _ in range(cfg.layers_per_block):
                layers.append(VAE_ResidualBlock(ch, out, cfg))
                ch = out
            if level != len(cfg.block_out_channels) - 1:
                # padding=0 here; forward() pads right and bottom only, as the original does.
                layers.append(nn.Conv2d(ch, ch, kernel_size=3, stride=2, padding=0))
        layers += [
            VAE_ResidualBlock(ch, ch, cfg),
            VAE_AttentionBlock(ch, cfg),
            VAE_ResidualBlock(ch, ch, cfg),
            nn.GroupNorm(cfg.n_groups, ch, eps=cfg.norm_eps),
            nn.SiLU(),
            nn.Conv2d(ch, 2 * cfg.latent_channels, kernel_size=3, padding=1),         # mean and log-variance
            nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, kernel_size=1),  # quant_conv
        ]
        super().__init__(*layers)
        self.config = cfg

    def _check_image(self, x: torch.Tensor) -> torch.Size:
        cfg = self.config
        if x.dim() != 4 or x.shape[1] != cfg.image_channels:
            raise ValueError(f"VAE_Encoder expects images of shape (B, {cfg.image_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % cfg.downscale or x.shape[3] % cfg.downscale:
            raise ValueError(f"VAE_Encoder needs height and width divisible by {cfg.downscale}, got {x.shape[2]}x{x.shape[3]}")
        return x.shape

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: image (B, 3, H, W) in [-1, 1] -> (mean, log_variance) of the latent Gaussian, each (B, 4, H/8, W/8),
        unscaled and with the log-variance clamped (what training's KL term needs)."""
        self._check_image(x)
        for module in self:
            if isinstance(module, nn.Conv2d) and module.stride == (2, 2):
                # Pad (left, right, top, bottom) = (0, 1, 0, 1): symmetric padding would shift the image.
                x = F.pad(x, (0, 1, 0, 1))
            x = module(x)
        mean, log_variance = x.chunk(2, dim=1)  # (B, 4, H/8, W/8) each
        return mean, torch.clamp(log_variance, LOGVAR_MIN, LOGVAR_MAX)

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x: image (B, 3, H, W) in [-1, 1]; noise: N(0, 1) of the latent shape (B, 4, H/8, W/8),
        or None to return the distribution's mean (its mode). Returns latents scaled by latent_scale."""
        cfg = self.config
        B, _, H, W = self._check_image(x)
        latent_shape = (B, cfg.latent_channels, H // cfg.downscale, W // cfg.downscale)
        if noise is not None and tuple(noise.shape) != latent_shape:
            raise ValueError(f"noise must have the latent shape {latent_shape}, got {tuple(noise.shape)}")
        mean, log_variance = self.moments(x)
        z = mean if noise is None else mean + log_variance.mul(0.5).exp() * noise  # reparameterisation: N(mean, std^2)
        return z * cfg.latent_scale
