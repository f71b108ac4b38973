"""Textual-inversion embeddings: learned word vectors (a style, an object, "easynegative") that a prompt names.

No tutorial counterpart. Reference: Gal et al. 2022, "An Image is Worth One Word: Personalizing Text-to-Image
Generation using Textual Inversion". Files as AUTOMATIC1111 (modules/textual_inversion/textual_inversion.py:
a .pt with "string_to_param", a .safetensors with "emb_params") and diffusers (load_textual_inversion: one key, the
token, holding the vectors) write them. The vectors live on the text encoder's embedding layer (sd.clip), under
ids after the vocabulary's; the tokenizer is never changed, so two model sets can hold different embeddings.
"""

import hashlib
import os
import warnings
from pathlib import Path

import torch

from .checkpoint_io import CheckpointError, open_user_file
from .checks import check

A1111_PT_KEY = "string_to_param.*"  # AUTOMATIC1111's .pt: {"string_to_param": {"*": (n, d)}}, flattened
A1111_SAFETENSORS_KEY = "emb_params"  # AUTOMATIC1111's .safetensors
SDXL_KEYS = ("clip_l", "clip_g")  # an SDXL embedding holds one tensor per text encoder
MAX_VECTORS = 75  # one chunk: a multi-vector embedding is never split across chunks
NAME_FORBIDDEN = "()[]{}<>:|\\,"  # characters of the prompt syntax: a name with one could never be written
SHORT_HASH = 12  # AUTOMATIC1111's shorthash: the first 12 hex digits of the file's sha256


def embedding_vectors(path: str | os.PathLike) -> torch.Tensor:
    """The vectors (n, d) float32 of an embedding file in any of the three layouts; CheckpointError otherwise."""
    path = Path(path)
    tensors = open_user_file(path, "an embedding", ".pt, .safetensors, .bin")
    keys = sorted(tensors)
    if any(k in tensors for k in SDXL_KEYS):
        raise CheckpointError(f"{path}: an SDXL embedding (it has {', '.join(k for k in SDXL_KEYS if k in tensors)}); "
                              f"sd loads SD 1.x embeddings")
    for key in (A1111_PT_KEY, A1111_SAFETENSORS_KEY):
        if key in tensors:
            return _checked(path, tensors[key])
    if len(keys) == 1:  # diffusers: {token: (d,) or (n, d)}
        return _checked(path, tensors[keys[0]])
    raise CheckpointError(f"{path}: not a textual-inversion embedding: expected AUTOMATIC1111's "
                          f"{A1111_PT_KEY.split('.')[0]!r} or {A1111_SAFETENSORS_KEY!r}, or diffusers' single tensor; "
                          f"found {len(keys)} tensors ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})")


def _checked(path: Path, vectors: torch.Tensor) -> torch.Tensor:
    vectors = vectors.detach()
    vectors = vectors[None] if vectors.dim() == 1 else vectors  # diffusers' single vector (d,)
    check(vectors.dim() == 2 and 1 <= vectors.shape[0] <= MAX_VECTORS and vectors.is_floating_point(),
          f"{path}: an embedding holds 1 to {MAX_VECTORS} vectors (n, width), got a tensor of shape "
          f"{tuple(vectors.shape)} {vectors.dtype}")
    vectors = vectors.float().clone()
    check(bool(torch.isfinite(vectors).all()), f"{path}: the embedding's vectors hold NaN or inf")
    return vectors


def _is_one_word(text: str) -> bool:
    """text is a single whole word of CLIP's vocabulary (one token ending a word), in any script."""
    from .tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    ids = tokenizer(text, add_special_tokens=False, verbose=False).input_ids
    return len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]).endswith("</w>")


def file_sha256(path: str | os.PathLike, start: int = 0) -> str:
    """The sha256 of a file (from byte `start`) in hex, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_embedding(models, path: str | os.PathLike, token: str | None = None) -> str:
    """Load a textual-inversion embedding into models["clip"], under `token` (default: the file's stem, as
    AUTOMATIC1111 names them); returns the token. Write it in a prompt like any word: "a photo, easynegative".
    Errors, before anything changes: a file that is not an embedding, a width that is not the text encoder's (SD 2.x's
    are 1024 wide, SD 1.x's 768), a name already loaded or that is a word CLIP knows, or that holds prompt syntax."""
    from .tokenizer import clean_prompt

    clip = models["clip"] if hasattr(models, "keys") else models
    path = Path(path)
    token = path.stem if token is None else token
    check(isinstance(token, str) and token.strip() == token and token != "" and
          not any(c in NAME_FORBIDDEN for c in token) and token != "BREAK",
          f"embedding token {token!r} must be a non-empty name without spaces at its ends and without any of "
          f"{NAME_FORBIDDEN} (prompt syntax); give another with token=")
    vectors = embedding_vectors(path)
    width = clip.config.d_model
    check(vectors.shape[1] == width, f"{path}: its vectors are {vectors.shape[1]} wide, this text encoder's "
          f"{width} (" + ("an SD 2.x embedding? sd loads SD 1.x ones" if vectors.shape[1] == 1024 else "another model's")
          + ")")
    layer = clip.embedding
    key = clean_prompt(token)
    rename = "rename the file, or give another name with load_embedding(..., token=)"
    check(key not in {clean_prompt(t) for t in layer.embeddings}, f"an embedding named {token!r} is already loaded: "
          f"{rename}")
    check(not _is_one_word(key), f"embedding token {token!r} is a word CLIP already knows, so prompts using the word "
          f"would get the embedding: {rename}")
    layer.add_embedding(token, vectors, file_sha256(path)[:SHORT_HASH])
    return token


def embedding_names(clip) -> dict[int, str]:
    """id -> what it stands for, for every loaded embedding's vectors: "name", then "name#2", "name#3", ..."""
    return {i: token if k == 0 else f"{token}#{k + 1}"
            for token, ids in clip.embedding.embedding_ids().items() for k, i in enumerate(ids)}


def used_embeddings(clip, texts: list[str], syntax: str = "a1111", tokenizer=None, steps: int = 1000) -> list[str]:
    """The loaded embeddings that some of `texts` name at some step of `steps` (what an image's "TI hashes" lists):
    as generate() reads them, without <lora:...> tags and through prompt editing."""
    from .prompt_parser import extra_networks, prompt_schedules, tokenize_chunks

    ids_of = clip.embedding.embedding_ids()
    if syntax == "a1111":
        with warnings.catch_warnings():  # generate() has warned about any tag it drops
            warnings.simplefilter("ignore")
            texts = [t for text in texts for _, t in prompt_schedules(extra_networks(text)[0], steps)]
    present = {i for text in texts for i in tokenize_chunks(text, tokenizer, ids_of, syntax)[0].flatten().tolist()}
    return [token for token, ids in ids_of.items() if ids[0] in present]
