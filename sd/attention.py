"""Multi-head self- and cross-attention, shared by CLIP, the VAE and the UNet.

Tutorial part: "Attention" (hkproj attention.py: SelfAttention, CrossAttention).
Original: ldm/modules/attention.py (CrossAttention), transformers CLIPAttention.
Reference: Vaswani et al. 2017, "Attention Is All You Need", eq. (1).
"""

import torch
import torch.nn.functional as F
from torch import nn


def _split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    B, T, D = x.shape
    return x.view(B, T, n_heads, D // n_heads).transpose(1, 2)  # (B, n_heads, T, d_head)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    B, n_heads, T, d_head = x.shape
    return x.transpose(1, 2).reshape(B, T, n_heads * d_head)  # (B, T, D)


class SelfAttention(nn.Module):
    """softmax(Q Kᵀ / √d_head) V over one sequence, Q, K and V from one fused projection.

    The fused `in_proj` holds W_q, W_k and W_v stacked (as the tutorial does); the
    converter concatenates the checkpoint's separate q/k/v weights into it.
    """

    def __init__(self, n_heads: int, d_model: int, in_proj_bias: bool = True, out_proj_bias: bool = True):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.d_head = d_model // n_heads  # the tutorial calls this d_head too
        self.in_proj = nn.Linear(d_model, 3 * d_model, bias=in_proj_bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=out_proj_bias)

    def forward(self, x: torch.Tensor, causal_mask: bool = False) -> torch.Tensor:
        # x: (B, T, D)
        q, k, v = self.in_proj(x).chunk(3, dim=-1)
        q, k, v = (_split_heads(t, self.n_heads) for t in (q, k, v))  # (B, n_heads, T, d_head)
        # A causal mask lets token i see only tokens <= i (CLIP's text transformer).
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal_mask)
        return self.out_proj(_merge_heads(out))


class CrossAttention(nn.Module):
    """Queries from the image latents, keys and values from the text context (B, T_ctx, d_context)."""

    def __init__(self, n_heads: int, d_model: int, d_context: int, in_proj_bias: bool = True, out_proj_bias: bool = True):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=in_proj_bias)
        self.k_proj = nn.Linear(d_context, d_model, bias=in_proj_bias)
        self.v_proj = nn.Linear(d_context, d_model, bias=in_proj_bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=out_proj_bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x: (B, T, D), context: (B, T_ctx, d_context)
        q = _split_heads(self.q_proj(x), self.n_heads)        # (B, n_heads, T, d_head)
        k = _split_heads(self.k_proj(context), self.n_heads)  # (B, n_heads, T_ctx, d_head)
        v = _split_heads(self.v_proj(context), self.n_heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, n_heads, T, d_head)
        return self.out_proj(_merge_heads(out))
