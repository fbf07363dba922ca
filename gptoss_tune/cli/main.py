"""The `gptoss-tune` command: one module per verb, and the one place user errors become one line.

Each verb module (init_tiny, inspect, render, validate, train, export, serve) has `add_parser(sub)`,
which registers its flags and `run(args) -> exit status`. Building the parsers imports nothing heavy, so
`gptoss-tune --help` stays fast; a verb imports torch and the stage it drives when it runs.

A `UserError` raised anywhere below becomes one line, `PROG: error: MESSAGE` (the message names the file,
line, key or tensor), with its exit status (2; 3 for a diverged run) and no traceback. Under a
multi-process launch only rank 0 prints it: every rank hits the same error.
"""

from __future__ import annotations

import argparse
import os
import sys

from gptoss_tune import __version__
from gptoss_tune.cli import export, init_tiny, inspect, render, serve, train, validate
from gptoss_tune.errors import UserError

VERBS = (init_tiny, inspect, render, export, serve, validate, train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptoss-tune",
        description="Fine-tune gpt-oss-20b/120b with LoRA on MXFP4 experts, export and serve the result.",
    )
    parser.add_argument("--version", action="version", version=f"gptoss-tune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for verb in VERBS:
        verb.add_parser(sub)
    return parser


def run_reporting_errors(prog: str, run, args) -> int:
    """Run a verb; a UserError becomes `PROG: error: MESSAGE` on stderr and its exit status."""
    try:
        return int(run(args) or 0)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        print(f"{prog}: interrupted", file=sys.stderr)
        return getattr(e, "exit_code", 130)  # errors.Interrupted: 128 + the signal (143 for SIGTERM)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    return run_reporting_errors(f"gptoss-tune {args.command}", args.run, args)


def train_main(argv: list[str] | None = None) -> int:
    """`python -m gptoss_tune.train` / `accelerate launch -m gptoss_tune.train`: the train verb on its own."""
    parser = argparse.ArgumentParser(prog="gptoss_tune.train", description=train.DESCRIPTION)
    train.add_arguments(parser)
    return run_reporting_errors("gptoss_tune.train", train.run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
