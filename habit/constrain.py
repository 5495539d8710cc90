"""Structured output for `habit serve`: `response_format` json_object / json_schema as constrained
decoding, a transformers LogitsProcessor that masks, per batch row, the tokens its grammar forbids.

The grammar library is llguidance. Of the maintained ones it fits transformers' batched
`generate` best and is the quickest on CPU: one matcher per row (rows with and without a grammar
share one batch), a Rust mask computation per token with no up-front index build over the
vocabulary, and a small wheel with no torch or CUDA coupling. xgrammar's HF processor takes one
grammar set for the whole batch and precompiles against the vocabulary; outlines builds a
regex automaton per schema first (seconds for a nested schema) and pulls in a larger stack.
"""

from __future__ import annotations

import json
import threading

from transformers import LogitsProcessor

# no free whitespace: a model that may emit spaces between tokens forever can fill max_tokens
# without closing the object; OpenAI's own JSON mode answers compact JSON too
_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar(response_format: dict | None) -> str | None:
    """The llguidance grammar a request's `response_format` asks for (None: free text); a
    ValueError says what is wrong with it."""
    import llguidance

    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ValueError("response_format json_schema needs {'json_schema': {'name': ..., "
                                "'schema': {...}}}")
    else:
        raise ValueError(f"response_format type {kind!r} is not one of text, json_object, "
                            "json_schema")
    try:
        text = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=_JSON)
    except ValueError as e:
        raise ValueError(f"response_format: {e}") from None
    error = llguidance.LLMatcher.validate_grammar(text)
    if error:
        raise ValueError(f"response_format: the schema cannot be followed ({error[:300]})")
    return text


class Tokenizers:
    """llguidance's view of a tokenizer, built once (it reads the whole vocabulary)."""

    def __init__(self, tokenizer, vocab: int, stop):
        self.args, self._made, self._lock = (tokenizer, vocab, list(stop)), None, threading.Lock()

    def get(self):
        import llguidance.hf

        with self._lock:
            if self._made is None:
                tokenizer, vocab, stop = self.args
                self._made = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=stop)
            return self._made


class Constrain(LogitsProcessor):
    """Masks each constrained row's scores to the tokens its grammar allows next."""

    def __init__(self, grammars: list[str | None], tokenizer, width: int, stop):
        import llguidance
        import llguidance.torch

        self.width, self.stop = width, set(stop)
        self.matchers = [None if g is None else llguidance.LLMatcher(tokenizer, g) for g in grammars]
        self.ended = [g is None for g in grammars]  # free rows, and rows past their end token
        self.mask = llguidance.torch.allocate_token_bitmask(len(grammars), tokenizer.vocab_size)

    def __call__(self, input_ids, scores):
        import llguidance.torch

        rows = []
        for i, m in enumerate(self.matchers):
            if self.ended[i]:
                continue
            if input_ids.shape[1] > self.width:
                token = int(input_ids[i, -1])
                m.consume_token(token)
                self.ended[i] = token in self.stop
            if self.ended[i] or m.is_error():  # an error: the row was ended by a stop string
                self.ended[i] = True
                continue
            # a complete answer (is_stopped) leaves only the end token allowed
            llguidance.torch.fill_next_token_bitmask(m, self.mask, i)
            rows.append(i)
        if rows:
            index = input_ids.new_tensor(rows)
            masked = scores[index]
            llguidance.torch.apply_token_bitmask_inplace(masked, self.mask[rows].to(scores.device))
            scores[index] = masked
        return scores
