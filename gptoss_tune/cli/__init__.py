"""The `gptoss-tune` command: one module per verb (init_tiny, inspect, render, validate, train, export,
serve), each with `add_parser(sub)` and `run(args)`; `main` holds the one error handler."""

from gptoss_tune.cli.main import main

__all__ = ["main"]
