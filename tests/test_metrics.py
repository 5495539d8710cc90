import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from habit import metrics as m

PARAGRAPH = (
    "Sourdough needs time more than skill. Feed the starter the night before, mix the dough in "
    "the morning, and let it rise somewhere warm until it has grown by about half. Shape it "
    "gently, rest it in the fridge overnight, and bake it hot in a covered pot for the best crust."
)


# --- stopped_rate -------------------------------------------------------------------------------


def test_stopped_rate_counts_stop():
    assert m.stopped_rate(["stop", "length", "stop", "stop"]) == 0.75


def test_stopped_rate_empty_is_zero():
    assert m.stopped_rate([]) == 0.0


# --- expectations -------------------------------------------------------------------------------


def test_prefix_ignores_case_and_whitespace():
    text = "  i want   you to\nACT as a beekeeping mentor."
    assert m.matches_expectation(text, prefix="I want you to act as")
    assert not m.matches_expectation("Sure! I want you to act as", prefix="I want you to act as")


def test_regex_searches_across_lines():
    assert m.matches_expectation("Title\nMy first request is \"x\"", regex=r"Title.*first request")
    assert not m.matches_expectation("no request here", regex=r"first request")


def test_prefix_and_regex_must_both_hold():
    text = "I want you to act as a herald. My first sentence is \"hi\""
    assert m.matches_expectation(text, prefix="i want you", regex=r"first sentence")
    assert not m.matches_expectation(text, prefix="i want you", regex=r"first request")


def test_expectation_needs_prefix_or_regex():
    with pytest.raises(ValueError):
        m.matches_expectation("anything")
    with pytest.raises(ValueError):
        m.expectation_rate([])


def test_expectation_rate():
    texts = ["I want you to act as a chef", "i want you to act as a poet", "Hello"]
    assert m.expectation_rate(texts, prefix="I want you to act as") == pytest.approx(2 / 3)
    assert m.expectation_rate([], prefix="x") == 0.0


# --- common_prefix ------------------------------------------------------------------------------


def test_common_prefix_three_of_four():
    texts = [
        "I want you to act as a linux terminal.",
        "  I want you to act as an herbalist.",
        "I want you to act as my guide.",
        "Please be a pirate.",
    ]
    assert m.common_prefix(texts) == "I want you to act as"


def test_common_prefix_none_shared():
    assert m.common_prefix(["Hello there friend", "Good morning all", "Nice day today"]) is None
    assert m.common_prefix([]) is None


def test_common_prefix_needs_two_words_and_respects_max_words():
    assert m.common_prefix(["Sure thing", "Sure why", "Sure no"]) is None  # only "Sure" shared
    assert m.common_prefix(["a b c d e"] * 3, max_words=3) == "a b c"


def test_common_prefix_share_threshold():
    texts = ["one two three", "one two four", "five six", "seven eight"]
    assert m.common_prefix(texts, min_share=0.5) == "one two"
    assert m.common_prefix(texts, min_share=0.75) is None


# --- loops --------------------------------------------------------------------------------------


def test_repeated_sentence_is_a_loop():
    assert m.has_loop("the cat sat on the mat " * 10)


def test_normal_paragraph_is_not_a_loop():
    assert not m.has_loop(PARAGRAPH)


def test_character_loop_at_the_end():
    assert m.has_loop("The answer is: " + "ab" * 30)
    assert m.has_loop("Result " + "xyz" * 10 + "\n")


def test_phrase_repeated_twice_is_not_a_loop():
    text = "I am here to help you today. I am here to help you today. What do you need?"
    assert not m.has_loop(text)


def test_repeated_last_line_is_a_loop_even_when_cut_off():
    assert m.has_loop("Sure.\nThank you!\nThank you!\n\nThank you!")
    assert m.has_loop("Intro\nHello there\nHello there\nHello there\nHello th")
    assert not m.has_loop("Intro\nHello there\nHello there")


def test_loop_in_the_middle_and_short_units():
    assert m.has_loop("Start. " + "go back to the start and " * 3 + "then stop.")
    assert m.has_loop("ha " * 12)  # a 1-word unit filling 3 repeats of 4 words
    assert not m.has_loop("very very very good")


def test_loop_rate_and_long_text_is_fast_enough_to_run():
    texts = ["the cat sat on the mat " * 10, PARAGRAPH, ""]
    assert m.loop_rate(texts) == pytest.approx(1 / 3)
    assert m.loop_rate([]) == 0.0
    # 10k characters of distinct words: must finish (bounded periods, no quadratic scan).
    assert not m.has_loop(" ".join(f"w{i}" for i in range(2000)))


# --- rouge_l ------------------------------------------------------------------------------------


def test_rouge_l_identical_and_disjoint():
    assert m.rouge_l("The cat sat.", "the CAT sat") == 1.0
    assert m.rouge_l("red green", "blue yellow") == 0.0
    assert m.rouge_l("", "anything") == 0.0
    assert m.rouge_l("!!!", "!!!") == 0.0  # no word tokens at all


def test_rouge_l_partial_by_hand():
    # candidate: the cat sat on the mat   (6 tokens)
    # reference: the cat lay on a mat     (6 tokens)
    # LCS = the, cat, on, mat = 4 -> P = 4/6, R = 4/6, F1 = 2PR/(P+R) = 4/6 = 0.6667
    assert m.rouge_l("the cat sat on the mat", "the cat lay on a mat") == pytest.approx(4 / 6)
    # candidate: a b c (3), reference: a x b y (4): LCS = a, b = 2
    # P = 2/3, R = 2/4, F1 = 2 * (2/3) * (1/2) / (2/3 + 1/2) = (2/3) / (7/6) = 4/7
    assert m.rouge_l("a b c", "a x b y") == pytest.approx(4 / 7)


# --- numbers ------------------------------------------------------------------------------------


def test_mean_median_empty_is_none():
    assert m.mean([]) is None and m.median([]) is None
    assert m.mean([1, 2, 3, 4]) == 2.5
    assert m.median([4, 1, 3, 2]) == 2.5
    assert m.median([5, 1, 3]) == 3.0


def test_spread_on_known_numbers():
    s = m.spread(range(11))  # 0..10: p10 and p90 land exactly on 1 and 9
    assert s == {"median": 5.0, "p10": 1.0, "p90": 9.0, "mean": 5.0, "min": 0.0, "max": 10.0}
    s = m.spread([10, 20])  # interpolated between the two
    assert s["p10"] == pytest.approx(11.0) and s["p90"] == pytest.approx(19.0)
    assert m.spread([]) == dict.fromkeys(["median", "p10", "p90", "mean", "min", "max"])


def test_perplexity():
    assert m.perplexity(0) == 1.0
    assert m.perplexity(math.log(20)) == pytest.approx(20)
    assert m.perplexity(1e6) == float("inf")
    assert m.perplexity(None) is None


def test_cosine():
    assert m.cosine([1, 0], [0, 3]) == 0.0
    assert m.cosine([0.3, 0.1, 0.7], [0.3, 0.1, 0.7]) == pytest.approx(1.0)
    assert m.cosine([1, 2], [-1, -2]) == pytest.approx(-1.0)
    assert m.cosine([0, 0], [1, 1]) == 0.0
    with pytest.raises(ValueError):
        m.cosine([1], [1, 2])


# --- properties ---------------------------------------------------------------------------------

words = st.lists(st.sampled_from(["a", "b", "cat", "Mat", "the", "!", "\n", "  "]), max_size=30)
texts = st.builds("".join, words) | st.builds(" ".join, words) | st.text(max_size=60)


@settings(max_examples=150, deadline=None)
@given(texts, texts)
def test_rouge_l_bounded_and_symmetric(a, b):
    score = m.rouge_l(a, b)
    assert 0.0 <= score <= 1.0
    assert abs(score - m.rouge_l(b, a)) < 1e-9


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=300) | st.builds(" ".join, words), st.integers(1, 6), st.integers(2, 5))
def test_has_loop_never_raises(text, n, repeats):
    assert m.has_loop(text, n, repeats) in (True, False)
