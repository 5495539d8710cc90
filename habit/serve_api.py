"""The OpenAI schemas `habit serve` speaks, as pydantic models: requests in, responses out.

Requests are strict (a string is not a boolean) and closed: a field that is not here gets a 400
naming it, and a field that is here but asks for something habit cannot do (n > 1, tools,
penalties...) gets a 400 too, so no request is answered as if it had been honoured.

Responses are built as these models too, closed (a misspelt field is an error here, not a
surprise in a client), with every field OpenAI sends as null written as null; only a stream
chunk's delta leaves out what it does not carry, as OpenAI's does.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError, model_serializer

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


class LoadAdapterRequest(_Strict):  # vLLM's POST /v1/load_lora_adapter
    lora_name: str
    lora_path: str


class UnloadAdapterRequest(_Strict):  # vLLM's POST /v1/unload_lora_adapter
    lora_name: str


# field -> the values habit can honour (a field absent or null is always fine)
UNHONOURED = {"n": (1,), "best_of": (1,), "presence_penalty": (0,), "frequency_penalty": (0,),
              "logit_bias": ({},), "tools": ([],), "tool_choice": ("none",), "suffix": ("",),
              "parallel_tool_calls": (False, True)}


def validate(model: type[_Strict], body: dict) -> _Strict:
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


# ---------------------------------------------------------------- responses


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def json_bytes(self) -> bytes:
        return self.model_dump_json().encode()


Finish = Optional[Literal["stop", "length"]]


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: Optional[list[int]]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Out):
    content: Optional[list[TokenLogprob]]


class AssistantMessage(_Out):
    role: Literal["assistant"] = "assistant"
    content: Optional[str]


class ChatChoice(_Out):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs]
    finish_reason: Finish


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(_Out):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None

    @model_serializer(mode="wrap")
    def _present(self, handler):  # the last chunk's delta is {}
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(_Out):
    index: int
    delta: Delta
    logprobs: Optional[ChatLogprobs]
    finish_reason: Finish


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Optional[Usage] = None


class CompletionLogprobs(_Out):
    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs]
    finish_reason: Finish


class Completion(_Out):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class ModelCard(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "habit"
    root: Optional[str]  # vLLM's: where the weights are (the base's source, or the run directory)
    parent: Optional[str]  # vLLM's: the model an adapter applies to ("base"); None for the base
    path: str  # habit's: the run directory ("" for the base)
    template: str  # habit's: how chat requests are rendered (chat | text)
    input_fields: list[str]  # habit's: a text template's fields


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(_Out):
    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class ErrorResponse(_Out):
    error: ErrorBody
    # habit studio's data errors also list the file's columns, for the page to offer them
    columns: Optional[list[str]] = None

    def json_bytes(self) -> bytes:  # OpenAI's error shape unless there are columns to list
        return self.model_dump_json(exclude={"columns"} if self.columns is None else None).encode()
