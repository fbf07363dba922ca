"""The `--device` flag of the commands: refused at once, in one line, when this machine cannot honour it
(rather than a traceback from deep inside torch after minutes of loading)."""

from __future__ import annotations

import torch

from .errors import UserError


def check_device(device: str | None, flag: str = "--device") -> None:
    """Raise UserError unless `device` is None (the default: cuda if available, else cpu), cpu, or an
    available CUDA device (cuda, cuda:N)."""
    if device is None:
        return
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"{flag} {device!r}: not a device; use cuda, cuda:N or cpu") from None
    if d.type == "cpu":
        return
    if d.type != "cuda":
        raise UserError(f"{flag} {device}: only cuda and cpu are supported")
    if not torch.cuda.is_available():
        raise UserError(f"{flag} {device}: no CUDA device is available on this machine (or this torch has no CUDA); use {flag} cpu")
    if d.index is not None and d.index >= torch.cuda.device_count():
        raise UserError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0")
