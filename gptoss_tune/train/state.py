"""What a training run must remember to resume: one dataclass, stored as a checkpoint's trainer_state.json.

The trainer keeps the live TrainerState as an attribute, updates it after every step and evaluation, and
writes a snapshot of it (with the epoch, and whether and why the run finished) into each checkpoint. The
file's keys, their order and their values are the format every checkpoint so far was written in:

    step, micro_batches_consumed, epoch, num_processes, grad_accum, micro_batch_size, total_steps,
    warmup_steps, best ({"step", "value"} or null), evals_without_improvement, tokens_seen, evals,
    finished, stop_reason, fingerprint

Reading is lenient as the trainer always was: only step and micro_batches_consumed are required, missing
keys take the defaults below, unknown keys are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainerState:
    step: int
    micro_batches_consumed: int  # the data position: micro-batches of the stream used so far, all processes
    epoch: float | None = None  # micro_batches_consumed in epochs (6 decimals); written, never read back
    num_processes: int | None = None
    grad_accum: int | None = None
    micro_batch_size: int | None = None  # None when absent: the position is then in this recipe's micro-batches
    total_steps: int | None = None
    warmup_steps: int = 0
    best_step: int | None = None  # the lowest validation loss so far, and where (best.json points there)
    best_value: float | None = None
    evals_without_improvement: int = 0  # early stopping's patience count
    tokens_seen: int = 0
    evals: list[dict] = field(default_factory=list)  # {"step", "eval_loss"} of every evaluation so far
    finished: bool = False
    stop_reason: str | None = None  # "completed", "early_stopping", or None (the run goes on)
    fingerprint: str | None = None  # Recipe.fingerprint_hash() of the run that wrote it

    def to_dict(self) -> dict:
        return {
            "step": self.step,
            "micro_batches_consumed": self.micro_batches_consumed,
            "epoch": self.epoch,
            "num_processes": self.num_processes,
            "grad_accum": self.grad_accum,
            "micro_batch_size": self.micro_batch_size,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "best": {"step": self.best_step, "value": self.best_value} if self.best_step is not None else None,
            "evals_without_improvement": self.evals_without_improvement,
            "tokens_seen": self.tokens_seen,
            "evals": [dict(e) for e in self.evals],
            "finished": self.finished,
            "stop_reason": self.stop_reason,
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_dict(cls, d: dict) -> TrainerState:
        best = d.get("best") or {}
        return cls(
            step=d["step"],
            micro_batches_consumed=d["micro_batches_consumed"],
            epoch=d.get("epoch"),
            num_processes=d.get("num_processes"),
            grad_accum=d.get("grad_accum"),
            micro_batch_size=d.get("micro_batch_size"),
            total_steps=d.get("total_steps"),
            warmup_steps=d.get("warmup_steps", 0),
            best_step=best.get("step"),
            best_value=best.get("value"),
            evals_without_improvement=d.get("evals_without_improvement", 0),
            tokens_seen=d.get("tokens_seen", 0),
            evals=list(d.get("evals", [])),
            finished=bool(d.get("finished", False)),
            stop_reason=d.get("stop_reason"),
            fingerprint=d.get("fingerprint"),
        )
