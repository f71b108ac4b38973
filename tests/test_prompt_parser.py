"""sd.prompt_parser against AUTOMATIC1111's documented behaviour (the examples of its parse_prompt_attention)."""

import pytest
import torch

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


@pytest.mark.parametrize("prompt,expected", [
    ("test", [[10, "test"]]),
    ("a [b:3]", [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", [[10, "a [unbalanced"]]),
    ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
    ("a [{b|d{:.5] c", [[5, "a  c"], [10, "a {b|d{ c"]]),
    ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", [[1, "a"], [2, "(b:1.1)"], [3, "a"], [4, "(b:1.1)"], [5, "a"], [6, "(b:1.1)"], [7, "a"],
                     [8, "(b:1.1)"], [9, "a"], [10, "(b:1.1)"]]),
    ("[fe|]male", [[1, "female"], [2, "male"], [3, "female"], [4, "male"], [5, "female"], [6, "male"],
                   [7, "female"], [8, "male"], [9, "female"], [10, "male"]]),
    ("[fe|||]male", [[1, "female"], [2, "male"], [3, "male"], [4, "male"], [5, "female"], [6, "male"], [7, "male"],
                     [8, "male"], [9, "female"], [10, "male"]]),
    ("a [b::4] c", [[4, "a b c"], [10, "a  c"]]),
    ("[b:20]", [[10, ""]]),
])
def test_prompt_editing_schedules_as_automatic1111_documents_them(prompt, expected):
    from sd.prompt_parser import prompt_schedules

    assert prompt_schedules(prompt, 10) == expected


def test_prompt_editing_leaves_emphasis_and_escapes_for_the_attention_parser():
    from sd.prompt_parser import prompt_schedules

    assert prompt_schedules("(a [b:c:5]:1.2) \\[d:2\\]", 10) == [[5, "(a b:1.2) \\[d:2\\]"], [10, "(a c:1.2) \\[d:2\\]"]]


@pytest.mark.parametrize("steps", [0, -1, 2.5, True])
def test_prompt_schedules_refuses_bad_step_counts(steps):
    from sd.prompt_parser import prompt_schedules

    with pytest.raises(ValueError, match="steps must be a positive integer"):
        prompt_schedules("a [b:3]", steps)


def test_a_plain_prompt_gives_exactly_todays_ids_at_weight_one():
    from sd.prompt_parser import tokenize_chunks
    from sd.tokenizer import tokenize

    for prompt in ("a red circle on a blue background", "", "Ünïcode &amp; “quotes”, 3 cats"):
        ids, weights = tokenize_chunks(prompt)
        assert torch.equal(ids, tokenize(prompt)) and torch.equal(weights, torch.ones(1, 77))


def test_emphasis_weights_each_fragments_tokens():
    from sd.prompt_parser import tokenize_chunks
    from sd.tokenizer import load_tokenizer

    ids, weights = tokenize_chunks("a (red:1.5) [fox]")
    words = load_tokenizer().convert_ids_to_tokens(ids[0, 1:4].tolist())
    assert words == ["a</w>", "red</w>", "fox</w>"] and ids[0, 4] == 49407
    assert torch.allclose(weights[0, :5], torch.tensor([1.0, 1.0, 1.5, 1 / 1.1, 1.0]))


def test_long_prompts_are_cut_into_chunks_at_the_last_comma():
    """A 200-token prompt: 75-token chunks, each <|startoftext|> ... <|endoftext|>; where a chunk fills up within 20
    tokens of a comma, what follows the comma starts the next chunk."""
    from sd.prompt_parser import tokenize_chunks

    words = ", ".join(["red fox"] * 66)  # "red fox ," 3 tokens each: 197 tokens and commas every third
    ids, weights = tokenize_chunks(words)
    assert ids.shape == (3, 77) and weights.shape == (3, 77)
    assert (ids[:, 0] == 49406).all() and (ids[:, -1] == 49407).all()
    comma = 267
    # The chunk fills at 75 tokens; its last comma is its 75th token (index 74): nothing follows it to move.
    first = ids[0, 1:76].tolist()
    assert first[-1] == comma and 49407 not in first
    flat = [t for row in ids.tolist() for t in row[1:76] if t != 49407]
    assert len(flat) == 197 and flat.count(comma) == 65


def test_a_chunk_that_fills_mid_phrase_moves_the_phrase_to_the_next():
    from sd.prompt_parser import tokenize_chunks

    prompt = "a " * 70 + ", b c d e f g h i j"  # 70 tokens, a comma (71st), then 9 words: the 76th token needs a cut
    ids, _ = tokenize_chunks(prompt)
    first, second = ids[0, 1:76].tolist(), ids[1, 1:76].tolist()
    assert first[:71].count(267) == 1 and first[70] == 267 and set(first[71:]) == {49407}  # cut after the comma
    assert len([t for t in second if t != 49407]) == 9


def test_break_starts_a_new_chunk():
    from sd.prompt_parser import tokenize_chunks

    ids, _ = tokenize_chunks("a cat BREAK a dog")
    assert ids.shape == (2, 77) and ids[0, 3] == 49407 and ids[1, 3] == 49407
