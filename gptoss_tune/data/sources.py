"""Data files -> rendered examples, through Hugging Face `datasets` (its loaders and its cache).

Accepted: JSON Lines (.jsonl, .ndjson, or a .json file that is not one array), a .json array, .parquet,
and a directory written by `Dataset.save_to_disk` (a DatasetDict directory too: its split named like the
role, "train" or "validation", or its only split).

JSON Lines are read as text lines (datasets' `text` loader) and parsed here, one line at a time: errors
then name the exact line, and nothing is coerced into one Arrow schema (which would add null keys to
objects, e.g. to tool arguments and JSON schemas). The loader reads the bytes as Latin-1 (every byte is
one character, and it splits lines only at "\n" and "\r", which never occur inside a UTF-8 character)
and each line is decoded as UTF-8 here: invalid UTF-8 is then an error of its line, which
on_bad_line: skip can skip, not a failure of the whole file at a byte offset. Tables (Parquet, JSON arrays, saved datasets) come
through Arrow; keys whose value is null are removed again before parsing, since Arrow adds them to
every struct that lacks them.

Rendering runs as a `datasets` map with an explicit fingerprint (the source's fingerprint, the render
settings and a hash of the rendering code), so a file already rendered with the same settings and code
is read back from the cache instead of being tokenized again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai_harmony

from gptoss_tune.data import tokenizer
from gptoss_tune.data.rendering import render_example
from gptoss_tune.data.settings import MAX_DEPTH, MAX_UNBROKEN_CHARS
from gptoss_tune.errors import UserError

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonlines")
BIG = 20_000  # rows above which the render map shows progress and uses several processes
_CODE_FILES = ("harmony.py", "rendering.py", "sources.py")


@dataclass
class Example:
    where: str  # "file:line: " or "file: row N: "
    input_ids: list[int]
    loss_mask: list[int]
    empty_target: bool = False  # the trained messages hold no text


@dataclass
class SourceExamples:
    path: Path
    records: int = 0  # non-blank lines or table rows read
    examples: list[Example] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "where: why", one per bad record


def read_examples(
    path: Path,
    *,
    role: str = "train",
    reasoning_effort: str | None = None,
    tools: list | None = None,
    train_on: str = "last",
    on_bad_line: str = "error",
    cache_dir: Path | None = None,
    skip_hint: str = "set data.on_bad_line: skip",
    max_unbroken_chars: int | None = MAX_UNBROKEN_CHARS,
    limit_name: str = "data.max_unbroken_chars",
) -> SourceExamples:
    """Load one data file or dataset directory and render every example (tokens + loss mask).

    Bad records raise UserError naming file, line and field (on_bad_line "error", the first one in file
    order) or are collected in `skipped` (on_bad_line "skip").
    """
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # small files load in a blink; bars only for big renders
    try:
        ds, kind = load_source(path, role=role, cache_dir=cache_dir)
        key = _render_key(ds, kind, reasoning_effort, tools, train_on, max_unbroken_chars, limit_name)
        big = len(ds) > BIG
        if big and was_enabled:
            datasets.enable_progress_bars()
        rendered = ds.map(
            _render_batch,
            batched=True,
            with_indices=True,
            remove_columns=ds.column_names,
            fn_kwargs=dict(
                kind=kind,
                display=str(path),
                reasoning_effort=reasoning_effort,
                tools=tools,
                train_on=train_on,
                max_unbroken_chars=max_unbroken_chars,
                limit_name=limit_name,
            ),
            new_fingerprint=key,
            num_proc=min(8, os.cpu_count() or 1) if big and (os.cpu_count() or 1) > 1 else None,
            desc=f"rendering {path.name}",
        )
    finally:
        if was_enabled:
            datasets.enable_progress_bars()

    out = SourceExamples(path)
    cols = rendered.to_dict()
    errors = []
    for status, where, ids, mask, empty, err in zip(
        cols["status"], cols["where"], cols["input_ids"], cols["loss_mask"], cols["empty_target"], cols["error"]
    ):
        if status == "blank":
            continue
        out.records += 1
        if status == "error":
            errors.append(err)
        else:
            out.examples.append(Example(where, ids, mask, empty))
    if errors and on_bad_line == "error":
        more = f" ({len(errors) - 1} more bad records in this file)" if len(errors) > 1 else ""
        raise UserError(f"{errors[0]}{more}; fix it, or {skip_hint} to skip bad records")
    out.skipped = errors
    if out.records == 0:
        raise UserError(f"{path}: the file is empty (no examples)")
    if not out.examples:
        raise UserError(f"{path}: no usable examples; all {out.records} records were bad, the first: {errors[0]}")
    return out


def load_source(path: Path, *, role: str = "train", cache_dir: Path | None = None):
    """(datasets.Dataset, kind): kind "lines" (column `text`, one per line) or "records" (one per row)."""
    import datasets

    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    try:
        if path.is_dir():
            return _load_saved(path, role), "records"
        if path.stat().st_size == 0:
            raise UserError(f"{path}: the file is empty (no examples)")
        suffix = path.suffix.lower()
        files = {"train": str(path)}
        cache = str(cache_dir) if cache_dir else None
        if suffix == ".parquet":
            return datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache), "records"
        if suffix == ".json" and _first_char(path) == "[":
            return datasets.load_dataset("json", data_files=files, split="train", cache_dir=cache), "records"
        if suffix in JSONL_SUFFIXES + (".json",):
            return datasets.load_dataset(
                "text", data_files=files, split="train", cache_dir=cache, encoding="latin-1"
            ), "lines"
    except UserError:
        raise
    except Exception as e:  # datasets/pyarrow errors: report them as what they are, without a traceback
        cause = e.__cause__ or e
        raise UserError(f"{path}: could not be read as a dataset: {type(cause).__name__}: {_one_line(cause)}") from None
    raise UserError(
        f"{path}: unknown data format {path.suffix!r}; use .jsonl, .json, .parquet or a saved Hugging Face dataset directory"
    )


def _load_saved(path: Path, role: str):
    import datasets

    try:
        d = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise UserError(f"{path}: a directory, but not one written by Dataset.save_to_disk") from None
    if isinstance(d, datasets.DatasetDict):
        if role in d:
            return d[role]
        if len(d) == 1:
            return next(iter(d.values()))
        raise UserError(
            f"{path}: a dataset with splits {', '.join(d)}; none is named {role!r}: point to one split's directory"
        )
    return d


def _render_batch(
    batch: dict,
    indices: list[int],
    *,
    kind,
    display,
    reasoning_effort,
    tools,
    train_on,
    max_unbroken_chars,
    limit_name,
) -> dict:
    out: dict[str, list] = {
        "status": [],
        "where": [],
        "input_ids": [],
        "loss_mask": [],
        "empty_target": [],
        "error": [],
    }
    columns = list(batch)
    for j, idx in enumerate(indices):
        status, ids, mask, empty, err = "ok", [], [], False, ""
        if kind == "lines":
            where = f"{display}:{idx + 1}: "
            line, err = _decode_line(batch["text"][j], first=idx == 0)
            if err:
                status, err = "error", f"{where}{err}"
            elif not line.strip():
                status = "blank"
            else:
                try:
                    example = json.loads(line)
                except json.JSONDecodeError as e:
                    status, err = "error", f"{where}not valid JSON ({e.msg} at column {e.colno})"
                except RecursionError:
                    status, err = (
                        "error",
                        f"{where}the example: nested more than {MAX_DEPTH} levels deep (objects and lists within each other); flatten it",
                    )
        else:
            where = f"{display}: row {idx + 1}: "
            example = _strip_nulls({c: batch[c][j] for c in columns})
        if status == "ok":
            try:
                r = render_example(
                    example,
                    reasoning_effort=reasoning_effort,
                    tools=tools,
                    train_on=train_on,
                    where=where,
                    max_unbroken_chars=max_unbroken_chars,
                    limit_name=limit_name,
                )
                ids, mask, empty = r.input_ids, r.loss_mask, r.empty_target
            except UserError as e:
                status, err = "error", str(e)
        out["status"].append(status)
        out["where"].append(where)
        out["input_ids"].append(ids)
        out["loss_mask"].append(mask)
        out["empty_target"].append(empty)
        out["error"].append(err)
    return out


def _decode_line(text: str, first: bool) -> tuple[str, str]:
    """A line read as Latin-1 -> (the line decoded as UTF-8, "") or ("", why it is not UTF-8)."""
    raw = text.encode("latin-1")
    if first and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a byte order mark, as Windows editors write it: not data
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError as e:
        column = len(raw[: e.start].decode("utf-8")) + 1
        return "", f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {column}); save the file as UTF-8"


def _strip_nulls(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _strip_nulls(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [_strip_nulls(v) for v in x]
    return x


def _render_key(ds, kind: str, reasoning_effort, tools, train_on, max_unbroken_chars, limit_name) -> str:
    """Cache key of a render: the source, the settings and the code that renders (datasets would not
    notice a change in the functions that the map function calls)."""

    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in _CODE_FILES:
        h.update((here / name).read_bytes())
    h.update(
        json.dumps(
            [
                ds._fingerprint,
                kind,
                reasoning_effort,
                tools,
                train_on,
                max_unbroken_chars,
                limit_name,
                getattr(openai_harmony, "__version__", ""),
                tokenizer.O200K_SHA256,
            ],
            sort_keys=True,
            default=str,
        ).encode()
    )
    return h.hexdigest()[:32]


def _first_char(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head[:1].decode("latin-1")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")
