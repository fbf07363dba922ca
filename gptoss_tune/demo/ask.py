"""The end of `make demo`: export the tuned run, serve the export, ask it one question with the openai client.

    from gptoss_tune.demo.ask import export_serve_and_ask
    reply = export_serve_and_ask("runs/demo/run", "runs/demo/export")

Everything stays in this process: the server runs on a free loopback port in a background thread and is
shut down before returning.
"""

from __future__ import annotations

import time
from pathlib import Path


def export_serve_and_ask(
    run_dir: str | Path,
    out_dir: str | Path,
    question: str = "I get error E04 on my Velora City. How do I fix it?",
    system: str | None = "You are Velora's e-bike support assistant. Answer briefly, from Velora's documentation.",
    fmt: str = "merged-mxfp4",
    checkpoint: str = "best",
    max_tokens: int = 96,
    seed: int = 0,
    progress=print,
    device: str | None = None,
):
    """Returns the openai ChatCompletion (greedy). The tiny demo model has learned the harmony structure of
    the sample conversations (analysis, then a final answer ending in <|return|>), not the facts: the
    point is the path (export -> load -> harmony render -> generate -> parse -> OpenAI response)."""
    try:
        import openai
    except ImportError:
        from gptoss_tune.errors import UserError

        raise UserError(
            "the demo asks through the `openai` client: pip install openai (it is in the [dev] extra)"
        ) from None
    from gptoss_tune.export.exporter import export_run
    from gptoss_tune.serve.app import ChatServer
    from gptoss_tune.serve.generate import ModelTokenSource
    from gptoss_tune.serve.http import start_in_thread
    from gptoss_tune.serve.loading import load_for_serving

    t0 = time.time()
    export_run(run_dir, fmt, out_dir, checkpoint=checkpoint, force=True, progress=progress)
    model, name = load_for_serving(out_dir, device=device)
    server = ChatServer(ModelTokenSource(model), name, max_concurrency=1)
    running = start_in_thread(server.app)
    try:
        progress(f"serving {name} on {next(model.parameters()).device} at {running.base_url}")
        client = openai.OpenAI(base_url=running.base_url, api_key="demo", max_retries=0, timeout=120)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
        reply = client.chat.completions.create(
            model=name, messages=messages, max_tokens=max_tokens, seed=seed, temperature=0
        )
    finally:
        running.stop()
    choice = reply.choices[0]
    progress(
        f"asked {question!r} through the openai client: finish_reason={choice.finish_reason}, "
        f"{reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion tokens, "
        f"content={choice.message.content!r}, reasoning={getattr(choice.message, 'reasoning', None)!r} "
        f"({time.time() - t0:.1f}s with the export)"
    )
    return reply
