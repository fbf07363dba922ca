"""TrainerState: the trainer_state.json of a checkpoint, read and written without changing its format."""

from __future__ import annotations

import json

from gptoss_tune.train.state import TrainerState

# A checkpoint's trainer_state.json as the trainer has written it since its first version (keys in order).
WRITTEN = {
    "step": 9,
    "micro_batches_consumed": 18,
    "epoch": 1.125,
    "num_processes": 1,
    "grad_accum": 2,
    "micro_batch_size": 2,
    "total_steps": 12,
    "warmup_steps": 2,
    "best": {"step": 8, "value": 8.60818099975586},
    "evals_without_improvement": 0,
    "tokens_seen": 1440,
    "evals": [{"step": 4, "eval_loss": 10.256366729736328}, {"step": 8, "eval_loss": 8.60818099975586}],
    "finished": False,
    "stop_reason": None,
    "fingerprint": "964adc2bba5a5194",
}


def test_round_trip_keeps_keys_order_and_values():
    state = TrainerState.from_dict(json.loads(json.dumps(WRITTEN)))
    assert (state.step, state.best_step, state.best_value, state.warmup_steps) == (9, 8, 8.60818099975586, 2)
    assert json.dumps(state.to_dict(), indent=2) == json.dumps(WRITTEN, indent=2)


def test_no_best_is_null_and_finished_runs_keep_their_reason():
    d = {**WRITTEN, "best": None, "evals": [], "finished": True, "stop_reason": "early_stopping"}
    state = TrainerState.from_dict(d)
    assert state.best_step is None and state.best_value is None and state.finished
    assert state.to_dict() == d


def test_missing_keys_take_the_defaults_the_trainer_always_used():
    """Only step and the data position are required: resume reads the rest with these defaults (warmup 0,
    no best, patience count 0, no evaluations, the recipe's micro-batch size, process count unknown)."""
    state = TrainerState.from_dict({"step": 3, "micro_batches_consumed": 6, "some_future_key": 1})
    assert state.to_dict() == {
        "step": 3,
        "micro_batches_consumed": 6,
        "epoch": None,
        "num_processes": None,
        "grad_accum": None,
        "micro_batch_size": None,
        "total_steps": None,
        "warmup_steps": 0,
        "best": None,
        "evals_without_improvement": 0,
        "tokens_seen": 0,
        "evals": [],
        "finished": False,
        "stop_reason": None,
        "fingerprint": None,
    }


def test_to_dict_does_not_share_the_evaluation_list():
    state = TrainerState.from_dict(WRITTEN)
    snapshot = state.to_dict()
    state.evals.append({"step": 12, "eval_loss": 8.0})
    assert len(snapshot["evals"]) == 2 and len(WRITTEN["evals"]) == 2
