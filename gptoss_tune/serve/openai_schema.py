"""The OpenAI chat-completions request the server accepts, and its error shape.

Every field of the OpenAI request is known here. Fields the server implements are validated (types and
ranges); fields it does not implement are accepted only at their neutral value (n=1, logprobs false,
penalties 0, ...) and anything else is a 400 that names the field, so a client never gets silently
different behaviour. Unknown fields are a 400 too.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    """An error response in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
             404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
             415: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}  # fmt: skip

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, type: str | None = None
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or self.TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __reduce__(self):  # raised in a render worker process and sent back (prompt.RenderPool)
        return (ApiError, (self.status, self.message, self.param, self.code, self.type))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FunctionDef(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None


class ChatCompletionRequest(_Strict):
    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # int64, as OpenAI's
    stop: str | list[str] | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    tools: list[Tool] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # Accepted only at their neutral value (checked in `check_supported`).
    n: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    functions: Any = None
    function_call: Any = None
    verbosity: Any = None
    # Bookkeeping fields that do not change the output.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


_NEUTRAL = {
    "n": (None, 1),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
    "functions": (None, []),
    "function_call": (None,),
    "verbosity": (None,),
}
_WHY = {
    "n": "only n=1 is supported (n > 1 is not); send separate requests",
    "logprobs": "logprobs are not supported",
    "top_logprobs": "top_logprobs are not supported",
    "presence_penalty": "presence_penalty is not supported (only 0)",
    "frequency_penalty": "frequency_penalty is not supported (only 0)",
    "logit_bias": "logit_bias is not supported",
    "functions": "the deprecated 'functions' field is not supported; use 'tools'",
    "function_call": "the deprecated 'function_call' field is not supported; use 'tool_choice'",
}


def parse_request(data: Any) -> ChatCompletionRequest:
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        req = ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = (
            "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err["loc"]).lstrip(".") or None
        )  # tools[0].type
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = f"unknown field '{loc}' (not an OpenAI chat-completions field this server knows)"
        elif err["type"] == "missing":
            msg = f"'{loc}' is required"
        else:
            msg = f"'{loc}': {msg}"
        raise ApiError(400, msg, param=loc) from None
    check_supported(req)
    return req


def check_supported(req: ChatCompletionRequest) -> None:
    for name, ok in _NEUTRAL.items():
        value = getattr(req, name)
        if value not in ok:
            raise ApiError(
                400,
                _WHY.get(name, f"'{name}' is not supported by this server"),
                param=name,
                code="unsupported_parameter",
            )
    if req.tool_choice not in (None, "auto", "none"):
        shown = req.tool_choice if isinstance(req.tool_choice, str) else "a named function"
        raise ApiError(
            400,
            f"tool_choice {shown!r} is not supported; use 'auto' or 'none'",
            param="tool_choice",
            code="unsupported_parameter",
        )
    if req.response_format not in (None, {"type": "text"}):
        raise ApiError(
            400,
            "response_format other than {'type': 'text'} is not supported",
            param="response_format",
            code="unsupported_parameter",
        )
    if req.modalities not in (None, ["text"]):
        raise ApiError(400, "only the 'text' modality is supported", param="modalities", code="unsupported_parameter")
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")
    if (
        req.max_tokens is not None
        and req.max_completion_tokens is not None
        and req.max_tokens != req.max_completion_tokens
    ):
        raise ApiError(400, "max_tokens and max_completion_tokens disagree; send one of them", param="max_tokens")
    stops = req.stop_list
    if len(stops) > 4 or any(not isinstance(s, str) or not s for s in stops):
        raise ApiError(400, "stop must be up to 4 non-empty strings", param="stop")
    if req.tools is not None:
        names = [t.function.name for t in req.tools]
        if len(set(names)) != len(names):
            raise ApiError(400, "tools: function names must be unique", param="tools")
