"""The training loop's view of the data: rows from the data stage, and a deterministic micro-batch stream.

The stream is a pure function of (rows, micro_batch_size, seed): epoch e visits the rows in a permutation
seeded by (seed, e), cut into micro-batches; micro-batch i of the whole run is micro-batch i % M of epoch
i // M (M micro-batches per epoch). An optimizer step on P processes with G accumulation steps takes the
next P*G micro-batches, process p taking those at offsets p, p+P, ... So the data position of a run is
one number, the micro-batches consumed; resuming needs nothing else, even on another process count.
The stream has no end: a run of train.max_steps takes as many epochs as it needs (gptoss_tune.train.length).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gptoss_tune.data.batching import collate
from gptoss_tune.data.pipeline import load_data


@dataclass
class TrainData:
    train: list[dict]
    validation: list[dict]
    report: dict = field(default_factory=dict)


def load_train_data(recipe) -> TrainData:
    """Rows for training and validation, rendered and packed by the data stage (gptoss_tune.data)."""
    bundle = load_data(recipe.data, seed=recipe.train.seed, base_dir=Path(recipe.data.train).parent)
    return TrainData(list(bundle.train), list(bundle.validation), dict(bundle.report))


@dataclass
class MicroBatchStream:
    rows: list[dict]
    micro_batch_size: int
    seed: int
    packing: bool = True

    def __post_init__(self):
        if not self.rows:
            raise ValueError("no training rows")
        self.per_epoch = math.ceil(len(self.rows) / self.micro_batch_size)
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
            self._perm_epoch = epoch
        return self._perm

    def rows_of(self, index: int) -> list[dict]:
        epoch, j = divmod(index, self.per_epoch)
        perm = self._permutation(epoch)
        return [self.rows[k] for k in perm[j * self.micro_batch_size : (j + 1) * self.micro_batch_size]]

    def epoch_at(self, index: int) -> float:
        return index / self.per_epoch

    def position_from(self, consumed: int, micro_batch_size: int) -> int:
        """The index in this stream of a run that consumed `consumed` micro-batches of `micro_batch_size`
        rows (a run branched with another micro-batch size): same epoch, same place in its permutation
        (which does not depend on the batch size), rounded up to a whole batch of ours, so the fewer than
        micro_batch_size rows under the cut are skipped and none is seen twice."""
        if micro_batch_size == self.micro_batch_size:
            return consumed
        epoch, j = divmod(consumed, math.ceil(len(self.rows) / micro_batch_size))
        return epoch * self.per_epoch + min(self.per_epoch, math.ceil(j * micro_batch_size / self.micro_batch_size))

    def step_indices(self, start: int, num_processes: int, grad_accum: int, rank: int) -> list[int]:
        return [start + rank + num_processes * g for g in range(grad_accum)]

    def batch(self, index: int) -> dict:
        return collate(self.rows_of(index), self.packing)


def eval_batches(
    rows: list[dict],
    micro_batch_size: int,
    packing: bool,
    num_processes: int,
    rank: int,
    max_batches: int | None = None,
):
    """This process's share of the validation micro-batches, as (batch, weight) pairs.

    Every process gets the same number of forward passes (sharded models need that); a process short of
    real batches repeats one with weight 0."""
    chunks = [rows[i : i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
    if max_batches is not None:
        chunks = chunks[:max_batches]
    per_process = math.ceil(len(chunks) / num_processes) if chunks else 0
    out = []
    for j in range(per_process):
        i = rank + j * num_processes
        if i < len(chunks):
            out.append((collate(chunks[i], packing), 1))
        else:
            out.append((collate(chunks[0], packing), 0))
    return out
