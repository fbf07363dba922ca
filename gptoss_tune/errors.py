"""User-facing errors.

A mistake in a recipe, data file, checkpoint or request raises `UserError`. The CLI prints its message as
one line (no traceback) and exits with status 2, so the message itself must name the file, line, field or
tensor that is wrong and say what to do about it.
"""


class UserError(Exception):
    """An error caused by the user's input, reported as one line without a traceback."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class CheckpointError(UserError):
    """A model directory or weight file that cannot be loaded as a gpt-oss checkpoint."""


class Interrupted(KeyboardInterrupt):
    """A second SIGINT/SIGTERM during training: stop at once. A KeyboardInterrupt (so every `finally` and
    `except Exception` treats it as Ctrl-C) that remembers the signal, so the command exits 128 + signum
    (130 for SIGINT, 143 for SIGTERM) as a process killed by it would, and as the first signal did."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + int(signum)
