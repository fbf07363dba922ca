"""`gptoss-tune render DATA`: show what the model will see, with the trained tokens marked.

Text mode prints the first N examples as harmony text, the trained part marked (green on a terminal,
between ⟦ and ⟧ otherwise), and totals over the whole file. `--json` prints one JSON object per example,
{"input_ids": [...], "loss_mask": [...]}, unpacked (the totals then go to stderr).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import ValidationError

from gptoss_tune.data.packing import FitStats, fit
from gptoss_tune.data.settings import MAX_UNBROKEN_CHARS, DataSettings
from gptoss_tune.data.sources import read_examples
from gptoss_tune.errors import UserError

NAME = "render"
GREEN, RESET = "\033[1;32m", "\033[0m"


def add_parser(sub) -> None:
    p = sub.add_parser(
        NAME,
        help="show how a data file is rendered in harmony and which tokens are trained",
        description="Render a data file (.jsonl, .json, .parquet or a saved dataset directory) exactly as training "
        "does: harmony text with the trained tokens marked, token counts and totals. With --json, one JSON object "
        'per example: {"input_ids": [...], "loss_mask": [...]} (unpacked; loss_mask 1 where the loss falls).',
    )
    p.add_argument("data", help="data file or saved Hugging Face dataset directory")
    p.add_argument("--n", type=int, default=None, help="examples to print (default: 3; with --json all)")
    p.add_argument("--json", action="store_true", help="print one JSON object per example (input_ids, loss_mask)")
    p.add_argument(
        "--reasoning-effort", choices=["low", "medium", "high"], default=None, help="for examples without their own"
    )
    p.add_argument(
        "--train-on",
        choices=["last", "all"],
        default="last",
        help="train the last assistant turn or all (default: last)",
    )
    p.add_argument("--max-seq-len", type=int, default=2048, help="truncate or drop longer examples (default: 2048)")
    p.add_argument(
        "--overlong", choices=["truncate", "drop"], default="truncate", help="what to do with longer examples"
    )
    p.add_argument("--tools", default=None, metavar="FILE", help="JSON file with a list of OpenAI function schemas")
    p.add_argument(
        "--skip-bad-lines", action="store_true", help="skip bad records and list them (default: stop at the first)"
    )
    p.add_argument(
        "--max-unbroken-chars",
        type=int,
        default=MAX_UNBROKEN_CHARS,
        help=f"most letters, punctuation or spaces in a row in one string (default: {MAX_UNBROKEN_CHARS:,}; "
        "the renderer's time is quadratic in such a run)",
    )
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto", help="mark trained tokens in color")
    p.set_defaults(run=run)


def marked_text(input_ids: list[int], loss_mask: list[int], *, color: bool) -> str:
    """The decoded tokens with each run of trained tokens marked."""
    from gptoss_tune.data.tokenizer import harmony_encoding

    enc = harmony_encoding()
    on, off = (GREEN, RESET) if color else ("⟦", "⟧")
    parts, start = [], 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or loss_mask[i] != loss_mask[start]:
            text = enc.decode(input_ids[start:i])
            parts.append(f"{on}{text}{off}" if loss_mask[start] else text)
            start = i
    return "".join(parts)


def run(args) -> int:

    if args.n is not None and args.n < 0:
        raise UserError(f"--n: the number of examples to print must be 0 or more, got {args.n}")
    try:
        settings = DataSettings(
            train=args.data,
            max_seq_len=args.max_seq_len,
            reasoning_effort=args.reasoning_effort,
            train_on=args.train_on,
            overlong=args.overlong,
            on_bad_line="skip" if args.skip_bad_lines else "error",
            tools=_read_tools(args.tools),
            max_unbroken_chars=args.max_unbroken_chars,
        )
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]) if err.get("loc") else ""
        flag = {"train": "DATA", "tools": "--tools"}.get(field, "--" + field.replace("_", "-"))
        msg = err["msg"][0].lower() + err["msg"][1:]
        got = f" (got {err['input']!r})" if not isinstance(err.get("input"), (dict, list)) else ""
        raise UserError(f"{flag}: {msg}{got}") from None
    from gptoss_tune.data.harmony import parse_tools

    parse_tools(settings.tools, where=f"{args.tools}: ")
    src = read_examples(
        Path(settings.train),
        reasoning_effort=settings.reasoning_effort,
        tools=settings.tools,
        train_on=settings.train_on,
        on_bad_line=settings.on_bad_line,
        skip_hint="pass --skip-bad-lines",
        max_unbroken_chars=settings.max_unbroken_chars,
        limit_name="--max-unbroken-chars",
    )
    stats = FitStats()
    fitted = []
    for e in src.examples:
        f = fit(e.input_ids, e.loss_mask, settings.max_seq_len, settings.overlong, stats, e.where)
        if f is not None:
            fitted.append((e, f))

    n = args.n if args.n is not None else (len(fitted) if args.json else 3)
    out = sys.stdout
    color = args.color == "always" or (args.color == "auto" and out.isatty())
    for k, (e, (ids, mask)) in enumerate(fitted[:n]):
        if args.json:
            out.write(json.dumps({"input_ids": ids, "loss_mask": mask}) + "\n")
            continue
        cut = " (truncated)" if len(ids) < len(e.input_ids) else ""
        out.write(f"── example {k + 1} · {e.where.rstrip(': ')} · {len(ids)} tokens, {sum(mask)} trained{cut} ──\n")
        out.write(marked_text(ids, mask, color=color) + "\n\n")

    tokens = sum(len(ids) for _, (ids, _m) in fitted)
    trained = sum(sum(m) for _, (_i, m) in fitted)
    summary = [
        f"{src.path}: {len(fitted)} examples, {tokens:,} tokens, {trained:,} trained "
        f"({100 * trained / max(tokens, 1):.1f}%); {stats.truncated} truncated, {stats.dropped} dropped "
        f"(max_seq_len {settings.max_seq_len}, overlong: {settings.overlong}); {len(src.skipped)} of {src.records} records skipped"
    ]
    summary += [f"  skipped {why}" for why in src.skipped[:20]]
    summary += [f"  dropped {why}" for why in stats.dropped_where[:20]]
    if not args.json:
        legend = "trained tokens in green" if color else "trained tokens between ⟦ and ⟧"
        summary.append(f"(showing {min(n, len(fitted))} of {len(fitted)}; {legend})")
    print("\n".join(summary), file=sys.stderr if args.json else out)
    return 0


def _read_tools(path: str | None):
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            tools = json.load(f)
    except FileNotFoundError:
        raise UserError(f"--tools: {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(tools, list):
        raise UserError(f"{path}: expected a JSON list of OpenAI function schemas")
    return tools
