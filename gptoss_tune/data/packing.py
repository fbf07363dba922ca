"""Rendered examples -> training rows (the contract in batching.py): overlong handling and packing.

An example longer than max_seq_len is cut to its first max_seq_len tokens ("truncate") or left out
("drop"). An example that would keep no trained token is always left out and counted, never trained
as an empty target. Rows: `input_ids`, `labels` (the token where the loss falls, -100 elsewhere,
unshifted) and `position_ids` (restarting at 0 for each example in the row).

Packing puts several examples in one row of at most max_seq_len tokens, best fit, longest first (the
usual bin-packing heuristic: rows come out nearly full, see `fill` in the report). With packing off,
each row is one example.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from gptoss_tune.data.batching import IGNORE_INDEX


@dataclass
class FitStats:
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_target: int = 0
    dropped_where: list[str] = field(default_factory=list)  # "where: why" for each dropped example

    @property
    def dropped(self) -> int:
        return self.dropped_overlong + self.dropped_no_target


def fit(
    ids: list[int], mask: list[int], max_seq_len: int, overlong: str, stats: FitStats, where: str = ""
) -> tuple[list[int], list[int]] | None:
    """The example as it will be trained, or None when it is left out (counted in stats)."""
    if len(ids) > max_seq_len:
        if overlong == "drop":
            stats.dropped_overlong += 1
            stats.dropped_where.append(
                f"{where}{len(ids)} tokens, longer than max_seq_len {max_seq_len} (overlong: drop)"
            )
            return None
        ids, mask = ids[:max_seq_len], mask[:max_seq_len]
        if not any(mask):
            stats.dropped_no_target += 1
            stats.dropped_where.append(
                f"{where}no trained token within the first {max_seq_len} tokens (max_seq_len); the target was cut away, so it is left out"
            )
            return None
        stats.truncated += 1
    elif not any(mask):
        stats.dropped_no_target += 1
        stats.dropped_where.append(f"{where}no trained token")
        return None
    return ids, mask


def to_row(examples: list[tuple[list[int], list[int]]]) -> dict[str, list[int]]:
    """One row from one or more (input_ids, loss_mask) examples, positions restarting per example."""
    input_ids, labels, position_ids = [], [], []
    for ids, mask in examples:
        input_ids.extend(ids)
        labels.extend(t if m else IGNORE_INDEX for t, m in zip(ids, mask))
        position_ids.extend(range(len(ids)))
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def pack(examples: list[tuple[list[int], list[int]]], max_seq_len: int, packing: bool) -> list[dict[str, list[int]]]:
    """Rows from examples no longer than max_seq_len (apply `fit` first)."""
    if not packing:
        return [to_row([e]) for e in examples]
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i][0]), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted: best fit = the smallest room that fits
    for i in order:
        n = len(examples[i][0])
        if n > max_seq_len:
            raise ValueError(f"example of {n} tokens is longer than max_seq_len {max_seq_len}; apply fit() first")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
        else:
            room, b = max_seq_len, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    return [to_row([examples[i] for i in b]) for b in bins]
