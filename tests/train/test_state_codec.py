"""The pickle-free state codec: exact round trips of optimizer, scheduler and RNG states, and refusal
(one line naming the file) of anything else, without running it."""

from __future__ import annotations

import json
import math
import pickle
import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from gptoss_tune.errors import UserError
from gptoss_tune.train.state_codec import load_state, save_state


def _same(a, b) -> bool:
    """Equal values of exactly the same types all the way down (tuple is not list, 1 is not 1.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, dict):
        return (
            list(a) == list(b) and all(type(k) is type(k2) for k, k2 in zip(a, b)) and all(_same(a[k], b[k]) for k in a)
        )
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def test_mixed_structure_round_trips_exactly(tmp_path):
    obj = {
        0: {"a": (1, 2.0, [3, (4,)]), 7: None},
        "s": "ü",
        "flags": [True, False],
        "inf": float("inf"),
        "-inf": float("-inf"),
        "nan": float("nan"),
        "big": 2**80,
        "t": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.empty(0, 4),
        "np": np.arange(5, dtype=np.uint32),
        "np_scalar": np.float64(0.25),
        "tuple_keyed": {"1": 1, 1: "1"},
    }
    f = tmp_path / "s.safetensors"
    save_state(obj, f)
    assert _same(load_state(f), obj)


def test_adamw_and_lambdalr_state_round_trip_and_continue_identically(tmp_path):
    torch.manual_seed(0)
    p = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = torch.optim.AdamW(p, lr=0.1, betas=(0.8, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1))
    for _ in range(3):
        sum((x**2).sum() for x in p).backward()
        opt.step(), sched.step(), opt.zero_grad()
    save_state(opt.state_dict(), tmp_path / "o.safetensors")
    save_state(sched.state_dict(), tmp_path / "s.safetensors")
    o2, s2 = load_state(tmp_path / "o.safetensors"), load_state(tmp_path / "s.safetensors")
    assert _same(o2, opt.state_dict()) and _same(s2, sched.state_dict())
    assert isinstance(o2["param_groups"][0]["betas"], tuple) and list(o2["state"]) == [0, 1]

    q = [torch.nn.Parameter(x.detach().clone()) for x in p]
    opt_b = torch.optim.AdamW(q, lr=0.1, betas=(0.8, 0.95))
    sched_b = torch.optim.lr_scheduler.LambdaLR(opt_b, lambda s: 1 / (s + 1))
    opt_b.load_state_dict(o2), sched_b.load_state_dict(s2)
    for params, o, s in ((p, opt, sched), (q, opt_b, sched_b)):
        sum((x**2).sum() for x in params).backward()
        o.step(), s.step()
    assert all(torch.equal(x, y) for x, y in zip(p, q))


def test_rng_states_round_trip_and_replay_the_same_numbers(tmp_path):
    from gptoss_tune.train.checkpoint import rng_state, set_rng_state

    random.seed(1), np.random.seed(2), torch.manual_seed(3), np.random.randn()  # numpy caches a gaussian
    state = rng_state()
    save_state(state, tmp_path / "rng.safetensors")
    expected = (random.random(), np.random.randn(), torch.rand(2))
    loaded = load_state(tmp_path / "rng.safetensors")
    assert _same(loaded, state)
    set_rng_state(loaded)
    got = (random.random(), np.random.randn(), torch.rand(2))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_a_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    f = tmp_path / "scheduler.safetensors"
    f.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UserError) as e:
        load_state(f)
    assert not marker.exists()
    assert str(f) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "meta",
    [
        None,  # another program's safetensors file
        {"gptoss_tune.state": "1", "skeleton": "{"},  # torn JSON
        {"gptoss_tune.state": "1", "skeleton": json.dumps({"tensor": "9"})},  # a tensor it does not hold
        {"gptoss_tune.state": "1", "skeleton": json.dumps({"pickle": "x"})},  # an unknown tag
        {"gptoss_tune.state": "1", "skeleton": json.dumps({"tuple": [1]})},  # tensor "0" left unnamed
        {"gptoss_tune.state": "1", "skeleton": "[" * 100_000 + "]" * 100_000},  # nesting beyond the stack
        {
            "gptoss_tune.state": "1",
            "skeleton": json.dumps({"ndarray": "0", "dtype": "|O", "shape": [4], "scalar": False}),
        },
    ],
)
def test_foreign_or_damaged_files_are_one_line_user_errors(tmp_path, meta):
    f = tmp_path / "x.safetensors"
    save_file({"0": torch.zeros(4, dtype=torch.uint8)}, str(f), metadata=meta)
    with pytest.raises(UserError) as e:
        load_state(f)
    assert str(f) in str(e.value) and "\n" not in str(e.value)


def test_a_truncated_file_is_a_user_error(tmp_path):
    f = tmp_path / "o.safetensors"
    save_state({"a": torch.randn(100)}, f)
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(UserError, match="o.safetensors"):
        load_state(f)


def test_unsupported_values_are_refused_when_writing(tmp_path):
    with pytest.raises(TypeError, match=r"state\['f'\]"):
        save_state({"f": lambda: 0}, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_an_optimizer_state_of_other_shapes_is_one_line(tmp_path):
    from gptoss_tune.train.checkpoint import load_optimizer_state

    def adamw(shape):
        p = torch.nn.Parameter(torch.zeros(shape))
        opt = torch.optim.AdamW([p])
        p.grad = torch.ones(shape)
        opt.step()
        return opt

    save_state(adamw((4, 3)).state_dict(), tmp_path / "optimizer.safetensors")
    with pytest.raises(UserError) as e:
        load_optimizer_state(tmp_path, adamw((3, 4)), rank=0, sharded=False)
    assert (
        "\n" not in str(e.value)
        and str(tmp_path / "optimizer.safetensors") in str(e.value)
        and "[4, 3]" in str(e.value)
    )
