"""The data stage: the recipe's `data:` section -> training and validation rows, and a report.

    bundle = load_data(settings, seed=0, base_dir=recipe_dir)
    bundle.train, bundle.validation   # rows as in batching.py: input_ids, labels, position_ids
    bundle.report                      # counts, see format_report

Files are read and rendered by sources.py (through `datasets`, cached), examples rendered by
rendering.py (harmony, loss masks), cut or dropped and packed by packing.py. Validation is a separate file,
or a held-out fraction of the training examples chosen by the seed. Training rows come in an order
shuffled by the seed; validation rows in a fixed order.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from gptoss_tune.data.batching import IGNORE_INDEX
from gptoss_tune.data.harmony import check_strings, parse_tools
from gptoss_tune.data.packing import FitStats, fit, pack
from gptoss_tune.data.rendering import RenderedExample, render_example  # noqa: F401  (one example, unpacked: `render --json`)
from gptoss_tune.data.settings import DataSettings
from gptoss_tune.data.sources import Example, SourceExamples, read_examples
from gptoss_tune.errors import UserError

MAX_LISTED = 20  # reasons listed per split in the report; the counts are always complete


@dataclass
class DataBundle:
    train: list[dict]
    validation: list[dict]
    report: dict = field(default_factory=dict)


def resolve_path(value: str, base_dir: Path | None, key: str) -> Path:
    p = Path(value).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = Path(base_dir) / p
    if not p.exists():
        raise UserError(
            f"data.{key}: {p} does not exist"
            + (f" (relative paths are taken from {base_dir})" if base_dir and not Path(value).is_absolute() else "")
        )
    return p


def load_data(
    settings: DataSettings, *, seed: int, base_dir: Path | None = None, cache_dir: Path | None = None
) -> DataBundle:
    """Read, render, split, fit and pack the data of a recipe. Raises UserError on bad input."""
    t0 = time.perf_counter()

    # a bad recipe-level schema is the recipe's fault, say so once
    parse_tools(settings.tools, where="data.")
    check_strings({"tools": settings.tools}, "data.", max_unbroken_chars=settings.max_unbroken_chars)
    common = dict(
        reasoning_effort=settings.reasoning_effort,
        tools=settings.tools,
        train_on=settings.train_on,
        on_bad_line=settings.on_bad_line,
        cache_dir=cache_dir,
        max_unbroken_chars=settings.max_unbroken_chars,
    )
    train_src = read_examples(resolve_path(settings.train, base_dir, "train"), role="train", **common)
    train_examples = train_src.examples
    if settings.validation:
        val_src = read_examples(resolve_path(settings.validation, base_dir, "validation"), role="validation", **common)
        val_examples, val_from = val_src.examples, "file"
    elif settings.val_fraction > 0:
        train_examples, val_examples = hold_out(train_src.examples, settings.val_fraction, seed, train_src.path)
        val_src, val_from = None, f"{settings.val_fraction:g} of train, held out with seed {seed}"
    else:
        val_examples, val_src, val_from = [], None, "none"

    train_rows, train_report = _rows(train_examples, train_src, settings, shuffle_seed=seed)
    report = {"train": train_report}
    val_rows: list[dict] = []
    if val_from != "none":
        val_rows, report["validation"] = _rows(val_examples, val_src, settings, shuffle_seed=None)
        report["validation"].update(_overlap(val_examples, train_examples))
    else:
        report["validation"] = None
    if not train_rows:
        raise UserError(
            f"{train_src.path}: no training example is left after applying max_seq_len {settings.max_seq_len} (overlong: {settings.overlong})"
        )
    report.update(
        validation_from=val_from,
        max_seq_len=settings.max_seq_len,
        packing=settings.packing,
        train_on=settings.train_on,
        seconds=round(time.perf_counter() - t0, 3),
    )
    return DataBundle(train_rows, val_rows, report)


def hold_out(examples: list[Example], fraction: float, seed: int, path: Path) -> tuple[list[Example], list[Example]]:
    """Split off `fraction` of the examples (at least one), chosen by the seed; order kept in both."""
    n_val = max(1, math.floor(fraction * len(examples) + 0.5))
    if n_val >= len(examples):
        raise UserError(
            f"{path}: {len(examples)} examples are too few to hold out val_fraction {fraction:g} and keep any for training"
        )
    val_idx = set(random.Random(seed).sample(range(len(examples)), n_val))
    return [e for i, e in enumerate(examples) if i not in val_idx], [e for i, e in enumerate(examples) if i in val_idx]


def _key(e: Example) -> bytes:
    """Identity of a rendered example: its tokens and what is trained (the same text in another format
    that renders to the same tokens is the same example)."""
    return hashlib.blake2b(array("I", e.input_ids).tobytes() + bytes(e.loss_mask), digest_size=16).digest()


def _place(e: Example) -> str:
    return e.where.rstrip(": ")


def _duplicates(examples: list[Example]) -> list[str]:
    """'FILE:LINE repeats FILE:LINE' for every example that renders exactly like an earlier one."""
    first: dict[bytes, Example] = {}
    out = []
    for e in examples:
        k = _key(e)
        if k in first:
            out.append(f"{_place(e)} repeats {_place(first[k])}")
        else:
            first[k] = e
    return out


def _overlap(val: list[Example], train: list[Example]) -> dict:
    """Validation examples that are also training examples (validation loss on them measures memory)."""
    in_train = {}
    for e in train:
        in_train.setdefault(_key(e), e)
    both = [f"{_place(e)} is also {_place(in_train[k])}" for e in val if (k := _key(e)) in in_train]
    return {
        "in_train": len(both),
        "compared": len(val),
        "in_train_reasons": both[:MAX_LISTED],
        "same_as_train": bool(val) and len(both) == len(val) and {_key(e) for e in val} == set(in_train),
    }


def _rows(examples: list[Example], src: SourceExamples | None, settings: DataSettings, shuffle_seed: int | None):
    stats = FitStats()
    kept = []
    longest = 0
    for e in examples:
        longest = max(longest, len(e.input_ids))
        f = fit(e.input_ids, e.loss_mask, settings.max_seq_len, settings.overlong, stats, e.where)
        if f is not None:
            kept.append(f)
    rows = pack(kept, settings.max_seq_len, settings.packing)
    empty = [_place(e) for e in examples if e.empty_target]
    dups = _duplicates(examples)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(rows)
    tokens = sum(len(r["input_ids"]) for r in rows)
    report = {
        "source": str(src.path) if src else None,
        "records": src.records if src else len(examples),
        "skipped": len(src.skipped) if src else 0,
        "skipped_reasons": (src.skipped[:MAX_LISTED] if src else []),
        "examples": len(kept),
        "truncated": stats.truncated,
        "dropped": stats.dropped,
        "dropped_overlong": stats.dropped_overlong,
        "dropped_no_target": stats.dropped_no_target,
        "dropped_reasons": stats.dropped_where[:MAX_LISTED],
        "empty_completions": len(empty),
        "empty_completion_reasons": empty[:MAX_LISTED],
        "duplicates": len(dups),
        "duplicate_reasons": dups[:MAX_LISTED],
        "tokens": tokens,
        "trained_tokens": sum(sum(1 for x in r["labels"] if x != IGNORE_INDEX) for r in rows),
        "longest_example": longest,
        "rows": len(rows),
        "fill": round(tokens / (len(rows) * settings.max_seq_len), 4) if rows else 0.0,
    }
    return rows, report


def format_report(report: dict, listed: int = MAX_LISTED) -> str:
    """A few lines for people: what was read, kept, cut and packed, what looks like a mistake (empty
    completions, duplicates, validation examples that are training examples), with up to `listed`
    places per kind."""
    lines = []
    for split in ("train", "validation"):
        r = report.get(split)
        if not r:
            continue
        src = r["source"] or report.get("validation_from")
        lines.append(
            f"{split}: {r['examples']} examples from {src} ({r['records']} records, {r['skipped']} skipped), "
            f"{r['tokens']:,} tokens, {r['trained_tokens']:,} trained; {r['truncated']} truncated, {r['dropped']} dropped "
            f"({r['dropped_overlong']} overlong, {r['dropped_no_target']} no trained token left); "
            f"{r['rows']} rows of at most {report['max_seq_len']} tokens, {100 * r['fill']:.1f}% full"
        )
        if r.get("empty_completions") or r.get("duplicates"):
            lines.append(
                f"  {r['empty_completions']} with an empty completion, "
                f"{r['duplicates']} the same as an earlier example (same tokens, same trained part)"
            )
        if r.get("in_train"):
            same = (
                " (it is the training data: its loss measures memory, not generalisation)" if r["same_as_train"] else ""
            )
            lines.append(f"  {r['in_train']} of {r['compared']} validation examples are also training examples{same}")
        for label, plural, count, reasons in (
            ("skipped", "skipped", r["skipped"], r["skipped_reasons"]),
            ("dropped", "dropped", r["dropped"], r["dropped_reasons"]),
            (
                "empty completion:",
                "empty completions",
                r.get("empty_completions", 0),
                r.get("empty_completion_reasons", []),
            ),
            ("duplicate:", "duplicates", r.get("duplicates", 0), r.get("duplicate_reasons", [])),
            ("also in train:", "also in train", r.get("in_train", 0), r.get("in_train_reasons", [])),
        ):
            lines += [f"  {label} {why}" for why in reasons[:listed]]
            if count > min(len(reasons), listed):
                lines.append(f"  ... and {count - min(len(reasons), listed)} more {plural}")
    return "\n".join(lines)
