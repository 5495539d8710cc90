"""The OpenAI request schemas `habit serve` takes, as pydantic models.

Strict (a string is not a boolean) and closed: a field that is not here gets a 400 naming it,
and a field that is here but asks for something habit cannot do (n > 1, tools, penalties...)
gets a 400 too, so no request is answered as if it had been honoured.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from habit.engine import ApiError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: Optional[bool] = None


class _Common(_Strict):
    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: Optional[int] = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    user: Optional[str] = None  # an end-user id for the caller's logs: nothing to honour
    # not OpenAI's, but vLLM and llama.cpp servers take it too
    repetition_penalty: Optional[float] = None
    # accepted only where they ask for nothing (0, empty): see UNHONOURED
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, Any]] = None


class ChatRequest(_Common):
    messages: list[Any]
    max_completion_tokens: Optional[int] = None
    fields: Optional[dict[str, str]] = None  # habit's: a text-template run's input fields
    render_as: Optional[str] = None  # habit's: which run's template "base" renders with
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[Any]] = None
    tool_choice: Any = None
    parallel_tool_calls: Optional[bool] = None


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    response_format: Optional[dict[str, Any]] = None  # vLLM's and llama.cpp's servers take it here too
    max_completion_tokens: None = None
    echo: Optional[bool] = None
    logprobs: Optional[int] = None
    suffix: Optional[str] = None
    best_of: Optional[int] = None


# field -> the values habit can honour (a field absent or null is always fine)
UNHONOURED = {"n": (1,), "best_of": (1,), "presence_penalty": (0,), "frequency_penalty": (0,),
              "logit_bias": ({},), "tools": ([],), "tool_choice": ("none",), "suffix": ("",),
              "parallel_tool_calls": (False, True)}


def validate(model: type[_Common], body: dict) -> _Common:
    """The body as `model`, or an ApiError(400) naming the first field that is wrong."""
    try:
        r = model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        param = str(first["loc"][0]) if first["loc"] else None
        if first["type"] == "missing":
            raise ApiError(400, f"'{param}' is required", param, "missing_required_parameter") from None
        if first["type"] == "extra_forbidden":
            raise ApiError(400, f"'{param}' is not a field habit serve knows (or honours)", param,
                           "unsupported_parameter") from None
        raise ApiError(400, f"'{param}': {first['msg']}", param,
                       "invalid_type") from None
    for name, fine in UNHONOURED.items():
        value = getattr(r, name, None)
        if value is not None and value not in fine:
            raise ApiError(400, f"'{name}': {value!r} is not supported by habit serve", name,
                           "unsupported_parameter")
    return r
