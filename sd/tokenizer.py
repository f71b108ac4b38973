"""CLIP tokenizer: prompts -> token ids (B, 77), the input of sd.clip.CLIP.

Tutorial part: "CLIP" / pipeline (hkproj loads `CLIPTokenizer("../data/vocab.json", merges_file=...)`).
Original: OpenAI CLIP `clip/simple_tokenizer.py: SimpleTokenizer` (byte-level BPE, Radford et al. 2021),
as transformers' `CLIPTokenizer`; SD's form (start, text, end, padded with end to 77) is CompVis
`ldm/modules/encoders/modules.py: FrozenCLIPEmbedder`. Files: sd/data/tokenizer/ (scripts/make_tokenizer_files.py).
"""

import html
import unicodedata
import warnings
from functools import lru_cache
from pathlib import Path

import torch

from .clip import CLIPConfig

TOKENIZER_DIR = Path(__file__).resolve().parent / "data" / "tokenizer"  # vocab.json, merges.txt, config
CONTEXT_LENGTH = CLIPConfig().n_tokens  # 77: <|startoftext|> + 75 text tokens + <|endoftext|>
VOCAB_SIZE = CLIPConfig().vocab_size  # 49408
# simple_tokenizer.py: the vocabulary ends with <|startoftext|>, <|endoftext|>; SD pads with <|endoftext|> too.
BOS_ID = VOCAB_SIZE - 2  # 49406
EOS_ID = VOCAB_SIZE - 1  # 49407


@lru_cache(maxsize=1)
def load_tokenizer():
    """transformers' CLIPTokenizer read from the files shipped with sd; never contacts the Hugging Face hub.

    Cached: building the BPE tables takes about a second. The instance is shared, so don't modify it.
    """
    from transformers import CLIPTokenizer

    if not (TOKENIZER_DIR / "vocab.json").is_file():
        raise FileNotFoundError(f"CLIP tokenizer files missing from {TOKENIZER_DIR}; reinstall sd, "
                                "or regenerate them with scripts/make_tokenizer_files.py")
    # A local folder plus local_files_only: transformers reads the files and makes no network call.
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)
    assert (len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        VOCAB_SIZE, BOS_ID, EOS_ID, EOS_ID), f"unexpected tokenizer built from {TOKENIZER_DIR}"
    return tokenizer


def _ftfy_char_table() -> dict[int, str]:
    """The per-character fixes of ftfy.fix_text (ftfy 6: fixes.py, chardata.py), which OpenAI's basic_clean applies,
    composed into one str.translate table. ftfy is not a dependency of sd; its mojibake repair is left out.
    """
    # fix_c1_controls: C1 control characters are windows-1252 bytes wrongly decoded as latin-1.
    c1 = {c: alt for c in range(0x80, 0xA0) if (alt := bytes([c]).decode("cp1252", errors="ignore"))}
    # fix_latin_ligatures
    ligatures = {"Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž", "ǆ": "dž",
                 "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj",
                 "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st"}
    # fix_character_width: ideographic space and the full/half-width forms block
    width = {0x3000: " "} | {c: alt for c in range(0xFF01, 0xFFF0)
                             if (alt := unicodedata.normalize("NFKC", chr(c))) != chr(c)}
    # uncurl_quotes: ʼ ‘ ’ ‚ ‛ -> ' and “ ” „ ‟ -> "
    quotes = {c: "'" for c in [0x02BC, *range(0x2018, 0x201C)]} | {c: '"' for c in range(0x201C, 0x2020)}
    # remove_control_chars
    controls = [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF,
                *range(0xFFF9, 0xFFFD)]
    steps = [c1, {ord(k): v for k, v in ligatures.items()}, width, quotes, dict.fromkeys(controls)]  # ftfy's order

    def fix(ch: str) -> str:
        for step in steps:
            ch = ch.translate(step)
        return ch

    return {c: fixed for step in steps for c in step if (fixed := fix(chr(c))) != chr(c)}


_FTFY_TABLE = _ftfy_char_table()


def clean_prompt(text: str) -> str:
    """OpenAI CLIP's cleanup before BPE (simple_tokenizer.py: basic_clean, whitespace_clean, lower), without ftfy.

    transformers' CLIPTokenizer does only NFC, whitespace runs -> " " and a per-character lowercase; this adds
    ftfy's character fixes (curly quotes, ligatures, full-width letters, control characters), HTML entities
    ("&amp;" -> "&") and Python's lowercasing (final sigma: "ΟΣ" -> "ος"), so ids match OpenAI's.
    """
    text = unicodedata.normalize("NFC", text.translate(_FTFY_TABLE))  # ftfy ends with NFC, before lowercasing
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()  # whitespace_clean, then str.lower (context-aware: final sigma)


def tokenize(prompts: str | list[str], tokenizer=None, clean: bool = True) -> torch.Tensor:
    """Prompts -> (B, 77) int64 ids: <|startoftext|>, text, <|endoftext|>, padded with <|endoftext|> (49407).

    Text beyond 75 tokens is dropped with a warning that shows it, as diffusers' pipelines do.
    clean=False skips clean_prompt(), giving exactly transformers' (and diffusers') ids.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"tokenize: expected a prompt (str) or a list of prompts (list[str]), "
                        f"got {type(prompts).__name__}")
    if bad := [type(p).__name__ for p in prompts if not isinstance(p, str)]:
        raise TypeError(f"tokenize: every prompt must be a str; got a list containing {', '.join(bad)}")
    if not prompts:
        raise ValueError("tokenize: got an empty list of prompts; pass at least one string (an empty string is fine)")
    tokenizer = tokenizer or load_tokenizer()
    texts = [clean_prompt(p) for p in prompts] if clean else list(prompts)

    ids = tokenizer(texts, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True,
                    return_tensors="pt").input_ids  # (B, 77)
    full = tokenizer(texts, verbose=False).input_ids  # untruncated, only to report what was cut
    for i, row in enumerate(full):
        if len(row) > CONTEXT_LENGTH:
            dropped = row[CONTEXT_LENGTH - 1:-1]  # past the 76th token, minus the final <|endoftext|>
            warnings.warn(f"Prompt {i}: {len(dropped)} tokens dropped. The following part of your input was "
                          f"truncated because CLIP can only handle sequences up to {CONTEXT_LENGTH} tokens: "
                          f"{tokenizer.decode(dropped)!r}", stacklevel=2)
    return ids.long()
