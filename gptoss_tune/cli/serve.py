"""`gptoss-tune serve MODEL_DIR`: the OpenAI-compatible server for a (tuned) model, or the vLLM command."""

from __future__ import annotations

import os
import shlex
import sys

from gptoss_tune.errors import UserError

NAME = "serve"


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
        default=os.environ.get("GPTOSS_TUNE_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $GPTOSS_TUNE_API_KEY)",
    )
    p.add_argument(
        "--max-concurrency", type=int, default=4, help="requests generating at once; more get 429 (default 4)"
    )
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the directory name)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length limit (default: the model's)")
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
    from gptoss_tune.serve.generate import ModelTokenSource
    from gptoss_tune.serve.http import bind_socket, check_bind
    from gptoss_tune.serve.loading import load_for_serving
    from gptoss_tune.serve.vllm import vllm_command

    if args.print_vllm_command:
        cmd, notes = vllm_command(
            args.model_dir, args.adapter, args.host, args.port, args.api_key, args.served_model_name
        )
        print(shlex.join(cmd))
        for n in notes:
            print(f"# note: {n}", file=sys.stderr)
        return 0
    # Every flag is checked, and the port bound, before the model loads (minutes for 120b).
    check_bind(args.host, args.api_key)
    if args.max_concurrency < 1:
        raise UserError(f"--max-concurrency must be at least 1, got {args.max_concurrency}")
    if args.max_model_len is not None and args.max_model_len < 1:
        raise UserError(f"--max-model-len must be at least 1, got {args.max_model_len}")
    check_device(args.device)
    sock = bind_socket(args.host, args.port)
    import uvicorn

    try:
        adapter = f" with adapter {args.adapter}" if args.adapter else ""
        print(f"loading {args.model_dir}{adapter} ...", file=sys.stderr)
        model, default_name = load_for_serving(args.model_dir, args.adapter, args.checkpoint, args.device)
        server = ChatServer(
            ModelTokenSource(model),
            args.served_model_name or default_name,
            api_key=args.api_key,
            max_concurrency=args.max_concurrency,
            max_model_len=args.max_model_len,
        )
        host = f"[{args.host}]" if ":" in args.host else args.host
        key = ", API key required" if args.api_key else ""
        print(
            f"serving '{server.model_name}' on http://{host}:{sock.getsockname()[1]}/v1 (context "
            f"{server.context_length} tokens, up to {args.max_concurrency} concurrent requests{key})",
            file=sys.stderr,
        )
        # On Ctrl-C / SIGTERM, in-flight requests get 10 s to finish, then their streams are cancelled.
        config = uvicorn.Config(server.app, log_level=args.log_level, timeout_graceful_shutdown=10)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0
