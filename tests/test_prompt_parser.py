"""sd.prompt_parser against AUTOMATIC1111's documented behaviour (the examples of its parse_prompt_attention)."""

import pytest

from sd.prompt_parser import parse_prompt_attention


def rounded(parsed):
    return [[text, round(weight, 6)] for text, weight in parsed]


@pytest.mark.parametrize("prompt,expected", [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.573], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55], [", sun, ", 1.1],
      ["sky", 1.4641], [".", 1.1]]),
])
def test_automatic1111s_documented_examples(prompt, expected):
    assert rounded(parse_prompt_attention(prompt)) == expected


@pytest.mark.parametrize("prompt,expected", [
    ("", [["", 1.0]]),
    ("[faded]", [["faded", round(1 / 1.1, 6)]]),
    ("((a) b)", [["a", 1.21], [" b", 1.1]]),
    ("(a:0.5) b)", [["a", 0.5], [" b)", 1.0]]),            # a stray ")" is text
    ("a] b", [["a] b", 1.0]]),
    ("ratio 16:9", [["ratio 16:9", 1.0]]),                # a colon outside brackets is text
    ("x:1.5) y", [["x:1.5) y", 1.0]]),                    # a weight with no open bracket is text
    ("(a:1.2.3)", [["a:1.2.3)", 1.1]]),                   # not a number: text, and the "(" stays open
    ("back\\\\slash", [["back\\slash", 1.0]]),
    ("a cat BREAK a dog", [["a cat", 1.0], ["BREAK", -1], ["a dog", 1.0]]),
    ("(a BREAK b)", [["a", 1.1], ["BREAK", -1], ["b", 1.1]]),
    ("BREAKFAST", [["BREAKFAST", 1.0]]),                  # only the word BREAK
    ("(a:-1)(b:-1)", [["ab", -1.0]]),                     # a weight of -1 is not a BREAK
    ("a BREAK BREAK b", [["a", 1.0], ["BREAK", -1], ["", 1.0], ["BREAK", -1], ["b", 1.0]]),
])
def test_edge_cases(prompt, expected):
    assert rounded(parse_prompt_attention(prompt)) == expected


def test_a_non_string_is_refused():
    with pytest.raises(TypeError, match="a prompt must be a string, got int"):
        parse_prompt_attention(3)
