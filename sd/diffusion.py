"""The denoising UNet: (noisy latents, text context, timestep) -> predicted noise, same shape as the latents.

Tutorial part: "UNET" (hkproj diffusion.py: TimeEmbedding, UNET_ResidualBlock, UNET_AttentionBlock,
Upsample, SwitchSequential, UNET, UNET_OutputLayer, Diffusion).
Original: ldm/modules/diffusionmodules/openaimodel.py (UNetModel) and ldm/modules/attention.py
(SpatialTransformer) with configs/stable-diffusion/v1-inference.yaml (unet_config).
References: Ronneberger et al. 2015 (U-Net); Ho et al. 2020 (DDPM, eps-prediction); Shazeer 2020 (GEGLU).
Two accelerations hook in here, each off unless set by its context manager: Token Merging in the self-attention
of UNET_AttentionBlock (sd.tome.merged_tokens) and DeepCache in UNET.forward (sd.deepcache.deep_cache); for
training, UNET.gradient_checkpointing recomputes each block's activations in the backward pass.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import CrossAttention, SelfAttention
from .checks import check, check_config_fields
from .tome import token_merging

MAX_PERIOD = 10_000  # longest wavelength of the sinusoidal timestep embedding (Transformer positional encoding)


@dataclass(frozen=True)
class DiffusionConfig:
    in_channels: int = 4                                      # 9 for the inpainting UNet: latents + mask + masked-image latents
    out_channels: int = 4
    model_channels: int = 320                                 # width of the first level
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)              # widths 320, 640, 1280, 1280
    n_res_blocks: int = 2                                     # residual blocks per level on the way down (one more on the way up)
    attention_levels: tuple[bool, ...] = (True, True, True, False)  # attention_resolutions [4, 2, 1]: none at the coarsest level
    n_heads: int = 8                                          # num_heads; d_head = width / 8 (40, 80, 160)
    d_context: int = 768                                      # context_dim: CLIP's d_model
    n_groups: int = 32                                        # GroupNorm groups
    norm_eps: float = 1e-5                                    # ResBlock GroupNorm (ldm normalization(): PyTorch default)
    attn_norm_eps: float = 1e-6                               # SpatialTransformer GroupNorm (ldm Normalize)
    layer_norm_eps: float = 1e-5
    sample_size: int = 64                                     # latent height and width it was trained at (512 px / 8): generate()'s default size

    def __post_init__(self):
        check_config_fields(self)
        check(len(self.attention_levels) == len(self.channel_mult), f"DiffusionConfig: attention_levels "
              f"{self.attention_levels} needs one entry per channel_mult level {self.channel_mult}")
        check(self.channel_mult[0] == 1, f"DiffusionConfig: channel_mult must start at 1 (the output layer takes "
              f"model_channels), got {self.channel_mult}")
        check(self.model_channels % 2 == 0, f"DiffusionConfig: model_channels must be even (the timestep embedding "
              f"is half cosines, half sines), got {self.model_channels}")
        for w in self.widths:
            check(w % self.n_groups == 0 and w % self.n_heads == 0, f"DiffusionConfig: width {w} (model_channels x "
                  f"channel_mult) must be divisible by n_groups={self.n_groups} and n_heads={self.n_heads}")

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def d_time(self) -> int:
        """Width of the timestep embedding after the MLP (time_embed_dim = 4 * model_channels = 1280)."""
        return 4 * self.model_channels

    @classmethod
    def tiny(cls, in_channels: int = 4) -> "DiffusionConfig":
        """Three levels, attention in the first two and the middle, as in SD but narrow and with one block per level."""
        return cls(in_channels=in_channels, model_channels=32, channel_mult=(1, 2, 2), n_res_blocks=1,
                   attention_levels=(True, True, False), n_heads=2, d_context=32, n_groups=8, sample_size=8)


def get_time_embedding(timesteps: torch.Tensor | int | float, dim: int = 320) -> torch.Tensor:
    """Sinusoidal embedding of diffusion timesteps: (N,) or scalar -> (N, dim) float32, [cos | sin].

    Frequencies 1 / MAX_PERIOD^(i / (dim/2)), as ldm's timestep_embedding (and diffusers' flip_sin_to_cos=True).
    """
    t = torch.as_tensor(timesteps, dtype=torch.float32).reshape(-1)  # (N,)
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None]  # (N, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, dim)


class TimeEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: (B, 320) -> (B, 1280)."""

    def __init__(self, d_in: int, d_time: int):
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d_time)
        self.linear_2 = nn.Linear(d_time, d_time)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class UNET_ResidualBlock(nn.Module):
    """Conv block whose features get the timestep embedding added in the middle."""

    def __init__(self, in_channels: int, out_channels: int, cfg: DiffusionConfig):
        super().__init__()
        self.groupnorm_feature = nn.GroupNorm(cfg.n_groups, in_channels, eps=cfg.norm_eps)
        self.conv_feature = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.linear_time = nn.Linear(cfg.d_time, out_channels)
        self.groupnorm_merged = nn.GroupNorm(cfg.n_groups, out_channels, eps=cfg.norm_eps)
        self.conv_merged = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels == out_channels:
            self.residual_layer = nn.Identity()
        else:
            self.residual_layer = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, feature: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        # feature: (B, C_in, H, W), time: (B, d_time)
        h = self.conv_feature(F.silu(self.groupnorm_feature(feature)))  # (B, C_out, H, W)
        h = h + self.linear_time(F.silu(time))[:, :, None, None]
        h = self.conv_merged(F.silu(self.groupnorm_merged(h)))
        return h + self.residual_layer(feature)


class UNET_AttentionBlock(nn.Module):
    """Transformer over the H*W pixels: self-attention, cross-attention to the text, GEGLU feed-forward.

    The tutorial's signature is UNET_AttentionBlock(n_head, n_embd) where n_embd is the per-head size; here d_head.
    level: where in the UNet it is, 0 = the highest resolution (Token Merging works there).
    """

    def __init__(self, n_heads: int, d_head: int, cfg: DiffusionConfig, level: int = 0):
        super().__init__()
        self.level = level
        channels = n_heads * d_head
        self.groupnorm = nn.GroupNorm(cfg.n_groups, channels, eps=cfg.attn_norm_eps)
        self.conv_input = nn.Conv2d(channels, channels, kernel_size=1)
        self.layernorm_1 = nn.LayerNorm(channels, eps=cfg.layer_norm_eps)
        self.attention_1 = SelfAttention(n_heads, channels, in_proj_bias=False)
        self.layernorm_2 = nn.LayerNorm(channels, eps=cfg.layer_norm_eps)
        self.attention_2 = CrossAttention(n_heads, channels, cfg.d_context, in_proj_bias=False)
        self.layernorm_3 = nn.LayerNorm(channels, eps=cfg.layer_norm_eps)
        self.linear_geglu_1 = nn.Linear(channels, 4 * channels * 2)  # value and gate of the GEGLU, 4x wide each
        self.linear_geglu_2 = nn.Linear(4 * channels, channels)
        self.conv_output = nn.Conv2d(channels, channels, kernel_size=1)
        self.token_merge_ratio = 0.0  # Token Merging (sd.tome.merged_tokens sets it): 0 = off
        self.token_merge_generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.conv_input(self.groupnorm(x))
        h = h.view(B, C, H * W).transpose(1, 2)  # (B, H*W, C)
        h = h + self.self_attention(h, H, W)
        h = h + self.attention_2(self.layernorm_2(h), context)
        value, gate = self.linear_geglu_1(self.layernorm_3(h)).chunk(2, dim=-1)  # (B, H*W, 4C) each
        h = h + self.linear_geglu_2(value * F.gelu(gate))
        h = h.transpose(1, 2).reshape(B, C, H, W)
        return x + self.conv_output(h)

    def self_attention(self, h: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """attention_1 over the H*W tokens, or with Token Merging over fewer: the most similar tokens merged into
        one before it and copied back after (Bolya & Hoffman 2023, as tomesd does in its attention only)."""
        if not self.token_merge_ratio:
            return self.attention_1(self.layernorm_1(h))
        merge, unmerge = token_merging(h, H, W, self.token_merge_ratio, self.token_merge_generator)
        return unmerge(self.attention_1(merge(self.layernorm_1(h))))  # (B, H*W - r, C) inside


class Upsample(nn.Module):
    """Nearest-neighbour upsampling (to the size of the matching skip connection) then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        # Doubling is right when the size was even on the way down; an odd size (a latent side not
        # divisible by 8) needs the exact size of the skip connection it will be concatenated with.
        if output_size is None:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(output_size), mode="nearest")
        return self.conv(x)


class SwitchSequential(nn.Sequential):
    """Runs its layers in order, giving each the inputs it needs (context, time, output size)."""

    def forward(self, x: torch.Tensor, context: torch.Tensor, time: torch.Tensor, output_size=None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, UNET_AttentionBlock):
                x = layer(x, context)
            elif isinstance(layer, UNET_ResidualBlock):
                x = layer(x, time)
            elif isinstance(layer, Upsample):
                x = layer(x, output_size)
            else:
                x = layer(x)
        return x


class UNET(nn.Module):
    def __init__(self, cfg: DiffusionConfig):
        super().__init__()
        last = len(cfg.channel_mult) - 1

        def block(in_ch: int, out_ch: int, level: int) -> list[nn.Module]:
            layers: list[nn.Module] = [UNET_ResidualBlock(in_ch, out_ch, cfg)]
            if cfg.attention_levels[level]:
                layers.append(UNET_AttentionBlock(cfg.n_heads, out_ch // cfg.n_heads, cfg, level))
            return layers

        # Encoder (ldm input_blocks): (B, 4, H, W) -> (B, 1280, H/8, W/8), remembering each output for the skips.
        ch = cfg.model_channels
        self.encoders = nn.ModuleList([SwitchSequential(nn.Conv2d(cfg.in_channels, ch, kernel_size=3, padding=1))])
        skip_channels = [ch]
        for level, width in enumerate(cfg.widths):
            for _ in range(cfg.n_res_blocks):
                self.encoders.append(SwitchSequential(*block(ch, width, level)))
                ch = width
                skip_channels.append(ch)
            if level != last:
                self.encoders.append(SwitchSequential(nn.Conv2d(ch, ch, kernel_size=3, stride=2, padding=1)))
                skip_channels.append(ch)

        # Bottleneck (ldm middle_block): always has attention.
        self.bottleneck = SwitchSequential(
            UNET_ResidualBlock(ch, ch, cfg),
            UNET_AttentionBlock(cfg.n_heads, ch // cfg.n_heads, cfg, last),
            UNET_ResidualBlock(ch, ch, cfg),
        )

        # Decoder (ldm output_blocks): each block first concatenates one skip connection.
        self.decoders = nn.ModuleList()
        for level in reversed(range(len(cfg.widths))):
            width = cfg.widths[level]
            for i in range(cfg.n_res_blocks + 1):
                layers = block(ch + skip_channels.pop(), width, level)
                ch = width
                if level != 0 and i == cfg.n_res_blocks:
                    layers.append(Upsample(ch))
                self.decoders.append(SwitchSequential(*layers))
        self.deep_cache = None  # DeepCache (sd.deepcache.deep_cache sets it): None = off
        self.gradient_checkpointing = False  # training: keep each block's input only, recompute the rest in backward

    def forward(self, x: torch.Tensor, context: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        cache = self.deep_cache
        if cache is not None and cache.reusable(x):
            return self.shallow_forward(x, context, time, cache)
        skips = []
        for layers in self.encoders:
            x = self.run_block(layers, x, context, time)
            skips.append(x)
        x = self.run_block(self.bottleneck, x, context, time)
        for i, layers in enumerate(self.decoders):
            if cache is not None and i == len(self.decoders) - cache.branch - 1:
                cache.features = x  # what the decoders the shallow path runs start from
            x = self.decode(layers, x, skips, context, time)
        return x

    def shallow_forward(self, x: torch.Tensor, context: torch.Tensor, time: torch.Tensor, cache) -> torch.Tensor:
        """DeepCache's in-between call: the first branch + 1 encoder blocks, then the last branch + 1 decoder blocks
        on the deep feature kept by the last full call (Ma et al. 2023, eq. 4)."""
        skips = []
        for layers in self.encoders[:cache.branch + 1]:
            x = layers(x, context, time)
            skips.append(x)
        x = cache.features
        for layers in self.decoders[len(self.decoders) - cache.branch - 1:]:
            x = self.decode(layers, x, skips, context, time)
        return x

    def decode(self, layers, x, skips: list, context, time) -> torch.Tensor:
        """One decoder block on x and the last skip connection; an upsample goes to the size of the next skip."""
        x = torch.cat((x, skips.pop()), dim=1)
        return self.run_block(layers, x, context, time, output_size=skips[-1].shape[-2:] if skips else None)

    def run_block(self, layers, x, context, time, output_size=None) -> torch.Tensor:
        """One block; with gradient_checkpointing while gradients are recorded, its activations are recomputed in
        the backward pass instead of kept (torch.utils.checkpoint): less memory for about one more forward."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(layers, x, context, time, output_size, use_reentrant=False)
        return layers(x, context, time, output_size)


class UNET_OutputLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, cfg: DiffusionConfig):
        super().__init__()
        self.groupnorm = nn.GroupNorm(cfg.n_groups, in_channels, eps=cfg.norm_eps)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.silu(self.groupnorm(x)))  # (B, 320, H, W) -> (B, 4, H, W)


class Diffusion(nn.Module):
    def __init__(self, cfg: DiffusionConfig = DiffusionConfig()):
        super().__init__()
        self.config = cfg
        self.time_embedding = TimeEmbedding(cfg.model_channels, cfg.d_time)
        self.unet = UNET(cfg)
        self.final = UNET_OutputLayer(cfg.model_channels, cfg.out_channels, cfg)

    def forward(self, latent: torch.Tensor, context: torch.Tensor, time: torch.Tensor | int | float) -> torch.Tensor:
        """latent: (B, in_channels, h, w); context: (B, T, d_context); time: timesteps, one for all () or one each (B,).

        Returns the predicted noise (B, out_channels, h, w). The tutorial passes the time embedding
        in; here the timesteps are passed and embedded inside, so any batch of timesteps works.
        """
        cfg = self.config
        if latent.dim() != 4 or latent.shape[1] != cfg.in_channels:
            raise ValueError(f"Diffusion expects latents of shape (B, {cfg.in_channels}, h, w), got {tuple(latent.shape)}")
        B = latent.shape[0]
        if context.dim() != 3 or context.shape[0] != B or context.shape[2] != cfg.d_context:
            raise ValueError(f"Diffusion expects context of shape ({B}, T, {cfg.d_context}), got {tuple(context.shape)}")
        t = torch.as_tensor(time, device=latent.device).reshape(-1)
        if t.numel() not in (1, B):
            raise ValueError(f"Diffusion expects one timestep or {B} (one per latent), got {t.numel()}")
        t_emb = get_time_embedding(t, cfg.model_channels).expand(B, -1).to(latent.dtype)  # (B, 320)
        time_emb = self.time_embedding(t_emb)  # (B, 1280)
        x = self.unet(latent, context, time_emb)  # (B, 320, h, w)
        return self.final(x)  # (B, 4, h, w)
