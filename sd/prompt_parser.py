"""AUTOMATIC1111's prompt syntax: emphasis `(word:1.3)`, `(word)`, `[word]`, `BREAK`, and prompt editing
`[from:to:when]` / alternation `[a|b]`.

No tutorial counterpart (the tutorial encodes the prompt as plain text). The behaviour is AUTOMATIC1111's
(stable-diffusion-webui, modules/prompt_parser.py: parse_prompt_attention), written anew from its documented
examples: `(x)` multiplies the attention to x by 1.1, `[x]` divides it by 1.1, `(x:w)` multiplies it by w, nesting
multiplies, `\\(` `\\)` `\\[` `\\]` and `\\\\` are the literal characters, an unclosed bracket still applies to the
end of the prompt, a stray `)` or `]` is text, and `BREAK` starts a new 75-token chunk. One difference: a BREAK
inside brackets stays a BREAK here (AUTOMATIC1111 multiplies its marker's weight too, and then no longer sees it).
Prompt editing follows get_learned_conditioning_prompt_schedules (its lark grammar, here a small recursive parser):
`[to:when]`, `[from:to:when]`, `[from::when]` with `when` below 1 a fraction of the steps, else a step number (its
"old scheduling"), and `[a|b]` the next option at every step; what is not one of these stays text.
"""

import math
import re
import warnings
from collections.abc import Mapping

import torch

from .checks import check

EMPHASIS = 1.1  # what one pair of round brackets multiplies by (and square brackets divide by)
BREAK = ["BREAK", -1]  # the marker parse_prompt_attention gives for BREAK, as AUTOMATIC1111's
PROMPT_SYNTAXES = ("a1111", "plain")  # AUTOMATIC1111's syntax (the default), or the text as written (diffusers')

_TOKENS = re.compile(r"""
    \\[()\[\]\\]              # an escaped bracket or backslash: the character itself
  | \\                        # a lone backslash: itself
  | \(                        # open emphasis
  | \[                        # open de-emphasis
  | :\s*([+-]?[.\d]+)\s*\)    # ":1.3)": close an explicit weight
  | \)                        # close emphasis
  | \]                        # close de-emphasis
  | [^\\()\[\]:]+             # plain text
  | :                         # a colon that is not a weight: text
""", re.VERBOSE)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def check_prompt_syntax(syntax) -> None:
    check(syntax in PROMPT_SYNTAXES, f"prompt_syntax must be one of {', '.join(PROMPT_SYNTAXES)}, got {syntax!r}")


def parse_prompt_attention(text: str) -> list[list]:
    """[[fragment, weight], ...] for a prompt, runs of equal weight merged; ["BREAK", -1] where BREAK splits it.
    `a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).` gives a 1.0, house 1.573, ' ' 1.1, on 1.0, ' a ' 1.1,
    hill 0.55, ', sun, ' 1.1, sky 1.4641, '.' 1.1."""
    if not isinstance(text, str):
        raise TypeError(f"a prompt must be a string, got {type(text).__name__}")
    result: list[list] = []
    round_open: list[int] = []  # where in result each unclosed "(" started
    square_open: list[int] = []
    for match in _TOKENS.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            _add_text(result, token[-1] if len(token) == 2 else token)
        elif token == "(":
            round_open.append(len(result))
        elif token == "[":
            square_open.append(len(result))
        elif weight is not None and round_open and _is_number(weight):
            _multiply(result, round_open.pop(), float(weight))
        elif token == ")" and round_open:
            _multiply(result, round_open.pop(), EMPHASIS)
        elif token == "]" and square_open:
            _multiply(result, square_open.pop(), 1 / EMPHASIS)
        else:
            _add_text(result, token)
    for start in round_open:  # unclosed brackets apply to the end
        _multiply(result, start, EMPHASIS)
    for start in square_open:
        _multiply(result, start, 1 / EMPHASIS)
    return _merged(result) or [["", 1.0]]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _add_text(result: list[list], text: str) -> None:
    """Text at weight 1 (multiplied later by the brackets around it), split where BREAK stands."""
    for i, part in enumerate(_BREAK.split(text)):
        if i > 0:
            result.append(list(BREAK))
        result.append([part, 1.0])


def _multiply(result: list[list], start: int, factor: float) -> None:
    for item in result[start:]:
        if item != BREAK:
            item[1] *= factor


def _merged(result: list[list]) -> list[list]:
    """Neighbours of equal weight joined into one fragment; BREAK markers are kept apart."""
    merged: list[list] = []
    for text, weight in result:
        if merged and merged[-1][1] == weight and BREAK not in (merged[-1], [text, weight]):
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return merged


# --- prompt editing: [from:to:when], [to:when], [from::when] and alternation [a|b] ---------------------------------

_NUMBER = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*$")


class _Schedule:
    """[before:after:when]: `before` (a node list, or None for nothing) up to step `when`, `after` from then on."""

    def __init__(self, before, after, when: float):
        self.before, self.after, self.when = before, after, when


class _Alternate:
    """[a|b|...]: option (step - 1) % n at each step."""

    def __init__(self, options):
        self.options = options


class _Brackets:
    """( ... ) or [ ... ] that is emphasis: kept as text around what it holds, for parse_prompt_attention."""

    def __init__(self, open_: str, inner, close: str):
        self.open, self.inner, self.close = open_, inner, close


MAX_NESTING = 64  # brackets inside brackets: far past any real prompt, and what keeps the parser's recursion safe


class _Parser:
    """The prompt-editing parser: each (position, stop characters) parsed once and remembered, so unclosed
    brackets, which are tried as brackets and then read as text, cost linear work each, not exponential."""

    def __init__(self, text: str):
        self.text, self.memo = text, {}
        depth = deepest = 0
        escaped = False
        for c in text:
            escaped, depth = (False, depth) if escaped else (c == "\\", depth + (c in "([") - (c in ")]" and depth > 0))
            deepest = max(deepest, depth)
        check(deepest <= MAX_NESTING, f"the prompt nests brackets {deepest} deep; at most {MAX_NESTING} are read")

    def parse(self, i: int, stops: str) -> tuple[list, int]:
        """Nodes (strings and the classes above) from text[i] up to an unescaped character of `stops` here."""
        if (i, stops) not in self.memo:
            self.memo[i, stops] = self._parse(i, stops)
        return self.memo[i, stops]

    def _parse(self, i: int, stops: str) -> tuple[list, int]:
        text, nodes = self.text, []
        while i < len(text) and text[i] not in stops:
            c = text[i]
            if c == "\\" and i + 1 < len(text):
                nodes.append(text[i:i + 2])  # kept escaped: parse_prompt_attention reads the escape
                i += 2
            elif c in "([":
                node, end = (self.round if c == "(" else self.square)(i)
                nodes.append(node if node is not None else c)  # no closing bracket: the character is text
                i = end if node is not None else i + 1
            else:
                nodes.append(c)
                i += 1
        return nodes, i

    def round(self, i: int):
        inner, end = self.parse(i + 1, ")")
        if end >= len(self.text):
            return None, i
        return _Brackets("(", inner, ")"), end + 1

    def square(self, i: int):
        """What follows "[": a schedule, an alternation or emphasis; (None, i) if it is none of them."""
        parts, seps, j = [], [], i + 1
        while True:
            part, j = self.parse(j, ":|]")
            parts.append(part)
            if j >= len(self.text):
                return None, i
            seps.append(self.text[j])
            j += 1
            if seps[-1] == "]":
                break
        if seps == ["]"]:
            return _Brackets("[", parts[0], "]"), j
        if set(seps[:-1]) == {"|"}:
            return _Alternate(parts), j
        segments = [[]]  # split at the colons only: in a schedule a "|" is text
        for part, sep in zip(parts, seps):
            segments[-1].extend(part)
            if sep == "|":
                segments[-1].append(sep)
            elif sep == ":":
                segments.append([])
        when = _NUMBER.match("".join(p for p in segments[-1] if isinstance(p, str)))
        if len(segments) in (2, 3) and when and all(isinstance(p, str) for p in segments[-1]):
            before = segments[0] if len(segments) == 3 else None
            return _Schedule(before, segments[-2], float(when.group(1))), j
        return None, i


def _steps(nodes, steps: int, found: set) -> None:
    """Every step at which some part of the prompt changes."""
    for node in nodes:
        if isinstance(node, _Schedule):
            node.step = min(steps, int(node.when * steps if node.when < 1 else node.when))
            if node.step >= 1:
                found.add(node.step)
            for part in (node.before or [], node.after):
                _steps(part, steps, found)
        elif isinstance(node, _Alternate):
            found.update(range(1, steps + 1))
            for option in node.options:
                _steps(option, steps, found)
        elif isinstance(node, _Brackets):
            _steps(node.inner, steps, found)


def _text_at(nodes, step: int) -> str:
    out = []
    for node in nodes:
        if isinstance(node, _Schedule):
            out.append(_text_at(node.before or [], step) if step <= node.step else _text_at(node.after, step))
        elif isinstance(node, _Alternate):
            out.append(_text_at(node.options[(step - 1) % len(node.options)], step))
        elif isinstance(node, _Brackets):
            out.append(node.open + _text_at(node.inner, step) + node.close)
        else:
            out.append(node)
    return "".join(out)


def prompt_schedules(prompt: str, steps: int) -> list[list]:
    """[[end_step, text], ...]: the prompt as it reads up to each end step (AUTOMATIC1111's
    get_learned_conditioning_prompt_schedules for one prompt). `when` below 1 is a fraction of the steps, else a
    step number. For 10 steps, `a [b:3]` gives [[3, 'a '], [10, 'a b']]; `[a|b]` alternates every step."""
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt must be a string, got {type(prompt).__name__}")
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps > 0):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    nodes, _ = _Parser(prompt).parse(0, "")
    found = {steps}
    _steps(nodes, steps, found)
    return [[step, _text_at(nodes, step)] for step in sorted(found)]


# --- 75-token chunks --------------------------------------------------------------------------------------------

CHUNK_TOKENS = 75  # text tokens per chunk: with <|startoftext|> and <|endoftext|>, CLIP's 77
COMMA_BACKTRACK = 20  # a chunk that fills up moves back to its last comma if it lies within this many tokens
COMMA = ",</w>"


FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # the weights are float32
MAX_CHUNKS = 32  # 2400 tokens: far past any real prompt; more would only make every cross-attention slower


class _Chunks:
    """Chunks of (ids, weights) being filled, as AUTOMATIC1111's tokenize_line fills them."""

    def __init__(self, bos: int, eos: int, comma: int | None):
        self.bos, self.eos, self.comma = bos, eos, comma  # comma None: never move a cut back (plain prompts)
        self.done: list[tuple[list, list]] = []
        self.ids, self.weights, self.last_comma = [], [], -1

    def close(self) -> None:
        """End the chunk: <|startoftext|>, its tokens, <|endoftext|> padding to 75, <|endoftext|>."""
        pad = CHUNK_TOKENS - len(self.ids)
        self.done.append(([self.bos] + self.ids + [self.eos] * (pad + 1), [1.0] + self.weights + [1.0] * (pad + 1)))
        self.ids, self.weights, self.last_comma = [], [], -1

    def add(self, token: int, weight: float) -> None:
        if token == self.comma:
            self.last_comma = len(self.ids)
        elif len(self.ids) == CHUNK_TOKENS and self.last_comma != -1 \
                and len(self.ids) - self.last_comma <= COMMA_BACKTRACK:
            cut = self.last_comma + 1  # what follows the comma moves to the next chunk
            ids, weights = self.ids[cut:], self.weights[cut:]
            self.ids, self.weights = self.ids[:cut], self.weights[:cut]
            self.close()
            self.ids, self.weights = ids, weights
        if len(self.ids) == CHUNK_TOKENS:
            self.close()
        self.ids.append(token)
        self.weights.append(weight)

    def add_vectors(self, ids: range, weight: float) -> None:
        """A textual-inversion embedding's vectors, all in one chunk (a new one if they don't fit in this)."""
        if len(self.ids) + len(ids) > CHUNK_TOKENS:
            self.close()
        self.ids.extend(ids)
        self.weights.extend([weight] * len(ids))

    def finish(self) -> list[tuple[list, list]]:
        if self.ids or not self.done:
            self.close()
        return self.done


def _embedding_lookup(embeddings: Mapping[str, range], tokenizer) -> dict[int, list[tuple[tuple, range]]]:
    """first token id of each embedding's name -> [(the name's ids, the embedding's vector ids)], longest first,
    so a prompt's tokens are matched as AUTOMATIC1111 matches them (the name tokenized as any other word)."""
    from .tokenizer import clean_prompt

    lookup: dict[int, list[tuple[tuple, range]]] = {}
    names = list(embeddings)
    for name, ids in zip(names, tokenizer([clean_prompt(n) for n in names], add_special_tokens=False,
                                          verbose=False).input_ids if names else []):
        lookup.setdefault(ids[0], []).append((tuple(ids), embeddings[name]))
    for matches in lookup.values():
        matches.sort(key=lambda m: -len(m[0]))
    return lookup


def _add_fragment(chunks: _Chunks, ids: list[int], weight: float, lookup: dict) -> None:
    """One fragment's tokens into the chunks, an embedding's name replaced by its vectors."""
    i = 0
    while i < len(ids):
        match = next((m for m in lookup.get(ids[i], []) if tuple(ids[i:i + len(m[0])]) == m[0]), None)
        if match is None:
            chunks.add(ids[i], weight)
            i += 1
        else:
            chunks.add_vectors(match[1], weight)
            i += len(match[0])


def tokenize_chunks(prompt: str, tokenizer=None, embeddings: Mapping[str, range] | None = None,
                    syntax: str = "a1111") -> tuple[torch.Tensor, torch.Tensor]:
    """A prompt in AUTOMATIC1111's syntax -> (ids, weights), each (k, 77): 75 tokens a chunk between
    <|startoftext|> and <|endoftext|>, padded with <|endoftext|>, a chunk that fills up cut at its last comma when
    it lies within 20 tokens, BREAK starting a new one; each fragment tokenized on its own, its tokens at its weight.
    A plain prompt of up to 75 tokens gives exactly sd.tokenize's ids, at weight 1.
    embeddings: textual-inversion names -> the ids that stand for their vectors (sd.embeddings); where a name
    appears, its vectors take its place, never split across two chunks.
    syntax "plain": no emphasis, BREAK or chunks: the text as written, cut after 75 tokens with a warning (what
    diffusers does), so (1, 77)."""
    from .tokenizer import BOS_ID, EOS_ID, clean_prompt, load_tokenizer

    check_prompt_syntax(syntax)
    tokenizer = tokenizer or load_tokenizer()
    plain = syntax == "plain"
    parsed = [[prompt, 1.0]] if plain else parse_prompt_attention(prompt)
    for text, weight in parsed:
        check(abs(weight) <= FLOAT32_MAX, f"the emphasis on {text[:40]!r} comes to {weight}: weights must be finite numbers "
              f"(write (word:1.3); \\( and \\) for brackets as text)")
    chunks = _Chunks(BOS_ID, EOS_ID, None if plain else tokenizer.convert_tokens_to_ids(COMMA))
    lookup = _embedding_lookup(embeddings or {}, tokenizer)
    texts = [clean_prompt(text) for text, _ in parsed]
    for (text, weight), ids in zip(parsed, tokenizer(texts, add_special_tokens=False, verbose=False).input_ids):
        if [text, weight] == BREAK:
            chunks.close()
        else:
            _add_fragment(chunks, ids, weight, lookup)
    done = chunks.finish()
    if plain and len(done) > 1:
        dropped = [t for c in done[1:] for t in c[0] if t not in (BOS_ID, EOS_ID)]
        warnings.warn(f"{len(dropped)} tokens dropped: a plain prompt (prompt_syntax='plain') is cut after "
                      f"{CHUNK_TOKENS} tokens, as in diffusers; the default syntax takes longer prompts. Dropped: "
                      f"{tokenizer.decode([t for t in dropped if t < len(tokenizer)])!r}", stacklevel=2)
        done = done[:1]
    check(len(done) <= MAX_CHUNKS, f"the prompt needs {len(done)} chunks of {CHUNK_TOKENS} tokens; at most "
          f"{MAX_CHUNKS} ({MAX_CHUNKS * CHUNK_TOKENS} tokens) are taken: {prompt[:60]!r}...")
    ids = torch.tensor([c[0] for c in done], dtype=torch.long)  # (k, 77)
    weights = torch.tensor([c[1] for c in done], dtype=torch.float32)  # (k, 77)
    return ids, weights


# --- extra networks: <lora:name:multiplier> -----------------------------------------------------------------------

_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")  # AUTOMATIC1111's extra_networks.re_extra_net
EXTRA_NETWORKS = ("lora", "lyco")  # AUTOMATIC1111 reads <lyco:...> as a LoRA too
UNSUPPORTED_NETWORKS = ("hypernet",)  # AUTOMATIC1111's other built-in extra network


def extra_networks(prompt: str) -> tuple[str, list[tuple[str, float, float]]]:
    """(the prompt without its extra-network tags, [(name, text-encoder multiplier, UNet multiplier), ...] of its
    LoRAs), as AUTOMATIC1111 reads them: <lora:name>, <lora:name:m> (both m), <lora:name:te:unet>, or te=/unet=
    named. <hypernet:...> is refused (not supported); a tag of a kind AUTOMATIC1111 does not know either is
    dropped with a warning, as it does."""
    found: list[tuple[str, float, float]] = []

    def take(match: re.Match) -> str:
        kind, args = match.group(1), [a.strip() for a in match.group(2).split(":")]
        if kind in UNSUPPORTED_NETWORKS:
            raise ValueError(f"<{kind}:...> in the prompt: sd reads <lora:name:multiplier> (and <lyco:...>); "
                             f"hypernetworks are not supported")
        if kind not in EXTRA_NETWORKS:
            warnings.warn(f"{match.group(0)!r} in the prompt is not an extra network sd knows (lora, lyco): dropped, "
                          f"as AUTOMATIC1111 drops it", stacklevel=4)
            return ""
        found.append(_lora_tag(match.group(0), args))
        return ""

    return _EXTRA_NETWORK.sub(take, prompt), found


def _lora_tag(tag: str, args: list[str]) -> tuple[str, float, float]:
    """(name, te, unet) from a tag's arguments: positional te then unet, or te= / unet= (unet defaults to te)."""
    usage = f"{tag!r} in the prompt: write <lora:NAME>, <lora:NAME:MULTIPLIER> or <lora:NAME:TE:UNET> with numbers"
    named = dict(a.split("=", 1) for a in args[1:] if "=" in a)
    positional = [a for a in args[1:] if "=" not in a]
    check(args[0] != "" and len(positional) <= 2 and set(named) <= {"te", "unet"}, usage)
    values = dict(zip(("te", "unet"), positional)) | named
    numbers = {k: v for k, v in values.items() if _is_number(v) and math.isfinite(float(v))}
    check(numbers.keys() == values.keys(), usage)
    te = float(numbers.get("te", 1.0))
    return args[0], te, float(numbers.get("unet", te))
