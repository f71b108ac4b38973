"""AUTOMATIC1111's prompt syntax: emphasis `(word:1.3)`, `(word)`, `[word]`, and `BREAK`.

No tutorial counterpart (the tutorial encodes the prompt as plain text). The behaviour is AUTOMATIC1111's
(stable-diffusion-webui, modules/prompt_parser.py: parse_prompt_attention), written anew from its documented
examples: `(x)` multiplies the attention to x by 1.1, `[x]` divides it by 1.1, `(x:w)` multiplies it by w, nesting
multiplies, `\\(` `\\)` `\\[` `\\]` and `\\\\` are the literal characters, an unclosed bracket still applies to the
end of the prompt, a stray `)` or `]` is text, and `BREAK` starts a new 75-token chunk. One difference: a BREAK
inside brackets stays a BREAK here (AUTOMATIC1111 multiplies its marker's weight too, and then no longer sees it).
"""

import re

EMPHASIS = 1.1  # what one pair of round brackets multiplies by (and square brackets divide by)
BREAK = ["BREAK", -1]  # the marker parse_prompt_attention gives for BREAK, as AUTOMATIC1111's

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
