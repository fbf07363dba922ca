"""The one device check: `load_model(device=...)` and the commands' `--device` flag refuse at once, in
one line, a device this machine cannot honour (rather than a traceback from deep inside torch after
minutes of loading). Only cuda and cpu: the expert kernels, flex attention and training assume them."""

from __future__ import annotations

import torch

from gptoss_tune.errors import UserError


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None, flag: str = "device") -> torch.device:
    """`device` as a torch.device (None: cuda if available, else cpu); UserError naming `flag` (the
    argument or command-line flag it came from) for anything but cpu or an available CUDA device."""
    if device is None:
        return default_device()
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"{flag} {str(device)!r}: not a torch device; use cpu, cuda or cuda:N") from None
    if d.type == "cpu":
        return d
    if d.type != "cuda":
        raise UserError(f"{flag} {str(device)!r}: only cuda and cpu are supported")
    if not torch.cuda.is_available():
        raise UserError(
            f"{flag} {str(device)!r}: no CUDA device is available here (torch {torch.__version__}); use cpu"
        )
    if d.index is not None and d.index >= torch.cuda.device_count():
        raise UserError(
            f"{flag} {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0"
        )
    return d


def check_device(device: str | None, flag: str = "--device") -> None:
    """The commands' check of their `--device` flag (None: the default device, always fine)."""
    if device is not None:
        resolve_device(device, flag)
