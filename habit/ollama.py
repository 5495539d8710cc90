"""The Ollama Modelfile: FROM the GGUF, a TEMPLATE that renders prompts as the run did, stops.

A text-template run has one input: TEMPLATE wraps `{{ .Prompt }}` in the run's prompt format.

A chat run gets a Go template over `.System` and `.Messages`, built by rendering the model's own
chat template on marker messages and cutting at the markers: the text before the first user
message (with and without a system prompt), after each user message (the generation prompt) and
after each assistant message (end of turn + the next user turn's start). The pieces are checked by
rebuilding longer conversations from them; a template they do not rebuild (content-dependent
logic) falls back to the single-prompt form, said in a comment. Gemma's "system text inside the
first user turn" and SmolLM2's default system turn both come out of the cuts unchanged.

What Go's text/template cannot do is left out and said here: chat templates that `trim` message
content (Gemma's) see the content untrimmed in Ollama.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

from habit import models
from habit.data import Message
from habit.errors import HabitError
from habit.render import Template, _user_message, prompt_text

_MARKER = "\x00habit-prompt\x00"
# distinct plain words: a template may trim or test content, never expects NULs there
_S, _U1, _A1, _U2, _A2, _U3 = (f"HABITMARK{w}" for w in ("SYS", "USERA", "ASSTA", "USERB", "ASSTB", "USERC"))


@dataclass(frozen=True)
class ChatPieces:
    """The fixed text a chat template puts around messages (see the module docstring)."""
    head: str  # before the first user message, no system prompt
    system_before: str | None  # before the system prompt; None: the template has no system role
    system_after: str  # between the system prompt and the first user message
    after_user: str  # after each user message: its end + the assistant's start
    after_assistant: str  # after each assistant message: its end + the next user's start
    user_before: str = ""  # the run's user-message format around each user message
    user_after: str = ""


def modelfile(template: Template, tokenizer, gguf_name: str, stop: Sequence[int] | None = None) -> str:
    """An Ollama Modelfile whose TEMPLATE renders prompts exactly as the run's were rendered."""
    notes: list[str] = []
    pieces = chat_pieces(template, tokenizer) if template.kind == "chat" else None
    if template.kind == "chat" and pieces is None:
        notes.append("# the chat template's turns are not fixed text around each message: "
                     "this TEMPLATE renders a single prompt, no history or system prompt")
    if pieces is not None:
        go = go_template(pieces)
        if pieces.system_before is None:
            notes.append("# the chat template has no system role: a system prompt is not shown to the model")
    else:
        go = _single_prompt(template, tokenizer)
    if '"""' in go:
        raise HabitError('--ollama: the prompt template contains """, which a Modelfile cannot quote')
    stop_ids = list(models.stop_ids(tokenizer) if stop is None else stop)
    stops = tokenizer.convert_ids_to_tokens(stop_ids)
    if pieces is not None:
        stops += [t for t in end_of_turn(pieces, tokenizer) if t not in stops]
    lines = [f"FROM ./{gguf_name}", *notes, f'TEMPLATE """{go}"""']
    lines += [f"PARAMETER stop {json.dumps(t)}" for t in stops]
    lines.append("PARAMETER temperature 0")  # greedy, as habit generates by default
    return "\n".join(lines) + "\n"


def _single_prompt(template: Template, tokenizer) -> str:
    """`{{ .Prompt }}` in the run's rendered prompt, cut at a marker input."""
    fields = template.input_fields()
    if len(fields) == 1:
        text = prompt_text(template, tokenizer, {fields[0]: _MARKER})
    elif template.kind == "chat":  # chat data, or several fields: the user message is the prompt
        text = prompt_text(template, tokenizer, messages=[Message("user", _MARKER)])
    else:
        raise HabitError(f"--ollama: Ollama's one {{{{ .Prompt }}}} can stand for one input field; "
                         f"this run's template has {len(fields)} ({', '.join(fields)})")
    if text.count(_MARKER) != 1:
        raise HabitError("--ollama: the run's template does not place the input exactly once")
    before, after = text.split(_MARKER)
    return _go_literal(_drop_bos(before, tokenizer)) + "{{ .Prompt }}" + _go_literal(after)


def _chat(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                         tokenize=False, add_generation_prompt=True)


def _cut(text: str, *markers: str) -> list[str] | None:
    """text split at each marker in turn; None when one is missing or out of order."""
    parts = []
    for m in markers:
        if text.count(m) != 1:
            return None
        before, text = text.split(m)
        parts.append(before)
    return parts + [text]


def chat_pieces(template: Template, tokenizer) -> ChatPieces | None:
    """The fixed text around messages in the model's chat template, or None where it is not fixed."""
    user_before = user_after = ""
    if len(template.input_fields()) == 1:  # each user message is the run's one-field format
        wrapped = _user_message(template, {template.input_fields()[0]: _U1}, "the template")
        if wrapped.count(_U1) != 1:
            return None
        user_before, user_after = wrapped.split(_U1)
    try:
        one = _cut(_chat(tokenizer, [("user", _U1)]), _U1)
        three = _cut(_chat(tokenizer, [("user", _U1), ("assistant", _A1), ("user", _U2)]), _U1, _A1, _U2)
    except Exception:  # jinja raises what the template raises
        return None
    if one is None or three is None:
        return None
    head, after_user = one
    after_assistant = three[2]
    system_before, system_after = None, ""
    try:
        sys = _cut(_chat(tokenizer, [("system", _S), ("user", _U1)]), _S, _U1)
    except Exception:  # "Only user and assistant roles are supported" (Mistral v0.1)
        sys = None
    if sys is not None and sys[2] == after_user:
        system_before, system_after = sys[0], sys[1]
    # llama.cpp (and so Ollama) puts BOS in front when the GGUF says the tokenizer adds it; the
    # same BOS written by the template would come twice, so the pieces leave it out
    bos = tokenizer.bos_token if adds_bos(tokenizer) else ""
    if not (bos and head.startswith(bos) and (system_before or bos).startswith(bos)):
        bos = ""
    pieces = ChatPieces(head[len(bos):], None if system_before is None else system_before[len(bos):],
                        system_after, after_user, after_assistant, user_before, user_after)
    # the cuts must rebuild longer conversations, with and without a system prompt
    turns = [("user", _U1), ("assistant", _A1), ("user", _U2), ("assistant", _A2), ("user", _U3)]
    checks = [(None, turns)] + ([(_S, turns)] if system_before is not None else [])
    for system, msgs in checks:
        try:
            want = _chat(tokenizer, ([("system", system)] if system else []) + msgs)
        except Exception:
            return None
        if render_pieces(pieces, system, msgs, bos=bos, wrap=False) != want:
            return None
    return pieces


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front by itself (llama.cpp does the same when told)."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a").input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    return bos is not None and bool(ids) and ids[0] == bos and (not plain or plain[0] != bos)


def _drop_bos(text: str, tokenizer) -> str:
    bos = tokenizer.bos_token
    return text[len(bos):] if bos and adds_bos(tokenizer) and text.startswith(bos) else text


def render_pieces(pieces: ChatPieces, system: str | None, messages, bos: str = "", wrap: bool = True) -> str:
    """The text the Go template renders (what `go_template` encodes), in Python: for checks."""
    out = [bos]
    if system and pieces.system_before is not None:
        out += [pieces.system_before, system, pieces.system_after]
    else:
        out.append(pieces.head)
    for role, content in messages:
        if role == "user":
            out += [pieces.user_before if wrap else "", content, pieces.user_after if wrap else "",
                    pieces.after_user]
        elif role == "assistant":
            out += [content, pieces.after_assistant]
    return "".join(out)


def go_template(p: ChatPieces) -> str:
    """Ollama's Go template over .System and .Messages (system messages arrive as .System)."""
    lit = _go_literal
    start = lit(p.head) if p.system_before is None else (
        f"{{{{ if .System }}}}{lit(p.system_before)}{{{{ .System }}}}{lit(p.system_after)}"
        f"{{{{ else }}}}{lit(p.head)}{{{{ end }}}}")
    return (start + '{{ range .Messages }}{{ if eq .Role "user" }}'
            f"{lit(p.user_before)}{{{{ .Content }}}}{lit(p.user_after)}{lit(p.after_user)}"
            f'{{{{ else if eq .Role "assistant" }}}}{{{{ .Content }}}}{lit(p.after_assistant)}'
            "{{ end }}{{ end }}")


def end_of_turn(pieces: ChatPieces, tokenizer) -> list[str]:
    """The special token that closes an assistant turn in the template (<|im_end|>, <end_of_turn>)."""
    ids = tokenizer(pieces.after_assistant, add_special_tokens=False).input_ids
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return tokenizer.convert_ids_to_tokens(ids[:1]) if ids and ids[0] in special else []


def _go_literal(text: str) -> str:
    # Only "{{" opens an action in Go's text/template; print it through a string constant.
    return text.replace("{{", '{{ "{{" }}')
