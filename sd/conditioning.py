"""From prompts to the context the UNet attends to: weighted 75-token chunks through CLIP, and prompt editing.

Tutorial part: "Pipeline" (hkproj pipeline.py: `clip(tokens)` on one 77-token prompt), grown to what AUTOMATIC1111
does (stable-diffusion-webui, modules/sd_hijack_clip.py: FrozenCLIPEmbedderWithCustomWords, and
modules/prompt_parser.py: reconstruct_cond_batch), written anew from its documented behaviour:
- each chunk of 77 ids is encoded on its own and the chunks' outputs are concatenated: (77·k, d);
- emphasis is AUTOMATIC1111's "Original": z · weight per token, then z scaled back to the chunk's original mean.
  compel and ComfyUI weight differently, z_empty + w · (z - z_empty) (a move away from the empty prompt's
  encoding), so the same (word:1.3) is a little stronger or weaker there. AUTOMATIC1111 takes the mean over the
  batch of texts it encodes at once; here each text's chunk alone, so a prompt's encoding does not depend on what it
  is batched with (the same whenever one text is encoded at a time);
- prompts of different chunk counts (the prompt and the negative prompt) are padded to the longest with chunks of
  the empty prompt, as AUTOMATIC1111 pads them (its pad_cond_uncond);
- prompt editing: sampler step s (counted from 1) uses each prompt's schedule entry [end, text] with the smallest
  end >= s, so `[to:3]` adds `to` from step 4 on and `[a|b]` alternates a, b, a, ... from step 1. (AUTOMATIC1111
  counts its steps from 0 against the same ends, so each change comes one step later there.)
"""

from collections.abc import Callable, Sequence

import torch

from .prompt_parser import prompt_schedules, tokenize_chunks


def emphasize(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """AUTOMATIC1111's "Original" emphasis: z (k, 77, d) times each token's weight (k, 77), then scaled so that
    each chunk keeps the mean it had. Weights all 1: z unchanged, bit for bit."""
    if bool((weights == 1).all()):
        return z
    weights = weights.to(z.device, z.dtype)
    original_mean = z.float().mean(dim=(1, 2), keepdim=True)  # (k, 1, 1)
    z = z * weights[..., None]
    z = z * (original_mean / z.float().mean(dim=(1, 2), keepdim=True)).to(z.dtype)
    if not torch.isfinite(z).all() and torch.isfinite(original_mean).all():
        raise ValueError(f"emphasis weights up to {weights.abs().max().item():.3g} make the prompt's encoding overflow "
                         f"in {str(z.dtype).removeprefix('torch.')}: use weights of a sensible size, like (word:1.5)")
    return z


def encode_chunks(clip, ids: torch.Tensor, weights: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """(k, 77) ids and weights -> (77·k, d): every chunk through CLIP at once, weighted, laid end to end."""
    z = clip(ids.to(clip.embedding.token_embedding.weight.device), clip_skip=clip_skip)  # (k, 77, d)
    return emphasize(z, weights).reshape(-1, z.shape[-1])  # (77·k, d)


def encode_texts(clip, texts: Sequence[str], tokenizer=None, clip_skip: int = 1, prompt_syntax: str = "a1111",
                 finite: Callable | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each text's (77·k_i, d) context and (k_i, 77) ids; each distinct text encoded once."""
    embeddings = clip.embedding.embedding_ids()
    tokenized = {t: tokenize_chunks(t, tokenizer, embeddings, prompt_syntax) for t in dict.fromkeys(texts)}
    encoded = {}
    for text, (ids, weights) in tokenized.items():
        z = encode_chunks(clip, ids, weights, clip_skip)
        encoded[text] = z if finite is None else finite(z, "the text encoder (models['clip'])")
    return [encoded[t] for t in texts], [tokenized[t][0] for t in texts]


def encode_captions(clip, captions: Sequence[str], tokenizer=None, prompt_syntax: str = "a1111") -> torch.Tensor:
    """Training captions through generate's prompt path -> (B, 77·K, d), K the most chunks of any caption, the
    shorter ones padded with the empty caption's chunk. Every chunk of the batch goes through CLIP in one call, so
    gradients reach CLIP, and a batch of plain captions of at most 75 tokens is clip(tokenize(captions)) exactly."""
    embeddings = clip.embedding.embedding_ids()
    tokenized = [tokenize_chunks(c, tokenizer, embeddings, prompt_syntax) for c in [*captions, ""]]
    counts = [ids.shape[0] for ids, _ in tokenized]
    if len(set(counts[:-1])) == 1:  # all the same length: the empty caption is not needed
        tokenized, counts = tokenized[:-1], counts[:-1]
    ids = torch.cat([i for i, _ in tokenized])  # (sum k_i, 77)
    z = clip(ids.to(clip.embedding.token_embedding.weight.device))  # (sum k_i, 77, d)
    z = emphasize(z, torch.cat([w for _, w in tokenized]))
    contexts = [c.reshape(-1, z.shape[-1]) for c in z.split(counts)]  # (77·k_i, d) each
    return padded(contexts[:len(captions)], contexts[-1][:z.shape[1]])


def padded(contexts: Sequence[torch.Tensor], empty: torch.Tensor, n_tokens: int | None = None) -> torch.Tensor:
    """(B, T, d): contexts (T_i, d) padded to T (default: the longest) with the empty prompt's chunk (77, d)."""
    n_tokens = max(c.shape[0] for c in contexts) if n_tokens is None else n_tokens
    rows = []
    for c in contexts:
        repeats = (n_tokens - c.shape[0]) // empty.shape[0]
        rows.append(torch.cat([c, empty.to(c.dtype).repeat(repeats, 1)]) if repeats else c)
    return torch.stack(rows)


def padded_ids(ids: Sequence[torch.Tensor], empty: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """(B, 77·K) ids to go with padded(): each text's chunks, then empty chunks."""
    return torch.stack([torch.cat([i, empty.repeat(n_chunks - i.shape[0], 1)]).reshape(-1) for i in ids])


class Conditioning:
    """The context of every sampler step, for a batch of prompts that may change during sampling (prompt editing).

    Every distinct text of every schedule is encoded once, up front; at(step) stacks the texts in force at that step
    (one row per prompt), all padded to the most chunks any of them has, so the context's shape never changes."""

    def __init__(self, clip, prompts: Sequence[str], steps: int, tokenizer=None, clip_skip: int = 1,
                 prompt_syntax: str = "a1111", finite: Callable | None = None, dtype: torch.dtype | None = None):
        self.schedules = [prompt_schedules(p, steps) if prompt_syntax == "a1111" else [[steps, p]] for p in prompts]
        texts = list(dict.fromkeys(text for schedule in self.schedules for _, text in schedule))
        contexts, ids = encode_texts(clip, texts + [""], tokenizer, clip_skip, prompt_syntax, finite)
        dtype = dtype or contexts[0].dtype
        self.empty, self.empty_ids = contexts.pop().to(dtype), ids.pop()
        self.contexts = {t: c.to(dtype) for t, c in zip(texts, contexts)}
        self.ids = dict(zip(texts, ids))
        self.n_tokens = max(c.shape[0] for c in self.contexts.values())
        self._cache: dict[tuple[str, ...], torch.Tensor] = {}
        self.context = self.at(1)

    def texts_at(self, step: int) -> tuple[str, ...]:
        """Each prompt's text at sampler step `step` (from 1): the entry with the smallest end >= step."""
        return tuple(next((text for end, text in schedule if step <= end), schedule[-1][1])
                     for schedule in self.schedules)

    def at(self, step: int) -> torch.Tensor:
        """(B, T, d) for sampler step `step` (from 1); also kept as self.context, which the noise model reads."""
        texts = self.texts_at(step)
        if texts not in self._cache:
            self._cache[texts] = padded([self.contexts[t] for t in texts], self.empty, self.n_tokens)
        self.context = self._cache[texts]
        return self.context

    def token_ids(self, step: int) -> torch.Tensor:
        """(B, T) ids of the texts at `step`, padded as the context is (for attention maps)."""
        return padded_ids([self.ids[t] for t in self.texts_at(step)], self.empty_ids,
                          self.n_tokens // self.empty.shape[0])

    @property
    def changes(self) -> bool:
        return any(len(s) > 1 for s in self.schedules)
