"""Pure functions over strings and numbers: what `habit eval` measures in generated text.

Nothing here knows about models or tensors, so every metric can be tested on hand-made strings.
Rates over an empty list are 0.0 (nothing observed); summaries of an empty list are None.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

# A word loop longer than this many words per repeat is a repeated paragraph; those show up as
# repeated lines, which has_loop checks separately. The bound keeps has_loop O(len).
_MAX_LOOP_UNIT_WORDS = 64
# Character loops ("abcabcabc...") are only looked for at the very end, where a model that has
# degenerated keeps going until it hits max_new_tokens.
_MAX_CHAR_UNIT = 20
_MIN_CHAR_REPEATS = 8
# math.exp overflows just above 709.78; a loss that large is a broken model, not a number to report.
_MAX_LOSS = 700.0


# Share of reference answers that must open with the same words for that opening to become the
# default expectation; 0.75 keeps "I want you to act as" on the tutorial table (82% of rows) and
# stops before "... act as a", which only some rows continue with.
PREFIX_SHARE = 0.75


def _rate(flags: Iterable[bool]) -> float:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else 0.0


def stopped_rate(finish_reasons: Sequence[str]) -> float:
    """Fraction of generations that ended on their own ("stop") rather than at the length limit."""
    return _rate(reason == "stop" for reason in finish_reasons)


def _squash(s: str) -> str:
    return " ".join(s.split()).casefold()


def _matcher(prefix: str | None, regex: str | None):
    if prefix is None and regex is None:
        raise ValueError("give a prefix, a regex or both to match against")
    want = _squash(prefix) if prefix is not None else None
    pattern = re.compile(regex, re.DOTALL) if regex is not None else None

    def match(text: str) -> bool:
        # Models differ in capitals and spacing ("I want  you" vs "i want you"); that is not the
        # behaviour being taught, so the prefix check ignores both.
        if want is not None and not _squash(text).startswith(want):
            return False
        return pattern is None or pattern.search(text) is not None

    return match


def matches_expectation(text: str, prefix: str | None = None, regex: str | None = None) -> bool:
    """True when `text` starts with `prefix` (case and whitespace ignored) and/or `regex` is found
    in it (re.search, DOTALL). With both, both must hold; with neither, ValueError."""
    return _matcher(prefix, regex)(text)


def expectation_rate(
    texts: Sequence[str], prefix: str | None = None, regex: str | None = None
) -> float:
    """Fraction of `texts` for which matches_expectation holds."""
    match = _matcher(prefix, regex)  # compiled once, and raises even when texts is empty
    return _rate(match(t) for t in texts)


def common_prefix(texts: Sequence[str], min_share: float = 0.5, max_words: int = 8) -> str | None:
    """The longest opening of 2..max_words words that at least `min_share` of `texts` begin with,
    or None. Used to guess the expected opening of tuned outputs ("I want you to act as")."""
    if not 0 < min_share <= 1:
        raise ValueError(f"min_share must be in (0, 1], got {min_share}")
    words = [t.split()[:max_words] for t in texts]
    best = None
    for k in range(1, max_words + 1):
        counts = Counter(tuple(w[:k]) for w in words if len(w) >= k)
        if not counts:
            break
        top, count = counts.most_common(1)[0]
        # A k+1-word prefix is shared by no more texts than its k-word stem, so once the best
        # k-word prefix falls below the share, no longer one can qualify.
        if count / len(texts) < min_share:
            break
        best = top
    return " ".join(best) if best is not None and len(best) >= 2 else None


def _word_loop(tokens: list[str], n: int, repeats: int) -> bool:
    # A unit of p words repeated r times back to back is a span where tokens[i] == tokens[i + p]
    # holds p * (r - 1) times in a row. Units shorter than n are caught too: "a b a b ..." is
    # also periodic with period 4, it just needs more repeats to fill p * repeats words.
    for p in range(n, min(_MAX_LOOP_UNIT_WORDS, len(tokens) // repeats) + 1):
        need, run = p * (repeats - 1), 0
        for same in map(str.__eq__, tokens, tokens[p:]):
            run = run + 1 if same else 0
            if run >= need:
                return True
    return False


def _line_loop(text: str, repeats: int) -> bool:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) >= 2 and lines[-1] != lines[-2] and lines[-2].startswith(lines[-1]):
        lines.pop()  # the last repeat was cut off by the token limit
    if len(lines) < repeats:
        return False
    return all(line == lines[-1] for line in lines[-repeats:])


def _char_loop(text: str) -> bool:
    s = text.rstrip()
    for p in range(1, _MAX_CHAR_UNIT + 1):
        need = p * (_MIN_CHAR_REPEATS - 1)  # matches of s[i] == s[i - p], walking back from the end
        if len(s) < need + p:
            break
        if all(s[-1 - j] == s[-1 - j - p] for j in range(need)):
            return True
    return False


def has_loop(text: str, n: int = 4, repeats: int = 3) -> bool:
    """Degeneration detector: a unit of `n` or more words (up to 64) repeated `repeats` times back
    to back, the same line repeated `repeats` times at the end, or a 1-20 character unit repeated
    8+ times at the very end ("abcabcabc...", which has no spaces to split on)."""
    if n < 1 or repeats < 2:
        raise ValueError(f"need n >= 1 and repeats >= 2, got n={n}, repeats={repeats}")
    return _word_loop(text.split(), n, repeats) or _line_loop(text, repeats) or _char_loop(text)


def loop_rate(texts: Sequence[str], n: int = 4, repeats: int = 3) -> float:
    """Fraction of `texts` that has_loop flags."""
    return _rate(has_loop(t, n, repeats) for t in texts)


def _words(s: str) -> list[str]:
    return [w for w in re.split(r"\W+", s.lower()) if w]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 on lowercased word tokens: 2 * LCS / (len(candidate) + len(reference))."""
    a, b = _words(candidate), _words(reference)
    if not a or not b:
        return 0.0
    if len(a) < len(b):
        a, b = b, a  # the DP row runs over the shorter list: O(min(m, n)) memory
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    # F1 of P = lcs/m and R = lcs/n simplifies to 2*lcs/(m+n), which is exactly symmetric.
    return 2 * prev[-1] / (len(a) + len(b))


def mean(xs: Iterable[float]) -> float | None:
    """Arithmetic mean, or None for no values."""
    xs = list(xs)
    return math.fsum(xs) / len(xs) if xs else None


def _quantile(sorted_xs: list[float], q: float) -> float:
    # Linear interpolation between closest ranks, as numpy.percentile does by default.
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return float(sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo))


def median(xs: Iterable[float]) -> float | None:
    """Median, or None for no values."""
    xs = sorted(xs)
    return _quantile(xs, 0.5) if xs else None


def spread(xs: Iterable[float]) -> dict[str, float | None]:
    """median, p10, p90, mean, min and max of `xs`; every value None when there are none."""
    xs = sorted(xs)
    if not xs:
        return dict.fromkeys(("median", "p10", "p90", "mean", "min", "max"))
    return {
        "median": _quantile(xs, 0.5),
        "p10": _quantile(xs, 0.1),
        "p90": _quantile(xs, 0.9),
        "mean": mean(xs),
        "min": float(xs[0]),
        "max": float(xs[-1]),
    }


def perplexity(loss: float | None) -> float | None:
    """exp(loss) for a mean token cross-entropy; inf for absurd losses, None passes through."""
    if loss is None:
        return None
    return float("inf") if loss > _MAX_LOSS else math.exp(loss)


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine similarity; 0.0 when either vector is all zeros."""
    if len(a) != len(b):
        raise ValueError(f"vectors differ in length: {len(a)} vs {len(b)}")
    na, nb = math.sqrt(math.fsum(x * x for x in a)), math.sqrt(math.fsum(y * y for y in b))
    if na == 0 or nb == 0:
        return 0.0
    # Rounding can push identical vectors a hair past 1.
    return max(-1.0, min(1.0, math.fsum(x * y for x, y in zip(a, b)) / (na * nb)))
