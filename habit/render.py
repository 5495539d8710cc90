"""THE one template path: an example → text segments → token ids + loss mask.

Training, generation, evaluation and serving all call `prompt_text` / `encode`, so the prompt a
model is trained on is byte for byte the prompt it is served with.

Two kinds of template:

- "text": a format string split at the response placeholder, e.g. `<act>: {act}\n<prompt>: ` +
  response field `prompt`. The response is followed by the tokenizer's EOS, which carries loss:
  that is how the model learns to stop (the tutorial masked it out and its model rambled on).
- "chat": the tokenizer's own chat template. A table row becomes one user message (built from the
  prompt format) and one assistant message (the response); chat data keeps its turns. Loss falls
  on the assistant turns up to and including the end-of-turn token.

Segments are tokenized one by one and concatenated, so the prompt ids seen in training are
exactly the ids `prompt_text` tokenizes to at generation time.
"""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

from habit.data import Example, Message, Table, placeholders
from habit.errors import HabitError


@dataclass(frozen=True)
class Template:
    kind: str  # "text" | "chat"
    prompt: str | None  # format of the prompt (text) or of the user message (chat); None: chat data
    response: str | None  # the field holding the response; None: chat data

    def input_fields(self) -> list[str]:
        return [f for f in placeholders(self.prompt)] if self.prompt else []

    def describe(self) -> str:
        if self.kind == "chat":
            via = f"user message {self.prompt!r}, " if self.prompt else ""
            return f"the model's chat template ({via}loss on assistant turns + end of turn)"
        return f"text template {self.prompt + '{' + str(self.response) + '}'!r} + EOS"

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: Mapping) -> "Template":
        return Template(d["kind"], d.get("prompt"), d.get("response"))


@dataclass(frozen=True)
class Encoded:
    ids: tuple[int, ...]
    loss: tuple[bool, ...]  # True where the token is a training target
    where: str = ""

    def __len__(self) -> int:
        return len(self.ids)


def choose_template(table: Table, tokenizer) -> Template:
    """Decide once, from the data's shape and the tokenizer, how examples are rendered."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if table.shape == "messages":
        if not has_chat:
            raise HabitError(f"{table.source}: chat data needs a model with a chat template")
        return Template("chat", None, None)
    if table.text_template:
        return Template("text", table.prompt_format, table.response)
    if has_chat:
        return Template("chat", table.prompt_format, table.response)
    # No chat template: a plain labelled one, the tutorial's "<act>: {act}\n<prompt>: {prompt}".
    fields = placeholders(table.prompt_format or "")
    lines = "".join(f"<{f}>: {{{f}}}\n" for f in fields)
    return Template("text", lines + f"<{table.response}>: ", table.response)


def _format(fmt: str, fields: Mapping[str, str], where: str) -> str:
    try:
        return string.Formatter().vformat(fmt, (), dict(fields))
    except KeyError as e:
        raise HabitError(f"{where}: field {e.args[0]!r} is missing") from None


def _user_message(template: Template, fields: Mapping[str, str], where: str) -> str:
    # strip: alpaca's "{instruction}\n\n{input}" with an empty input must not end in blank lines
    return _format(template.prompt or "", fields, where).strip()


def _chat(tokenizer, messages: Sequence[Message], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        tokenize=False,
        add_generation_prompt=generation_prompt,
    )


def segments(example: Example, template: Template, tokenizer) -> list[tuple[str, bool]]:
    """The example as text pieces, each marked True when it is a response (trained) piece."""
    if template.kind == "text":
        prompt = _format(template.prompt or "", example.fields, example.where)
        return [(prompt, False), (example.fields[template.response], True)]
    messages = list(example.messages) or [
        Message("user", _user_message(template, example.fields, example.where)),
        Message("assistant", example.fields[template.response]),
    ]
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message.role != "assistant":
            continue
        before = _chat(tokenizer, messages[:i], generation_prompt=True)
        after = _chat(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (before.startswith(done) and after.startswith(before)):
            raise HabitError(
                f"{example.where}: the model's chat template does not render turns as a growing "
                "prefix, so assistant tokens cannot be located; use --template instead"
            )
        pieces += [(before[len(done) :], False), (after[len(before) :], True)]
        done = after
    return pieces


def prompt_text(template: Template, tokenizer, fields: Mapping[str, str] | None = None,
                messages: Sequence[Message] | None = None) -> str:
    """The text a model continues at generation time: everything up to the response."""
    if template.kind == "text":
        return _format(template.prompt or "", fields or {}, "input")
    if messages is None:
        messages = [Message("user", _user_message(template, fields or {}, "input"))]
    return _chat(tokenizer, messages, generation_prompt=True)


def example_prompt(example: Example, template: Template, tokenizer) -> str:
    """The prompt text of a held-out example: everything before its (final) answer."""
    if example.messages:
        return prompt_text(template, tokenizer, messages=list(example.messages[:-1]))
    return prompt_text(template, tokenizer, fields=example.fields)


def example_answer(example: Example, template: Template) -> str:
    """The reference answer of an example: its response field or its final assistant turn."""
    return example.messages[-1].content if example.messages else example.fields[template.response]


def prompt_ids(text: str, template: Template, tokenizer) -> list[int]:
    # Chat templates write their own BOS as text; plain text gets the tokenizer's usual specials.
    return tokenizer(text, add_special_tokens=template.kind == "text").input_ids


def encode(example: Example, template: Template, tokenizer, stop: Sequence[int],
           train_on_prompt: bool = False) -> Encoded:
    """Token ids and loss mask for one example; every response ends in a stop token with loss."""
    ids: list[int] = []
    loss: list[bool] = []
    for n, (text, is_response) in enumerate(segments(example, template, tokenizer)):
        if not is_response:
            piece = prompt_ids(text, template, tokenizer) if n == 0 else _plain_ids(text, tokenizer)
            ids += piece
            loss += [train_on_prompt] * len(piece)
            continue
        piece = _plain_ids(text, tokenizer)
        ends = [k for k, t in enumerate(piece) if t in stop]
        if ends:
            # Chat templates put text after the end-of-turn token (ChatML's "\n"); it is never
            # generated (generation stops at the stop token), so it carries no loss.
            cut = ends[-1] + 1
            ids += piece
            loss += [True] * cut + [train_on_prompt] * (len(piece) - cut)
        else:
            eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else stop[0]
            ids += piece + [eos]
            loss += [True] * (len(piece) + 1)
    return Encoded(tuple(ids), tuple(loss), example.where)


def _plain_ids(text: str, tokenizer) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def encode_all(examples: Sequence[Example], template: Template, tokenizer, stop: Sequence[int],
               max_len: int, train_on_prompt: bool = False) -> tuple[list[Encoded], list[tuple[str, int]]]:
    """Encode examples; drop (and return as (where, length)) those longer than max_len."""
    kept, dropped = [], []
    for ex in examples:
        enc = encode(ex, template, tokenizer, stop, train_on_prompt)
        (kept if len(enc) <= max_len else dropped).append(enc)
    return kept, [(e.where, len(e)) for e in dropped]


def pieces(enc: Encoded, tokenizer) -> list[tuple[str, bool]]:
    """An encoded example as decoded runs of text, each marked True when its tokens carry loss
    (preview's ⟦ ⟧ and habit studio's highlighting)."""
    out, run, in_loss = [], [], False
    for token, lossy in zip(enc.ids, enc.loss):
        if lossy != in_loss and run:
            out.append((tokenizer.decode(run), in_loss))
            run = []
        in_loss = lossy
        run.append(token)
    if run:
        out.append((tokenizer.decode(run), in_loss))
    return out


def show(enc: Encoded, tokenizer) -> str:
    """Human view of an encoded example: loss-carrying tokens wrapped in ⟦ ⟧ (used by preview)."""
    return "".join(f"⟦{text}⟧" if lossy else text for text, lossy in pieces(enc, tokenizer))
