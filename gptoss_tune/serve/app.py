"""`gptoss-tune serve`: an OpenAI-compatible chat-completions server for a (tuned) gpt-oss model.

FastAPI on uvicorn. Requests are rendered with openai-harmony (`gptoss_tune.data.harmony`), generated
with a KV cache on the MXFP4-resident model (generate.py) and parsed back by channel
(harmony_output.py): `content`, `reasoning` / `reasoning_content`, `tool_calls`.

Routes: GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions (stream or not), GET /health.
Errors are always `{"error": {"message", "type", "param", "code"}}`, never a traceback.

Before a request costs anything (limits.py, guard.py): the Host header and CORS (every route), the API
key, `Content-Type: application/json`, the body's size (before parsing), then the parsed body's nesting,
strings and message count (in a worker thread). A request slot is taken next, and the prompt rendered
and tokenized in a worker process (prompt.RenderPool: openai-harmony holds the GIL while it works), so
the event loop (and /health) never waits for a big prompt; a prompt longer than the context is refused
with 400 before any model work.

Concurrency: up to --max-concurrency requests generate at once (each a token at a time in a worker
thread); one more is refused with 429 at once rather than queued, so clients see back-pressure. A
request's slot is freed when it finishes, fails, or its client goes away (checked between tokens).

This server is for trying a tune, demos, tests and light use. It decodes one sequence per request
without batching; for throughput serve the export with vLLM (`--print-vllm-command`, docs/serving.md).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request  # module level: FastAPI resolves the handlers' string annotations here
from starlette.responses import StreamingResponse

from gptoss_tune.errors import UserError
from gptoss_tune.model.config import CALL_ID
from gptoss_tune.serve.generate import STOP_TOKENS, SamplingParams
from gptoss_tune.serve.guard import RequestGuard
from gptoss_tune.serve.harmony_output import HarmonyOutputParser
from gptoss_tune.serve.http import check_api_key
from gptoss_tune.serve.limits import ServerLimits, check_declared_size, parse_body, read_body
from gptoss_tune.serve.openai_schema import ApiError, ChatCompletionRequest, parse_request
from gptoss_tune.serve.prompt import RenderPool, shared_render_pool, tools_offered

log = logging.getLogger(__name__)


class _Slots:
    """The concurrency limit: acquire() fails at once when full (the caller answers 429)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.active = 0

    def acquire(self) -> "_Slot":
        if self.active >= self.limit:
            raise ApiError(
                429,
                f"the server is busy: {self.limit} request(s) are already generating (--max-concurrency {self.limit}); retry shortly",
                code="rate_limit_exceeded",
            )
        self.active += 1
        return _Slot(self)


class _Slot:
    def __init__(self, slots: _Slots):
        self._slots = slots
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._slots.active -= 1


class ChatServer:
    """The app around a token source (`ModelTokenSource` for a model, `ScriptedTokenSource` in tests).

    `app` is the ASGI app to run (the FastAPI app inside RequestGuard); `host` is the address it is bound
    to, which Host headers must name unless listed in `allowed_hosts`; `cors_origins` are the web origins
    whose pages may call it (none by default)."""

    def __init__(
        self,
        source,
        model_name: str,
        api_key: str | None = None,
        max_concurrency: int = 4,
        max_model_len: int | None = None,
        limits: ServerLimits | None = None,
        host: str = "127.0.0.1",
        allowed_hosts: tuple[str, ...] | list[str] = (),
        cors_origins: tuple[str, ...] | list[str] = (),
        render_pool: RenderPool | None = None,
    ):
        if max_concurrency < 1:
            raise UserError(f"--max-concurrency must be at least 1, got {max_concurrency}")
        check_api_key(api_key)
        self.source = source
        self.model_name = model_name
        self.api_key = api_key
        self.limits = limits or ServerLimits()
        self.render_pool = render_pool or shared_render_pool()
        self.slots = _Slots(max_concurrency)
        ctx = int(getattr(source, "context_length", 131072))
        self.context_length = min(ctx, max_model_len) if max_model_len else ctx
        self.created = int(time.time())
        self.pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="gptoss-generate")
        self.fastapi = self._build_app()
        self.app = RequestGuard(self.fastapi, host, allowed_hosts, cors_origins)

    # ---- app --------------------------------------------------------------------------------------
    def _build_app(self):
        from fastapi import FastAPI
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse
        from starlette.exceptions import HTTPException

        app = FastAPI(title="gptoss-tune", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(ApiError)
        async def _api_error(_request, exc: ApiError):
            headers = {"retry-after": "1"} if exc.status == 429 else None
            return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

        @app.exception_handler(HTTPException)
        async def _http_error(_request, exc: HTTPException):
            msg = {404: "no such route; this server serves /v1/models and /v1/chat/completions"}.get(
                exc.status_code, str(exc.detail)
            )
            return JSONResponse(ApiError(exc.status_code, msg).body(), status_code=exc.status_code)

        @app.exception_handler(RequestValidationError)
        async def _validation(_request, exc: RequestValidationError):
            return JSONResponse(ApiError(400, "invalid request").body(), status_code=400)

        @app.exception_handler(Exception)
        async def _internal(_request, exc: Exception):  # last resort; the routes convert their own (below)
            log.exception("internal error while serving a request")
            return JSONResponse(ApiError(500, "internal server error (see the server log)").body(), status_code=500)

        def internal_errors(handler):
            """A bug in a handler becomes ApiError(500), answered like any other error. Left to the
            `Exception` handler above it would also be re-raised to uvicorn, which then closes the
            connection under the client's next request (seen: the openai client's following request
            failed with APIConnectionError)."""

            @functools.wraps(handler)
            async def guarded(*args, **kwargs):
                try:
                    return await handler(*args, **kwargs)
                except (ApiError, HTTPException):
                    raise
                except Exception:
                    log.exception("internal error while serving a request")
                    raise ApiError(500, "internal server error (see the server log)") from None

            return guarded

        @app.get("/health")
        async def health():
            return {"status": "ok", "active_requests": self.slots.active}

        @app.get("/v1/models")
        @internal_errors
        async def models(request: Request):
            self._auth(request)
            return {"object": "list", "data": [self._model_card()]}

        @app.get("/v1/models/{model_id:path}")
        @internal_errors
        async def model(model_id: str, request: Request):
            self._auth(request)
            self._check_model(model_id, param=None)
            return self._model_card()

        @app.post("/v1/chat/completions")
        @internal_errors
        async def chat(request: Request):
            self._auth(request)
            _check_json_content_type(request.headers.get("content-type"))
            check_declared_size(request.headers.get("content-length"), self.limits.max_request_bytes)
            raw = await read_body(request.stream(), self.limits.max_request_bytes)
            req = await run_in_threadpool(lambda: parse_request(parse_body(raw, self.limits)))
            self._check_model(req.model)
            slot = self.slots.acquire()
            handed_over = False
            try:
                prompt = await self.render_pool.render(req)
                params = self._sampling(req, len(prompt))
                if req.stream:
                    include_usage = bool(req.stream_options and req.stream_options.include_usage)
                    response = _SlotStreamingResponse(
                        self._stream(req, prompt, params, include_usage), slot, media_type="text/event-stream"
                    )
                    handed_over = True  # the response frees the slot when it ends
                    return response
                return await self._complete(req, prompt, params, request)
            finally:
                if not handed_over:
                    slot.release()

        return app

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "gptoss-tune"}

    def _auth(self, request) -> None:
        if self.api_key is None:
            return

        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "incorrect API key", code="invalid_api_key")

    def _check_model(self, name: str, param: str | None = "model") -> None:
        if name != self.model_name:
            raise ApiError(
                404,
                f"the model '{name}' does not exist; this server serves '{self.model_name}'",
                param=param,
                code="model_not_found",
            )

    def _sampling(self, req: ChatCompletionRequest, prompt_len: int) -> SamplingParams:
        ctx = self.context_length
        room = ctx - prompt_len
        if room <= 0:
            raise ApiError(
                400,
                f"this model's maximum context length is {ctx} tokens; your messages are {prompt_len} tokens. Shorten them.",
                param="messages",
                code="context_length_exceeded",
            )
        want = req.max_new_tokens
        if want is not None and want > room:
            raise ApiError(
                400,
                f"this model's maximum context length is {ctx} tokens; you requested {prompt_len + want} tokens "
                f"({prompt_len} in the messages, {want} for the completion). Reduce the messages or max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return SamplingParams(
            max_tokens=want if want is not None else room,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed,
            stop_token_ids=STOP_TOKENS,
        )

    # ---- generation -------------------------------------------------------------------------------
    async def _generate(self, prompt, params, parser: HarmonyOutputParser, disconnected=None):
        """Yields parser events as tokens arrive; records why generation ended in parser.gen_finish."""
        loop = asyncio.get_running_loop()
        gen = await loop.run_in_executor(self.pool, self.source.start, prompt, params)
        n = 0
        while True:
            tok = await loop.run_in_executor(self.pool, gen.next_token)
            if tok is None:
                break
            n += 1
            for ev in parser.feed(tok):
                yield ev
            if parser.done or gen.finish_reason is not None:
                break
            if disconnected is not None and n % 8 == 0 and await disconnected():
                log.info("client went away; stopping generation after %d tokens", n)
                parser.gen_finish = "disconnected"
                return
        for ev in parser.finish():
            yield ev
        parser.gen_finish = gen.finish_reason

    @staticmethod
    def _finish_reason(parser: HarmonyOutputParser) -> str:
        if parser.done:
            return "stop"  # a user stop string, or the model left the assistant's turn
        if parser.gen_finish == "length":
            return "length"
        if parser.tool_calls and parser.tokens and parser.tokens[-1] == CALL_ID:
            return "tool_calls"
        return "stop"

    def _usage(self, prompt, parser) -> dict:
        return {
            "prompt_tokens": len(prompt),
            "completion_tokens": len(parser.tokens),
            "total_tokens": len(prompt) + len(parser.tokens),
        }

    async def _complete(self, req, prompt, params, request) -> dict:
        parser = HarmonyOutputParser(stop=req.stop_list, functions=tools_offered(req))
        async for _ in self._generate(prompt, params, parser, disconnected=request.is_disconnected):
            pass
        finish = self._finish_reason(parser)
        content = "".join(parser.content)
        reasoning = "".join(parser.reasoning) or None
        message: dict = {"role": "assistant", "content": content if (content or not parser.tool_calls) else None}
        message["reasoning"] = reasoning
        message["reasoning_content"] = reasoning
        if parser.tool_calls:
            message["tool_calls"] = [
                {"id": tc.id, "type": "function", "function": {"name": tc.name, "arguments": tc.arguments}}
                for tc in parser.tool_calls
            ]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": self._usage(prompt, parser),
            "system_fingerprint": None,
        }

    async def _stream(self, req, prompt, params, include_usage: bool):
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        def chunk(delta: dict, finish: str | None = None, usage: dict | None = None, choices: bool = True) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if choices else []}  # fmt: skip
            if include_usage:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        parser = HarmonyOutputParser(stop=req.stop_list, functions=tools_offered(req))
        yield chunk({"role": "assistant", "content": ""})
        try:
            async for ev in self._generate(prompt, params, parser):
                if ev.kind == "content":
                    yield chunk({"content": ev.text})
                elif ev.kind == "reasoning":
                    yield chunk({"reasoning": ev.text, "reasoning_content": ev.text})
                elif ev.kind == "tool_call":
                    yield chunk({"tool_calls": [{"index": ev.index, "id": ev.id, "type": "function",
                                                 "function": {"name": ev.name, "arguments": ""}}]})  # fmt: skip
                elif ev.kind == "tool_args":
                    yield chunk({"tool_calls": [{"index": ev.index, "function": {"arguments": ev.text}}]})
        except Exception:
            log.exception("generation failed mid-stream")
            yield f"data: {json.dumps(ApiError(500, 'internal server error during generation (see the server log)').body())}\n\n"
            yield "data: [DONE]\n\n"
            return
        yield chunk({}, finish=self._finish_reason(parser))
        if include_usage:
            yield chunk({}, usage=self._usage(prompt, parser), choices=False)
        yield "data: [DONE]\n\n"


def _check_json_content_type(value: str | None) -> None:
    media = (value or "").split(";")[0].strip().lower()
    if media != "application/json":
        got = f"'{value[:100]}'" if value else "none"
        raise ApiError(
            415,
            f"the request body must be sent with 'Content-Type: application/json' (got {got})",
            code="unsupported_media_type",
        )


class _SlotStreamingResponse(StreamingResponse):
    """Frees the request's slot however the response ends, and closes the event generator (which stops
    generation) when the client goes away mid-stream; Starlette itself leaves a cancelled generator open."""

    def __init__(self, content, slot: _Slot, **kwargs):
        super().__init__(content, **kwargs)
        self._gen = content
        self._slot = slot

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._gen.aclose()
            finally:
                self._slot.release()
