"""CLIP text encoder: token ids (B, 77) -> per-token embeddings (B, 77, 768) that condition the UNet.

Tutorial part: "CLIP" (hkproj clip.py: CLIPEmbedding, CLIPLayer, CLIP).
Original: OpenAI CLIP ViT-L/14 text tower, as transformers' CLIPTextModel (what SD 1.5's
`cond_stage_model.transformer` is). Reference: Radford et al. 2021, "Learning Transferable
Visual Models From Natural Language Supervision".
"""

from dataclasses import dataclass

import torch
from torch import nn

from .attention import SelfAttention
from .checks import check, check_config_fields, is_int

@dataclass(frozen=True)
class CLIPConfig:
    vocab_size: int = 49408     # BPE vocabulary of CLIP's tokenizer
    n_tokens: int = 77          # context length: every prompt is padded/truncated to 77 tokens
    d_model: int = 768          # ViT-L/14 text width
    n_heads: int = 12
    n_layers: int = 12
    d_ff: int = 3072            # 4 * d_model, the MLP's hidden width
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        check_config_fields(self)
        check(self.d_model % self.n_heads == 0, f"CLIPConfig: d_model={self.d_model} must be divisible by "
              f"n_heads={self.n_heads} (each head takes d_model / n_heads of the width)")

    @classmethod
    def tiny(cls) -> "CLIPConfig":
        """A few-thousand-parameter text encoder for tests; keeps the real vocabulary and length."""
        return cls(d_model=32, n_heads=4, n_layers=2, d_ff=64)


def check_clip_skip(clip_skip, n_layers: int) -> None:
    """ValueError unless clip_skip is a whole number from 1 to n_layers (CLIP.forward's check, and generate's)."""
    check(is_int(clip_skip) and 1 <= clip_skip <= n_layers,
          f"clip_skip must be a whole number from 1 (the last layer) to {n_layers}, got {clip_skip!r}")


class CLIPEmbedding(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.vocab_size = cfg.vocab_size
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # Learned positions, one vector per slot of the 77-token window.
        self.position_embedding = nn.Parameter(torch.zeros(cfg.n_tokens, cfg.d_model))
        # Textual-inversion vectors (sd.embeddings.load_embedding), by token: ids from vocab_size on stand for them,
        # in this order. Not parameters: the checkpoint's state dict stays the model's own.
        self.embeddings: dict[str, torch.Tensor] = {}
        self.embedding_hashes: dict[str, str] = {}  # token -> the file's short sha256, for the image's parameters

    def add_embedding(self, token: str, vectors: torch.Tensor, short_hash: str = "") -> None:
        self.embeddings[token] = vectors
        self.embedding_hashes[token] = short_hash

    def embedding_ids(self) -> dict[str, range]:
        """token -> the ids its vectors take in token id tensors (what sd.prompt_parser.tokenize_chunks writes)."""
        ids, start = {}, self.vocab_size
        for token, vectors in self.embeddings.items():
            ids[token] = range(start, start + vectors.shape[0])
            start += vectors.shape[0]
        return ids

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        x = self.token_embedding(tokens.clamp(max=self.vocab_size - 1))  # (B, T, D)
        if self.embeddings:
            table = torch.cat(list(self.embeddings.values())).to(x.device, x.dtype)  # (n_vectors, D)
            extra = tokens >= self.vocab_size
            x = torch.where(extra[..., None], table[(tokens - self.vocab_size).clamp(0, len(table) - 1)], x)
        return x + self.position_embedding[:T]  # (B, T, D)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI trained CLIP with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class CLIPLayer(nn.Module):
    """Pre-norm transformer layer: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.layernorm_1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.attention = SelfAttention(cfg.n_heads, cfg.d_model)
        self.layernorm_2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.linear_1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.activation = QuickGELU()
        self.linear_2 = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.layernorm_1(x), causal_mask=True)
        return x + self.linear_2(self.activation(self.linear_1(self.layernorm_2(x))))


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig = CLIPConfig()):
        super().__init__()
        self.config = cfg
        self.embedding = CLIPEmbedding(cfg)
        self.layers = nn.ModuleList([CLIPLayer(cfg) for _ in range(cfg.n_layers)])
        self.layernorm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)

    def forward(self, tokens: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """tokens: integer ids (B, T) with T <= n_tokens -> hidden states (B, T, d_model).

        clip_skip in AUTOMATIC1111's meaning: 1 = the last layer's output (SD 1.5's), 2 = the one before it (what
        anime fine-tunes were trained on), ...; the final LayerNorm follows either way. diffusers counts from 0:
        its clip_skip=1 is this clip_skip=2."""
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"CLIP expects integer token ids of shape (B, T), got {tuple(tokens.shape)} {tokens.dtype}")
        n_ids = self.config.vocab_size + sum(len(v) for v in self.embedding.embeddings.values())
        if tokens.numel() and not (tokens.min() >= 0 and tokens.max() < n_ids):
            raise ValueError(f"CLIP token ids must lie in 0 .. {n_ids - 1} (the vocabulary and the loaded "
                             f"embeddings' vectors), got {tokens.min().item()} .. {tokens.max().item()}")
        if tokens.shape[1] > self.config.n_tokens:
            raise ValueError(f"CLIP takes at most {self.config.n_tokens} tokens per prompt, got {tokens.shape[1]}")
        n_layers = self.config.n_layers
        check_clip_skip(clip_skip, n_layers)
        x = self.embedding(tokens.long())  # (B, T, D)
        for layer in self.layers[:n_layers - (clip_skip - 1)]:
            x = layer(x)
        return self.layernorm(x)
