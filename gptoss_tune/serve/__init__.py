"""The serving stage: a model or export -> an OpenAI-compatible chat-completions server."""
