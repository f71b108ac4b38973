"""Tokenizer checks: the shipped files (counts, pinned sha256), SD's (B, 77) form, truncation warnings, bad input,
offline loading, and ids for varied prompts equal to OpenAI's reference `clip/simple_tokenizer.py: SimpleTokenizer`.

The expected ids were computed once with that reference (from the clip-anytorch 2.6.0 wheel, with ftfy 6.3.1 and
regex 2026.11.15 in a scratch venv) and are written out here, so the test needs neither package.
"""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sd.clip import CLIPConfig
from sd.tokenizer import (BOS_ID, CONTEXT_LENGTH, EOS_ID, TOKENIZER_DIR, VOCAB_SIZE, clean_prompt, load_tokenizer,
                          tokenize)

# sha256 of each shipped file, as printed by scripts/make_tokenizer_files.py; a changed file fails here.
FILE_SHA256 = {
    "vocab.json": "4845b0e575739dbabfda3b54f086884b37d73e94b067988d925a7e52bfdfb8e8",
    "merges.txt": "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a",
    "tokenizer_config.json": "c60161375f716b78c620a8dc649de2992adb5f5714e4fee2f2fb0a7f56500e15",
}

# (prompt, ids from OpenAI's SimpleTokenizer with <|startoftext|> and <|endoftext|> around them)
OPENAI_IDS = [
    ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407]),
    ("A  Photo", [49406, 320, 1125, 49407]),
    ("Hello World!!", [49406, 3306, 1002, 748, 49407]),
    ("don't stop, it's fine; we'll see what they've done & I'm sure you'd agree",
     [49406, 847, 713, 1691, 267, 585, 568, 3797, 282, 649, 1342, 862, 768, 889, 1200, 1700, 261, 328, 880, 1650, 592,
      1896, 5953, 49407]),
    ("Mr. O'Neil's DOG isn't HERE", [49406, 1982, 269, 334, 262, 8030, 568, 1929, 2923, 713, 763, 49407]),
    ("café crème brûlée, naïve façade",
     [49406, 15304, 1075, 12138, 614, 711, 127, 119, 75, 13489, 267, 1097, 35689, 563, 778, 10067, 1928, 49407]),
    ("cafe\u0301 (decomposed accent)", [49406, 15304, 263, 561, 19916, 18931, 264, 49407]),
    ("emoji 🐱🚀 party 🎉👍🏽", [49406, 16327, 35710, 13542, 1580, 4310, 43722, 49407]),
    ("1234567890 is 10 digits, 3.14159 and 2nd place",  # numbers are split into single digits
     [49406, 272, 273, 274, 275, 276, 277, 278, 279, 280, 271, 533, 272, 271, 31710, 267, 274, 269, 272, 275, 272, 276,
      280, 537, 273, 1764, 1445, 49407]),
    ("   leading and\ttrailing \n\n whitespace  ", [49406, 3833, 537, 37427, 4699, 2138, 49407]),
    ("", [49406, 49407]),
    ("masterpiece, best quality, (ultra-detailed:1.2), [sharp focus], {blue|red}",
     [49406, 12066, 267, 949, 3027, 267, 263, 8118, 268, 12609, 281, 272, 269, 273, 2361, 314, 8157, 4353, 34067, 346,
      1746, 347, 736, 348, 49407]),
    ("a portrait of an astronaut riding a horse on mars, trending on artstation, 8k, octane render",
     [49406, 320, 5352, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 267, 6087, 525, 1486, 2631, 267, 279, 330, 267,
      43040, 13024, 49407]),
    ("CamelCaseWords and snake_case_words--dashes...ellipsis",
     [49406, 27005, 17698, 2709, 537, 8798, 318, 2068, 318, 2709, 2432, 925, 2502, 678, 3367, 33041, 49407]),
    ("email: someone@example.com https://example.org/path?q=1#frag",
     [49406, 4462, 281, 2100, 287, 6228, 269, 2464, 30901, 12441, 6228, 269, 5593, 270, 5035, 286, 336, 284, 272, 258,
      3368, 326, 49407]),
    ("日本語のテキスト と 中文",
     [49406, 39121, 44353, 34002, 252, 21575, 2429, 228, 47121, 32421, 486, 4813, 357, 19759, 255, 29032, 485, 49407]),
    ("Привет мир, ΣΊΣΥΦΟΣ",  # the last Σ lowercases to final sigma ς (Python's str.lower; not transformers')
     [49406, 26302, 16370, 29503, 110, 22176, 141, 480, 38018, 16701, 141, 478, 267, 139, 225, 138, 107, 139, 225, 139,
      227, 139, 228, 138, 123, 139, 480, 49407]),
    ("<|startoftext|>special tokens inside<|endoftext|>", [49406, 49406, 1689, 23562, 2912, 49407, 49407]),
    ("$100 + 50% = ~#@!^*", [49406, 259, 272, 271, 271, 266, 276, 271, 260, 284, 93, 2, 31, 0, 61, 265, 49407]),
    ("non\u00a0breaking\u00a0space", [49406, 3353, 2755, 2138, 49407]),
    # Below, transformers' CLIPTokenizer alone differs from OpenAI (no ftfy, no html.unescape); clean_prompt() fixes it.
    ("fish &amp; chips &lt;3", [49406, 2759, 261, 8855, 283, 274, 49407]),
    ("curly \u201cquotes\u201d don\u2019t", [49406, 20795, 257, 5808, 257, 847, 713, 49407]),
    ("\ufb01ne ligature", [49406, 3797, 19915, 4490, 49407]),
    ("full-width \uff21\uff22\uff23", [49406, 1476, 268, 23571, 5334, 49407]),
]


def sd_form(ids: list[int]) -> list[int]:
    return ids + [EOS_ID] * (CONTEXT_LENGTH - len(ids))


def test_constants_come_from_clip_config():
    cfg = CLIPConfig()
    assert (CONTEXT_LENGTH, VOCAB_SIZE, BOS_ID, EOS_ID) == (cfg.n_tokens, cfg.vocab_size, 49406, 49407) == (
        77, 49408, 49406, 49407)


def test_shipped_files_are_pinned():
    for name, expected in FILE_SHA256.items():
        assert hashlib.sha256((TOKENIZER_DIR / name).read_bytes()).hexdigest() == expected, f"{name} changed"


def test_vocab_and_merges_files():
    vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    assert (vocab["!"], vocab["!</w>"], vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (0, 256, BOS_ID, EOS_ID)
    lines = (TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    merges = [line.split(" ") for line in lines[1:]]
    assert len(merges) == 48894 and all(len(m) == 2 for m in merges)
    assert merges[0] == ["i", "n"] and vocab["in"] == 512  # the first merge is the first id after the 512 byte symbols
    config = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["model_max_length"] == 77 and config["pad_token"] == "<|endoftext|>"


def test_load_tokenizer_is_cached_and_complete():
    tokenizer = load_tokenizer()
    assert load_tokenizer() is tokenizer
    assert len(tokenizer) == VOCAB_SIZE and tokenizer.model_max_length == CONTEXT_LENGTH
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (BOS_ID, EOS_ID, EOS_ID)
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_sd_form_batch():
    ids = tokenize(["a photo of a cat", "", "Hello World!!"])
    assert ids.shape == (3, 77) and ids.dtype == torch.int64
    assert ids[0].tolist() == sd_form([49406, 320, 1125, 539, 320, 2368, 49407])
    assert ids[1].tolist() == [BOS_ID] + [EOS_ID] * 76  # empty prompt: start, end, padding
    assert ids[2].tolist() == sd_form([49406, 3306, 1002, 748, 49407])
    assert torch.equal(tokenize("a photo of a cat"), ids[:1])  # a bare string is a batch of one
    # The same as transformers' own padding/truncation, which is what diffusers' pipelines call.
    expected = load_tokenizer()(["a photo of a cat", "", "hello world!!"], padding="max_length", max_length=77,
                                truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, expected)


@pytest.mark.parametrize("prompt, expected", OPENAI_IDS, ids=range(len(OPENAI_IDS)))
def test_matches_openai_reference(prompt, expected):
    assert tokenize(prompt)[0].tolist() == sd_form(expected)


def test_clean_false_is_plain_transformers():
    """clean=False gives transformers' (and diffusers') ids, which differ from OpenAI's on HTML entities etc."""
    prompt = "fish &amp; chips &lt;3"
    raw = [49406, 2759, 261, 6259, 282, 8855, 261, 3333, 282, 274, 49407]  # "&", "amp", ";" kept as text
    assert tokenize(prompt, clean=False)[0].tolist() == sd_form(raw) != tokenize(prompt)[0].tolist()
    assert load_tokenizer()(prompt).input_ids == raw


def test_known_difference_mojibake():
    """OpenAI's ftfy repairs mojibake ("cafÃ©" -> "café"); sd does not, since ftfy is not a dependency."""
    openai = [49406, 617, 3252, 11878, 15304, 49407]
    ours = [49406, 617, 3252, 11878, 3471, 127, 352, 5811, 49407]
    assert tokenize("mojibake caf\u00c3\u00a9")[0].tolist() == sd_form(ours) != sd_form(openai)


def test_case_and_whitespace_cleanup():
    assert torch.equal(tokenize("A  Photo"), tokenize("a photo"))
    assert torch.equal(tokenize("  A\tPHOTO\n of a  Cat "), tokenize("a photo of a cat"))
    assert clean_prompt("  Fish &amp; \u201cChips\u201d\n") == 'fish & "chips"'


def test_long_prompt_is_truncated_with_warning():
    prompt = "a photo of a cat, " * 20  # 6 tokens a time: 120 tokens, of which 75 fit
    with pytest.warns(UserWarning, match=r"45 tokens dropped.*truncated because CLIP can only handle sequences up "
                                         r"to 77 tokens: 'a cat , a photo") as record:
        ids = tokenize(["short", prompt])
    assert len(record) == 1 and "Prompt 1" in str(record[0].message)
    assert ids.shape == (2, 77) and ids[1, 0] == BOS_ID and ids[1, -1] == EOS_ID
    assert ids[1, 1:7].tolist() == [320, 1125, 539, 320, 2368, 267]  # "a photo of a cat ," from the start is kept


def test_exactly_full_prompt_does_not_warn(recwarn):
    ids = tokenize("cat " * 75)  # 75 tokens + start + end = 77
    assert ids[0].tolist() == [BOS_ID] + [2368] * 75 + [EOS_ID]
    assert not recwarn.list


@pytest.mark.parametrize("bad, error", [
    (123, TypeError), (None, TypeError), (b"a cat", TypeError), (["a cat", None], TypeError), ([["a cat"]], TypeError),
    ([], ValueError),
])
def test_bad_input(bad, error):
    with pytest.raises(error, match=r"str|list"):
        tokenize(bad)


def test_loads_offline_without_network(tmp_path):
    """Fresh interpreters, run from elsewhere, with HF_HUB_OFFLINE=1 or a bogus HF_ENDPOINT, and every socket
    connect recorded and refused: the files are read locally and no connection is attempted."""
    code = textwrap.dedent("""
        import socket
        attempts = []
        def refuse(*args, **kwargs):
            attempts.append(repr(args))
            raise OSError("network disabled by the test")
        socket.socket.connect = socket.socket.connect_ex = socket.create_connection = socket.getaddrinfo = refuse
        from sd.tokenizer import tokenize
        print(tokenize("a photo of a cat")[0, :7].tolist(), attempts)
    """)
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    runs = [subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=base | env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for env in ({"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://hub.invalid:9"})]  # in parallel: ~4 s
    for run in runs:
        stdout, stderr = run.communicate(timeout=120)
        assert run.returncode == 0, stderr
        assert stdout.strip() == "[49406, 320, 1125, 539, 320, 2368, 49407] []"
