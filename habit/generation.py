"""Generation: batched (left padding), streamed, with a finish reason per answer.

Prompts come from `render.prompt_text`, the same function training used, so a run answers in the
format it was taught.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Iterator, Mapping, Sequence

from habit import render
from habit.adapters import adapter_off
from habit.data import Message
from habit.errors import HabitError
from habit.render import Template
from habit.settings import GenerationSettings


@dataclass(frozen=True)
class Generation:
    input: str
    text: str
    finish_reason: str  # "stop": the model ended by itself; "length": the token budget ran out
    tokens: int
    prompt: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def fields_for(template: Template, text: str | None, fields: Mapping[str, str] | None = None) -> dict:
    """Turn a user's input (a bare string and/or field=value pairs) into the template's fields."""
    fields = dict(fields or {})
    names = template.input_fields()
    missing = [n for n in names if n not in fields]
    if text is not None:
        if len(missing) != 1:
            if not missing and names:
                raise HabitError(f"input {text!r}: every field is already given with --field")
            need = ", ".join(missing) or "none"
            raise HabitError(f"input {text!r}: the template has several inputs ({need}); "
                             "give them as --field NAME=VALUE")
        fields[missing[0]] = text
        missing = []
    if missing:
        raise HabitError(f"missing input field(s): {', '.join(missing)} (use --field NAME=VALUE)")
    return fields


def build_prompt(template: Template, tokenizer, text: str | None = None,
                 fields: Mapping[str, str] | None = None,
                 messages: Sequence[Message] | None = None) -> str:
    if template.prompt is None:  # chat data: the input is the user's message
        messages = messages or [Message("user", text or "")]
        return render.prompt_text(template, tokenizer, messages=messages)
    if messages is not None:
        return render.prompt_text(template, tokenizer, messages=messages)
    return render.prompt_text(template, tokenizer, fields=fields_for(template, text, fields))


def sampling(settings: GenerationSettings) -> dict:
    penalty = {"repetition_penalty": settings.repetition_penalty} if settings.repetition_penalty != 1 else {}
    if settings.temperature == 0:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None, **penalty}
    return {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p,
            "top_k": None, **penalty}


def generate(model, tokenizer, template: Template, prompts: Sequence[str], stop: Sequence[int],
             settings: GenerationSettings = GenerationSettings(), inputs: Sequence[str] | None = None,
             batch_size: int = 16, extra: Mapping | None = None) -> list[Generation]:
    """Complete each prompt text; batches of `batch_size` share one padded forward pass.
    `extra`: more keyword arguments for transformers' generate (the benchmark's cache and compile)."""
    import torch

    results: list[Generation] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # new tokens must follow each prompt directly
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            enc = [render.prompt_ids(p, template, tokenizer) for p in chunk]
            width = max(len(e) for e in enc)
            pad = tokenizer.pad_token_id
            ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc])
            mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                    max_new_tokens=settings.max_new_tokens, eos_token_id=list(stop),
                    pad_token_id=pad, **sampling(settings), **(extra or {}))
            for i, row in enumerate(out[:, width:].tolist()):
                ended = next((k for k, t in enumerate(row) if t in stop), None)
                new = row[:ended] if ended is not None else row
                text = tokenizer.decode(new, skip_special_tokens=True)
                label = inputs[start + i] if inputs else chunk[i]
                results.append(Generation(label, text, "stop" if ended is not None else "length",
                                          len(new) + (ended is not None), chunk[i]))
    finally:
        tokenizer.padding_side = side
    return results


def stream(model, tokenizer, template: Template, prompt: str, stop: Sequence[int],
           settings: GenerationSettings = GenerationSettings()) -> Iterator[str]:
    """Yield the answer's text as it is produced; the last item is a dict with finish_reason."""
    import torch
    from transformers import TextIteratorStreamer

    ids = torch.tensor([render.prompt_ids(prompt, template, tokenizer)]).to(model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    holder: dict = {}

    def work() -> None:
        try:
            with torch.no_grad():
                holder["out"] = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                    max_new_tokens=settings.max_new_tokens, eos_token_id=list(stop),
                    pad_token_id=tokenizer.pad_token_id, **sampling(settings))
        except BaseException as e:  # re-raised in the caller's thread below
            holder["error"] = e
        finally:
            streamer.end()  # without this a failed generate would leave the reader waiting forever

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if "error" in holder:
        raise holder["error"]
    new = holder["out"][0, ids.shape[1] :].tolist()
    ended = next((k for k, t in enumerate(new) if t in stop), None)
    yield {"finish_reason": "stop" if ended is not None else "length",
           "tokens": len(new) if ended is None else ended + 1}


def answer(run, inputs: Sequence[str], settings: GenerationSettings = GenerationSettings(),
           fields: Mapping[str, str] | None = None, base: bool = False) -> list[Generation]:
    """Generate for each input with a loaded run (`adapters.load_run`); base=True turns the
    adapter off, so base and tuned answers come from one model load."""
    prompts = [build_prompt(run.template, run.tokenizer, text, fields) for text in inputs]
    with adapter_off(run.model, base):
        return generate(run.model, run.tokenizer, run.template, prompts, run.stop, settings,
                        inputs=list(inputs))


def compare(run, inputs: Sequence[str], settings: GenerationSettings = GenerationSettings(),
            fields: Mapping[str, str] | None = None) -> list[dict]:
    """Base and tuned answers side by side: [{"input", "base": Generation, "tuned": Generation}]."""
    base = answer(run, inputs, settings, fields, base=True)
    tuned = answer(run, inputs, settings, fields)
    return [{"input": b.input, "base": b, "tuned": t} for b, t in zip(base, tuned)]
