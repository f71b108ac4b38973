"""Cross-attention maps: where in the image the UNet looks for each word of the prompt.

Tutorial part: "UNET" (UNET_AttentionBlock's cross-attention, attention_2) made visible; no counterpart in the
tutorial's code. Reference: Hertz et al. 2022, "Prompt-to-Prompt Image Editing with Cross Attention Control"
(maps averaged over heads, layers and steps); Tang et al. 2022, "What the DAAM" (upsampling every layer's map to
one resolution before averaging).

Recording uses forward hooks that exist only inside `record_cross_attention` (or a `generate(...,
attention_maps=...)` call): the models themselves are unchanged and cost nothing extra when nothing is recorded.
The hooks recompute softmax(Q Kᵀ / √d_head) from the cross-attention's inputs, because the fused attention kernel
the forward pass uses never materialises the attention weights.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import _split_heads
from ..diffusion import UNET_AttentionBlock
from ..tokenizer import CONTEXT_LENGTH

START_TOKEN, END_TOKEN = "<|startoftext|>", "<|endoftext|>"
WORD_END = "</w>"  # CLIP's BPE marks the last piece of a word so


class CrossAttentionSum:
    """Running sum of cross-attention probabilities, resized to the latents' (h, w): total (b, T, h, w), calls."""

    def __init__(self):
        self.total: torch.Tensor | None = None
        self.calls = 0
        self.latent_size: tuple[int, int] | None = None

    def add(self, probs: torch.Tensor) -> None:
        """probs (b, T, H', W') of one layer's call, averaged over heads; resized (bilinear) to the latent size."""
        if probs.shape[-2:] != self.latent_size:
            # Bilinear weights sum to one, so every pixel's distribution over tokens still sums to one.
            probs = F.interpolate(probs, size=self.latent_size, mode="bilinear", align_corners=False)
        self.total = probs if self.total is None else self.total + probs
        self.calls += 1

    def mean(self) -> torch.Tensor:
        """(b, T, h, w): the average over every recorded call (heads, layers, steps). Sums to 1 over T."""
        if self.total is None:
            raise RuntimeError("no cross-attention was recorded: the UNet did not run inside the recording")
        return self.total / self.calls


@contextmanager
def record_cross_attention(unet: nn.Module, rows: slice = slice(None)) -> Iterator[CrossAttentionSum]:
    """Record every cross-attention call of `unet` (a Diffusion or UNET) while the block runs.

    rows: which rows of each UNet batch to record (the pipeline passes the conditional half under classifier-free
    guidance). Yields a CrossAttentionSum; the hooks are removed on leaving, also when an exception leaves.
    """
    blocks = [m for m in unet.modules() if isinstance(m, UNET_AttentionBlock)]
    if not blocks:
        raise ValueError(f"{type(unet).__name__} has no UNET_AttentionBlock: give the Diffusion model (models['diffusion'])")
    recorder = CrossAttentionSum()
    block_size: dict[int, tuple[int, int]] = {}

    def remember_latent_size(module, args, kwargs):
        latent = args[0] if args else next(iter(kwargs.values()))
        recorder.latent_size = tuple(latent.shape[-2:])  # the UNet's input latents (B, C, h, w)

    def remember_block_size(block, args):
        block_size[id(block.attention_2)] = tuple(args[0].shape[-2:])  # the block's feature map (B, C, H', W')

    def record(attention, args, output):
        x, context = args[0][rows], args[1][rows]  # (b, H'W', D), (b, T, d_context)
        q = _split_heads(attention.q_proj(x), attention.n_heads).float()        # (b, heads, H'W', d_head)
        k = _split_heads(attention.k_proj(context), attention.n_heads).float()  # (b, heads, T, d_head)
        probs = torch.softmax(q @ k.transpose(-1, -2) * attention.d_head**-0.5, dim=-1).mean(dim=1)  # (b, H'W', T)
        H, W = block_size[id(attention)]
        recorder.add(probs.transpose(1, 2).reshape(probs.shape[0], -1, H, W))  # (b, T, H', W')

    handles = [unet.register_forward_pre_hook(remember_latent_size, with_kwargs=True)]
    for block in blocks:
        handles.append(block.register_forward_pre_hook(remember_block_size))
        handles.append(block.attention_2.register_forward_hook(record))
    try:
        yield recorder
    finally:
        for handle in handles:
            handle.remove()


def token_strings(ids: torch.Tensor, tokenizer, names: dict[int, str] | None = None,
                  chunk: int = CONTEXT_LENGTH) -> tuple[list[list[str]], list[list[int]]]:
    """(B, 77·k) ids -> each prompt's tokens as text, and the position of each in the context: every chunk of 77 from
    its start token to its end token, padding left out. names: what ids past the vocabulary stand for (textual-
    inversion vectors: the embedding's name, "name#2" for its second vector, ...)."""
    end_id = tokenizer.convert_tokens_to_ids(END_TOKEN)
    names = names or {}
    strings, positions = [], []
    for row in ids.tolist():
        text, where = [], []
        for start in range(0, len(row), chunk):
            part = row[start:start + chunk]
            n = part.index(end_id) + 1 if end_id in part else len(part)
            text += [names[t] if t in names else tokenizer.convert_ids_to_tokens(t).removesuffix(WORD_END)
                     for t in part[:n]]
            where += range(start, start + n)
        strings.append(text)
        positions.append(where)
    return strings, positions


class AttentionMaps:
    """What `generate(..., attention_maps=AttentionMaps())` fills in, one entry per generated image:

    maps: (B, T, h, w) float32 at the latents' size, T = 77 per chunk of the prompt (77 for up to 75 tokens).
        maps[b, j, y, x] is how much latent pixel (y, x) attends to context position j, averaged over heads,
        cross-attention layers (each resized to h x w) and sampler steps; for each pixel it sums to 1 over the T
        positions (start tokens, prompt, end tokens and padding). Under classifier-free guidance only the
        conditional (prompt) half is recorded. With prompt editing: the tokens of the prompt at the last step.
    tokens: tokens[b] is image b's prompt as tokens, from "<|startoftext|>" to "<|endoftext|>" (each chunk's).
    positions: positions[b][i] is the context position (the index j into maps[b]) of tokens[b][i].
    """

    def __init__(self):
        self.maps: torch.Tensor | None = None
        self.tokens: list[list[str]] = []
        self.positions: list[list[int]] = []

    @contextmanager
    def recording(self, unet: nn.Module, rows: slice, ids: torch.Tensor | Callable[[], torch.Tensor], tokenizer,
                  names: dict[int, str] | None = None) -> Iterator[None]:
        """Fill maps and tokens from the cross-attention of every UNet call inside the block (what generate does).
        rows: the UNet batch rows of the prompts whose token ids (B, T) are `ids` (or what ids() gives at the end);
        names: what ids past the vocabulary stand for (see token_strings)."""
        with record_cross_attention(unet, rows) as recorded:
            yield
        self.maps = recorded.mean().cpu()
        self.tokens, self.positions = token_strings(ids() if callable(ids) else ids, tokenizer, names)

    def _check_index(self, b: int) -> None:
        if self.maps is None:
            raise RuntimeError("no maps yet: pass this object to generate(..., attention_maps=...) first")
        if not -len(self.tokens) <= b < len(self.tokens):
            raise IndexError(f"image index {b} out of range: {len(self.tokens)} images were generated")

    def words(self, b: int = 0) -> list[tuple[str, torch.Tensor]]:
        """[(token, map (h, w)), ...] for the prompt's own tokens of image b (start, end and padding left out)."""
        self._check_index(b)
        special = (START_TOKEN, END_TOKEN)
        return [(token, self.maps[b, j]) for token, j in zip(self.tokens[b], self.positions[b]) if token not in special]

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        shape = "none yet" if self.maps is None else "x".join(map(str, self.maps.shape))
        return f"AttentionMaps({shape}, {len(self.tokens)} prompts)"
