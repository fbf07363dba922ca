"""The `data:` section of a recipe (validated by pydantic). Paths are resolved by the recipe loader."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gptoss_tune.settings import Settings

# openai-harmony 0.0.8 tokenizes with its own copy of tiktoken's BPE, whose merge loop is quadratic in
# the length of one pre-tokenizer piece: a run of letters, of punctuation or of whitespace with no
# digit or other break. Measured on one core: 10,000 CJK characters in a row 0.5-1.3 s, 30,000 4-10 s,
# 240,000 239 s, 200,000 spaces or "!" 40-57 s; about 1 M letters in a row make its regex overflow
# (a Rust panic). Text with ordinary breaks renders linearly (1 M characters of English: 0.3 s), and
# tiktoken itself is linear on such runs, but the renderer is the reference for training, so instead
# of tokenizing around it we refuse absurd runs, with a limit that can be raised.
MAX_UNBROKEN_CHARS = 10_000
# openai-harmony parses the conversation as JSON with a nesting limit of 128 (serde_json's default),
# and the example's own structure sits about 10 levels deep in it.
MAX_DEPTH = 64


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
    max_unbroken_chars: int = Field(
        MAX_UNBROKEN_CHARS,
        ge=1,
        description="most letters, punctuation or whitespace characters in a row in one string of an example; "
        "longer runs are bad examples (openai-harmony's tokenizer takes time quadratic in such a run)",
    )
