"""The `data:` section of a recipe (validated by pydantic). Paths are resolved by the recipe loader."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gptoss_tune.settings import Settings


class DataSettings(Settings):
    train: str = Field(
        description="training data: a .jsonl/.json/.parquet file or a saved Hugging Face dataset directory"
    )
    validation: str | None = Field(
        None, description="validation data (same formats); else val_fraction of train is held out"
    )
    val_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="fraction of train held out for validation when no file is given"
    )
    max_seq_len: int = Field(2048, ge=16, description="tokens per row (packed) or per example (padding mode)")
    packing: bool = Field(True, description="pack several examples per row, attention never crossing examples")
    reasoning_effort: Literal["low", "medium", "high"] | None = Field(
        None,
        description="system-message reasoning effort for examples that do not set their own (harmony default: medium)",
    )
    train_on: Literal["last", "all"] = Field(
        "last", description="train the last assistant turn only, or every assistant turn"
    )
    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="what to do with examples longer than max_seq_len"
    )
    on_bad_line: Literal["error", "skip"] = Field(
        "error", description="stop at the first bad example, or skip and report"
    )
    tools: list[dict] | None = Field(
        None,
        description="OpenAI function schemas rendered in the developer message of examples that do not give their own `tools`",
    )
