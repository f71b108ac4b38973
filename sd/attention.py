"""Multi-head self- and cross-attention, shared by CLIP, the VAE and the UNet.

Tutorial part: "Attention" (hkproj attention.py: SelfAttention, CrossAttention).
Original: ldm/modules/attention.py (CrossAttention), transformers CLIPAttention.
Reference: Vaswani et al. 2017, "Attention Is All You Need", eq. (1).

Attention slicing (`slice_size`, set on a model by `sliced_attention`): the queries are taken `slice_size` at a
time, so a kernel that makes the (T, T_ctx) score matrix (PyTorch's fallback, older GPUs) makes only a slice of
it. Each query's softmax is over its own row, so the result is the same.
"""

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check, is_int


def _split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    B, T, D = x.shape
    return x.view(B, T, n_heads, D // n_heads).transpose(1, 2)  # (B, n_heads, T, d_head)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    B, n_heads, T, d_head = x.shape
    return x.transpose(1, 2).reshape(B, T, n_heads * d_head)  # (B, T, D)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slice_size: int | None = None,
              is_causal: bool = False) -> torch.Tensor:
    """softmax(Q Kᵀ / √d_head) V, (B, n_heads, T, d_head); with slice_size, `slice_size` queries at a time."""
    T = q.shape[2]
    if slice_size is None or slice_size >= T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    check(not is_causal, "attention slicing does not apply to causal attention (CLIP's)")
    return torch.cat([F.scaled_dot_product_attention(q[:, :, i:i + slice_size], k, v)
                      for i in range(0, T, slice_size)], dim=2)


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
        self.slice_size: int | None = None  # queries per slice (sliced_attention); None: all at once

    def forward(self, x: torch.Tensor, causal_mask: bool = False) -> torch.Tensor:
        # x: (B, T, D)
        q, k, v = self.in_proj(x).chunk(3, dim=-1)
        q, k, v = (_split_heads(t, self.n_heads) for t in (q, k, v))  # (B, n_heads, T, d_head)
        # A causal mask lets token i see only tokens <= i (CLIP's text transformer).
        out = attention(q, k, v, None if causal_mask else self.slice_size, is_causal=causal_mask)
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
        self.slice_size: int | None = None

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x: (B, T, D), context: (B, T_ctx, d_context)
        q = _split_heads(self.q_proj(x), self.n_heads)        # (B, n_heads, T, d_head)
        k = _split_heads(self.k_proj(context), self.n_heads)  # (B, n_heads, T_ctx, d_head)
        v = _split_heads(self.v_proj(context), self.n_heads)
        out = attention(q, k, v, self.slice_size)  # (B, n_heads, T, d_head)
        return self.out_proj(_merge_heads(out))


def check_slice_size(slice_size) -> None:
    check(slice_size is None or (is_int(slice_size) and slice_size > 0),
          f"attention_slice_size must be a positive number of query tokens or None, got {slice_size!r}")


@contextlib.contextmanager
def sliced_attention(models, slice_size: int | None) -> Iterator[None]:
    """While the block runs, every attention layer of `models` (a module, a list or a mapping of them) takes its queries
    `slice_size` at a time (None: all at once, unchanged). Less memory for the score matrices, the same result."""
    check_slice_size(slice_size)
    modules = models.values() if hasattr(models, "values") else models if isinstance(models, list) else [models]
    layers = [m for model in modules if model is not None for m in model.modules()
              if isinstance(m, (SelfAttention, CrossAttention))]
    before = [layer.slice_size for layer in layers]
    for layer in layers:
        layer.slice_size = slice_size
    try:
        yield
    finally:
        for layer, size in zip(layers, before):
            layer.slice_size = size
