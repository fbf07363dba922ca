"""`gptoss-tune serve MODEL_DIR`: the OpenAI-compatible server for a (tuned) model, or the vLLM command."""

from __future__ import annotations

import os
import shlex
import sys

from gptoss_tune.errors import UserError
from gptoss_tune.serve.limits import ServerLimits

NAME = "serve"
API_KEY_ENV = "GPTOSS_TUNE_API_KEY"


def api_key_from(args) -> str | None:
    """--api-key, else $GPTOSS_TUNE_API_KEY; an empty or unusable key is an error (one line), not a
    server that refuses every request."""
    from gptoss_tune.serve.http import check_api_key

    if args.api_key is not None:
        check_api_key(args.api_key, "--api-key")
        return args.api_key
    key = os.environ.get(API_KEY_ENV)
    check_api_key(key, f"${API_KEY_ENV}")
    return key


def add_parser(sub) -> None:
    p = sub.add_parser(
        NAME,
        help="serve a (tuned) model with an OpenAI-compatible chat-completions API",
        description="Serve MODEL_DIR (a gpt-oss checkpoint or merged export, a training run directory, our adapter "
        "directory or a PEFT adapter export) at /v1/chat/completions and /v1/models. Prompts are rendered with "
        "openai-harmony, output is parsed by channel (content, reasoning, tool_calls). --print-vllm-command prints "
        "the equivalent `vllm serve` command for production instead.",
    )
    p.add_argument("model_dir", help="model, run, adapter or export directory (or a hub id in the local cache)")
    p.add_argument("--adapter", default=None, help="a gptoss_tune or PEFT adapter to apply on MODEL_DIR as base")
    p.add_argument("--checkpoint", default="best", help="for a run directory: best (default), last, or a path")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; others need --api-key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}; an empty key is an error)",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests whose Host header is NAME (a reverse proxy's name; repeatable; * for any). "
        "By default only the bound address (and localhost for a loopback bind) is answered, against DNS rebinding",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let web pages from ORIGIN (e.g. https://chat.example.com; repeatable; * for any) call the server "
        "from a browser (CORS). Default: none",
    )
    p.add_argument(
        "--max-concurrency", type=int, default=4, help="requests generating at once; more get 429 (default 4)"
    )
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the directory name)")
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context length limit in tokens (default: what the device's free memory holds for --max-concurrency "
        "requests, at most the model's; printed at start)",
    )
    limits = ServerLimits()
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=limits.max_request_bytes,
        help=f"largest request body, refused (413) before parsing (default {limits.max_request_bytes})",
    )
    p.add_argument(
        "--max-messages",
        type=int,
        default=limits.max_messages,
        help=f"most messages in one request (default {limits.max_messages})",
    )
    p.add_argument(
        "--max-string-chars",
        type=int,
        default=limits.max_string_chars,
        help=f"longest string (a message's content, ...) in a request, in characters (default {limits.max_string_chars})",
    )
    p.add_argument("--device", default=None, help="cuda or cpu (default cuda if available)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument(
        "--print-vllm-command", action="store_true", help="print the `vllm serve` command for MODEL_DIR and exit"
    )
    p.set_defaults(run=run)


def run(args) -> int:
    # The server's modules import torch, transformers, fastapi and uvicorn: only when the command runs.
    from gptoss_tune.devices import check_device
    from gptoss_tune.serve.app import ChatServer
    from gptoss_tune.serve.capacity import estimate_context
    from gptoss_tune.serve.generate import ModelTokenSource
    from gptoss_tune.serve.guard import check_cors_origin
    from gptoss_tune.serve.http import bind_socket, check_allowed_host, check_bind
    from gptoss_tune.serve.loading import load_for_serving
    from gptoss_tune.serve.vllm import vllm_command

    api_key = api_key_from(args)
    if args.print_vllm_command:
        cmd, notes = vllm_command(args.model_dir, args.adapter, args.host, args.port, api_key, args.served_model_name)
        print(shlex.join(cmd))
        for n in notes:
            print(f"# note: {n}", file=sys.stderr)
        return 0
    # Every flag is checked, and the port bound, before the model loads (minutes for 120b).
    check_bind(args.host, api_key)
    if args.max_concurrency < 1:
        raise UserError(f"--max-concurrency must be at least 1, got {args.max_concurrency}")
    if args.max_model_len is not None and args.max_model_len < 1:
        raise UserError(f"--max-model-len must be at least 1, got {args.max_model_len}")
    limits = ServerLimits(args.max_request_bytes, args.max_messages, args.max_string_chars)
    for name in args.allowed_host:
        check_allowed_host(name)
    for origin in args.cors_origin:
        check_cors_origin(origin)
    check_device(args.device)
    sock = bind_socket(args.host, args.port)
    import uvicorn

    server = None
    try:
        adapter = f" with adapter {args.adapter}" if args.adapter else ""
        print(f"loading {args.model_dir}{adapter} ...", file=sys.stderr)
        model, default_name = load_for_serving(args.model_dir, args.adapter, args.checkpoint, args.device)
        estimate = estimate_context(model, args.max_concurrency)
        if args.max_model_len is None:
            max_model_len, how = estimate.tokens, estimate.describe(args.max_concurrency)
            if not estimate.fits:
                print(
                    f"warning: {estimate.free_bytes / 2**30:.1f} GiB free do not hold even {estimate.tokens} tokens "
                    f"of context for {args.max_concurrency} request(s); lower --max-concurrency or free memory",
                    file=sys.stderr,
                )
        else:
            max_model_len, how = args.max_model_len, "--max-model-len"
            if args.max_model_len > estimate.tokens and estimate.limited_by_memory:
                print(
                    f"note: --max-model-len {args.max_model_len} is more than the {estimate.tokens} tokens the free "
                    f"memory is estimated to hold ({estimate.describe(args.max_concurrency)}); long prompts may "
                    "run out of memory",
                    file=sys.stderr,
                )
        server = ChatServer(
            ModelTokenSource(model),
            args.served_model_name or default_name,
            api_key=api_key,
            max_concurrency=args.max_concurrency,
            max_model_len=max_model_len,
            limits=limits,
            host=args.host,
            allowed_hosts=args.allowed_host,
            cors_origins=args.cors_origin,
        )
        server.render_pool.start()  # the prompt-rendering processes, before the first request waits for them
        if args.max_model_len is not None and server.context_length < args.max_model_len:
            how = f"--max-model-len {args.max_model_len}, capped at the model's limit"
        host = f"[{args.host}]" if ":" in args.host else args.host
        key = ", API key required" if api_key else ""
        print(
            f"serving '{server.model_name}' on http://{host}:{sock.getsockname()[1]}/v1 "
            f"(up to {args.max_concurrency} concurrent requests{key})\n"
            f"context: {server.context_length} tokens ({how})\n"
            f"request limits: {limits.max_request_bytes} bytes, {limits.max_messages} messages, strings of "
            f"{limits.max_string_chars} characters (--max-request-bytes, --max-messages, --max-string-chars)",
            file=sys.stderr,
        )
        # On Ctrl-C / SIGTERM, in-flight requests get 10 s to finish, then their streams are cancelled.
        config = uvicorn.Config(server.app, log_level=args.log_level, timeout_graceful_shutdown=10)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        if server is not None:
            server.render_pool.close()
    return 0
