"""A chat-completions request -> harmony prompt tokens, with the renderer training uses, in worker processes.

openai-harmony's renderer holds the GIL while it tokenizes (a 16,000-character CJK string: 2.8 s during
which no other thread of the process ran; its time grows with the square of an unpunctuated string's
length), so rendering in a thread would still stall the server's event loop and /health. `RenderPool`
renders in spawned worker processes instead (started on first use; each about 85 MB).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from openai_harmony import RenderConversationConfig, Role

from gptoss_tune.data.harmony import to_harmony_conversation
from gptoss_tune.data.tokenizer import harmony_encoding
from gptoss_tune.errors import UserError
from gptoss_tune.serve.openai_schema import ApiError, ChatCompletionRequest


def _echoed(messages: list) -> list:
    """Accept our own response messages sent back as history: they carry the chain of thought twice
    (`reasoning` and `reasoning_content`, as clients of vLLM expect); keep one when both agree."""
    out = []
    for m in messages:
        if (
            isinstance(m, dict)
            and m.get("role") == "assistant"
            and m.get("reasoning") is not None
            and m.get("reasoning") == m.get("reasoning_content")
        ):
            m = {k: v for k, v in m.items() if k != "reasoning_content"}
        out.append(m)
    return out


def tools_offered(req: ChatCompletionRequest) -> bool:
    """Whether the model is shown the request's tools (tool_choice 'none' hides them, so it cannot call them)."""
    return bool(req.tools) and req.tool_choice != "none"


def render_prompt(req: ChatCompletionRequest) -> list[int]:
    """The request's messages as harmony prompt tokens (gptoss_tune.data.harmony, the renderer training
    uses), ending with `<|start|>assistant`."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if tools_offered(req) else None
    try:
        conv = to_harmony_conversation(_echoed(req.messages), tools=tools, reasoning_effort=req.reasoning_effort)
    except UserError as e:
        raise ApiError(400, str(e), param="messages") from None
    # The converter already applied harmony's analysis-dropping rule; keep the renderer from redoing it.
    config = RenderConversationConfig(auto_drop_analysis=False)
    return list(harmony_encoding().render_conversation_for_completion(conv, Role.ASSISTANT, config))


log = logging.getLogger(__name__)
RENDER_WORKERS = 2  # renders are milliseconds unless a request is huge; two keep one slow render from queueing all


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:  # reparented: the server died without shutting the pool down (SIGKILL)
        time.sleep(1.0)
    os._exit(0)


def _worker_init(parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the server, which then stops its workers
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    harmony_encoding()  # load the vocabulary once per worker, before the first request waits for it


def _render_in_worker(req: ChatCompletionRequest) -> list[int]:
    try:
        return render_prompt(req)
    except ApiError:
        raise
    except BaseException as e:
        if type(e).__name__ == "PanicException":  # a panic inside openai-harmony's Rust code, on this input
            raise ApiError(
                400, f"openai-harmony cannot render these messages ({str(e)[:200]})", param="messages"
            ) from None
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise RuntimeError(f"rendering failed: {type(e).__name__}: {str(e)[:500]}") from None  # picklable


class RenderPool:
    """Worker processes that render requests; a pool whose worker died (killed, out of memory) is replaced."""

    def __init__(self, workers: int = RENDER_WORKERS):
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _get(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    self.workers,
                    mp_context=multiprocessing.get_context("spawn"),  # not fork: the server has threads
                    initializer=_worker_init,
                    initargs=(os.getpid(),),
                )
            return self._pool

    def start(self) -> None:
        """Starts the workers now rather than on the first request (the command does, before it listens)."""
        pool = self._get()
        for f in [pool.submit(int, 0) for _ in range(self.workers)]:
            f.result()

    async def render(self, req: ChatCompletionRequest) -> list[int]:
        pool = self._get()
        try:
            return await asyncio.wrap_future(pool.submit(_render_in_worker, req))
        except BrokenProcessPool:
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            log.error("a prompt-rendering worker process died; starting new ones")
            raise RuntimeError("a prompt-rendering worker process died") from None

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


_shared: RenderPool | None = None
_shared_lock = threading.Lock()


def shared_render_pool() -> RenderPool:
    """One pool per process, shared by its servers (tests start many)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = RenderPool()
        return _shared
