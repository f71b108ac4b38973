"""Latent preview: a linear map from the latent channels to RGB, to watch the denoising without running the VAE decoder.

No tutorial counterpart (the tutorial decodes only at the end). Each latent pixel stands for a downscale x downscale
patch of the image, and its channels are close to a linear function of that patch's colour, so
rgb ≈ latentsᵀ W + b at the latents' resolution: a (C, 3) matrix product instead of the decoder, thousands of times
cheaper. Original: the "latent_rgb_factors" of AUTOMATIC1111's and ComfyUI's previews, whose SD 1.x numbers are used
as they are; for any other VAE, W and b are fitted by least squares on images it encodes.
"""

import torch
from PIL import Image

from ..decoder import VAEConfig
from ..pipeline import to_uint8
from ..training.datasets import ShapesDataset

# SD 1.x's VAE: (4, 3), from the scaled latents (the UNet's, latent_scale applied) to RGB in about [-1, 1].
SD15_LATENT_RGB_FACTORS = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
FIT_IMAGE_SIZE = 64  # images the fit encodes: small, as only the colour of each patch matters
FIT_IMAGES = 48


class LatentPreview:
    """rgb = latentsᵀ weight + bias per latent pixel. weight: (C, 3); bias: (3,); RGB in [-1, 1] like the decoder's."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        weight = torch.as_tensor(weight, dtype=torch.float32)
        if weight.dim() != 2 or weight.shape[1] != 3:
            raise ValueError(f"weight must have shape (latent channels, 3), got {tuple(weight.shape)}")
        bias = torch.zeros(3) if bias is None else torch.as_tensor(bias, dtype=torch.float32)
        if bias.shape != (3,):
            raise ValueError(f"bias must have shape (3,), got {tuple(bias.shape)}")
        self.weight, self.bias = weight, bias

    @classmethod
    def sd15(cls) -> "LatentPreview":
        return cls(torch.tensor(SD15_LATENT_RGB_FACTORS))

    @classmethod
    def fit(cls, encoder: torch.nn.Module, images: torch.Tensor) -> "LatentPreview":
        """Least squares from the encoder's (scaled, mean) latents to each patch's mean colour.
        images: (N, 3, H, W) in [-1, 1], H and W multiples of the encoder's downscale."""
        param = next(encoder.parameters())
        with torch.inference_mode():
            latents = encoder(images.to(param.device, param.dtype)).float().cpu()  # (N, C, h, w)
        patches = torch.nn.functional.adaptive_avg_pool2d(images.float().cpu(), latents.shape[-2:])  # (N, 3, h, w)
        X = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])  # (N h w, C)
        X = torch.cat([X, torch.ones(len(X), 1)], dim=1)                # a column of ones for the bias
        Y = patches.permute(0, 2, 3, 1).reshape(-1, 3)                  # (N h w, 3)
        solution = torch.linalg.lstsq(X.double(), Y.double()).solution.float()  # (C + 1, 3)
        return cls(solution[:-1], solution[-1])

    @classmethod
    def for_models(cls, models) -> "LatentPreview":
        """SD 1.x's factors for SD 1.x's VAE; otherwise fitted on sd.training.datasets' shapes through models["encoder"]."""
        if models["decoder"].config == VAEConfig():
            return cls.sd15()
        dataset = ShapesDataset(size=FIT_IMAGE_SIZE)
        images = torch.stack([dataset[i][0] for i in range(FIT_IMAGES)])  # (N, 3, 64, 64) in [-1, 1]
        return cls.fit(models["encoder"], images)

    def rgb(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents -> (B, 3, h, w) float32 RGB in about [-1, 1]. The latents are not changed."""
        if latents.dim() != 4 or latents.shape[1] != self.weight.shape[0]:
            raise ValueError(f"latents must have shape (B, {self.weight.shape[0]}, h, w), got {tuple(latents.shape)}")
        weight, bias = self.weight.to(latents.device), self.bias.to(latents.device)
        return torch.einsum("bchw,cr->brhw", latents.float(), weight) + bias[:, None, None]

    def __call__(self, latents: torch.Tensor, size: tuple[int, int] | None = None) -> list[Image.Image]:
        """PIL images at the latents' resolution, or resized to size = (width, height)."""
        images = [Image.fromarray(a) for a in to_uint8(self.rgb(latents))]
        return images if size is None else [image.resize(size, Image.BILINEAR) for image in images]
