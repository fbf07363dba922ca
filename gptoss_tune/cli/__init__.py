"""The `gptoss-tune` command."""

from gptoss_tune.cli.main import main

__all__ = ["main"]
