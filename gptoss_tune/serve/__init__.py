"""The serving stage: a model or export -> an OpenAI-compatible chat-completions server.

Takes a checkpoint, merged export, run directory or adapter (`loading.load_for_serving`); gives a FastAPI
app (`app.ChatServer`) speaking /v1/chat/completions in harmony in and out.

    loading         what MODEL_DIR [--adapter DIR] loads
    prompt          a request -> harmony prompt tokens (the renderer training uses)
    openai_schema   the request schema and the OpenAI error shape
    generate        KV-cache generation, one token per call
    harmony_output  completion tokens -> content, reasoning and tool calls as they arrive
    app             ChatServer: routes, streaming, concurrency limit, API key
    http            binding the socket before the model loads, the loopback rule, a background thread
    guard           the Host, Content-Type and CORS rules (no cross-site requests, no DNS rebinding)
    limits          request size limits checked before any parsing or rendering
    capacity        the default context length from the free memory and the model
    vllm            the equivalent `vllm serve` command for production
"""
