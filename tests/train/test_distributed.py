"""Two gloo CPU ranks under each accelerate config of recipes/accelerate: DDP, FSDP2, DeepSpeed ZeRO-2 and
ZeRO-3 against one process with the same global batch (2 ranks x grad_accum 1 = 1 process x grad_accum 2),
resident parameter bytes per rank, SIGKILL of both ranks then resume, a rank whose micro-batches reach only
a few experts, and the NaN check before any rank applies the update.

Each launch is a real `accelerate launch --config_file recipes/accelerate/X.yaml --num_processes 2`; the
model is a tiny checkpoint with a 1,088-token vocabulary and 16 experts (each launch ~10-20 s on 2 cores).
DeepSpeed tests skip, saying why, where deepspeed does not import; DDP and FSDP2 never skip.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.training import read_metrics, wrapper_script, write_recipe

from gptoss_tune.train.recipe import load_recipe
from gptoss_tune.train.trainer import train

pytestmark = pytest.mark.xdist_group("distributed")

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "recipes" / "accelerate"
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(
    not HAS_DEEPSPEED,
    reason="deepspeed is not installed here (pip install --no-build-isolation 'gptoss-tune[deepspeed]'); "
    "DDP and FSDP2 are tested without it",
)
STEPS = 6


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    """The tiny model with a small vocabulary (the synthetic rows use ids 1000-1039) and 16 experts (so a
    2-token micro-batch leaves at least 12 of them without a token)."""
    from gptoss_tune.model.tiny import write_tiny_checkpoint

    out = write_tiny_checkpoint(
        tmp_path_factory.mktemp("small") / "ckpt", seed=1, sliding_window=4, vocab=1088, experts=16
    )
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(pad_token_id=0, eos_token_id=1)  # the harmony ids lie outside this vocabulary
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def _recipe(tmp_path: Path, ckpt: Path, grad_accum: int, **sections) -> Path:
    train_cfg = {"grad_accum": grad_accum, "max_steps": STEPS, **sections.pop("train", {})}
    return write_recipe(
        tmp_path,
        ckpt,
        train=train_cfg,
        eval={"every_steps": 3},
        checkpoint={"every_steps": 3, "keep": 3},
        **sections,
    )


def _one_process(small_ckpt, d: Path, grad_accum: int):
    from helpers.training import synthetic_data

    train(load_recipe(_recipe(d, small_ckpt, grad_accum=grad_accum)), data=synthetic_data())
    return read_metrics(d / "run")


@pytest.fixture(scope="module")
def reference(small_ckpt, tmp_path_factory):
    """One process, grad_accum 2: the run every two-rank launch must reproduce."""
    return _one_process(small_ckpt, tmp_path_factory.mktemp("single"), grad_accum=2)


@pytest.fixture(scope="module")
def reference_accum4(small_ckpt, tmp_path_factory):
    """One process, grad_accum 4: what two ranks with grad_accum 2 must reproduce."""
    return _one_process(small_ckpt, tmp_path_factory.mktemp("single4"), grad_accum=4)


def _wrapper(dir: Path) -> Path:
    """`python SCRIPT RECIPE`: helpers.training's wrapper (synthetic data, GPTOSS_TEST_HANG_AT_CHECKPOINT), and
    GPTOSS_TEST_NAN_AT=S:R            rank R's training loss is NaN from its S-th micro-batch on,
    GPTOSS_TEST_SHORT_RANK=R          rank R trains on 2-token rows (at most 4 of 16 experts get a token),
    GPTOSS_TEST_STEPS_DIR=D           every AdamW.step() appends a line to D/rank{R} (updates applied)."""
    return wrapper_script(dir, extra=RANK_HOOKS, name="train_dist.py")


RANK_HOOKS = r"""
rank = int(os.environ.get("RANK", "0"))
nan = os.environ.get("GPTOSS_TEST_NAN_AT")
if nan and int(nan.split(":")[1]) == rank:
    from gptoss_tune.train.objective import Objective
    forward, calls = Objective.forward, [0]
    def poisoned(self, *a, evaluate=False, **kw):
        out = forward(self, *a, evaluate=evaluate, **kw)
        if not evaluate:
            calls[0] += 1
            if calls[0] >= int(nan.split(":")[0]):
                out.lm_loss_sum = out.lm_loss_sum * float("nan")
        return out
    Objective.forward = poisoned
short = os.environ.get("GPTOSS_TEST_SHORT_RANK")
if short and int(short) == rank:
    from gptoss_tune.data.batching import collate
    from gptoss_tune.train.stream import MicroBatchStream
    row = {"input_ids": [1000, 1001], "labels": [-100, 1001], "position_ids": [0, 1]}
    MicroBatchStream.batch = lambda self, i: collate([row] * self.micro_batch_size, self.packing)
steps = os.environ.get("GPTOSS_TEST_STEPS_DIR")
if steps:
    step = torch.optim.AdamW.step
    def counted(self, *a, **kw):
        with open(os.path.join(steps, "rank%d" % rank), "a") as f:
            f.write("step\n")
        return step(self, *a, **kw)
    torch.optim.AdamW.step = counted
"""


def _launch(config: str, recipe: Path, *overrides: str, env: dict | None = None, wait: bool = True):
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS / f"{config}.yaml"),
        "--num_processes",
        "2",
        "--main_process_port",
        "0",
        str(_wrapper(recipe.parent)),
        str(recipe),
        *overrides,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(
        cmd,
        env=full_env,
        cwd=recipe.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: SIGKILL reaches the launcher and both ranks
    )
    if not wait:
        return proc
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail("the two-rank launch hung:\n" + out[-4000:])
    return proc.returncode, out


def _kill_at_checkpoint(config: str, recipe: Path, step: int, *overrides: str) -> str:
    """Launch, and SIGKILL the launcher and both ranks while step `step`'s checkpoint is being written."""
    marker = recipe.parent / "marker"
    proc = _launch(
        config,
        recipe,
        *overrides,
        env={"GPTOSS_TEST_HANG_AT_CHECKPOINT": str(step), "GPTOSS_TEST_MARKER": str(marker)},
        wait=False,
    )
    deadline = time.time() + 300
    while not marker.exists():
        if proc.poll() is not None or time.time() > deadline:
            out = proc.communicate()[0] if proc.poll() is not None else ""
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"the run ended before its step-{step} checkpoint:\n{out[-4000:]}")
        time.sleep(0.2)
    time.sleep(1.0)  # both ranks inside the write
    # torchrun starts the ranks in sessions of their own: kill the launcher's whole tree by process id
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.communicate()[0]


def _descendants(pid: int) -> list[int]:
    """Process ids of every descendant of pid (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


_RESIDENT = re.compile(
    r"([\d.,]+) (KiB|MiB|GiB) of parameters resident per rank \(whole model ([\d.,]+) (KiB|MiB|GiB)\)"
)
_UNIT = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def _resident(out: str) -> tuple[float, float]:
    m = _RESIDENT.search(out)
    assert m, out[-3000:]
    return float(m[1].replace(",", "")) * _UNIT[m[2]], float(m[3].replace(",", "")) * _UNIT[m[4]]


def _expert_bytes(ckpt: Path) -> int:
    """Bytes of the MXFP4 blocks and scales (uint8) in the checkpoint."""
    from safetensors import safe_open

    total = 0
    for f in ckpt.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                if k.endswith(("_blocks", "_scales")):
                    total += math.prod(st.get_slice(k).get_shape())
    return total


def _same_as_reference(run: Path, reference, steps=STEPS) -> None:
    ref, ref_eval = reference
    got, got_eval = read_metrics(run)
    assert [l["step"] for l in got] == list(range(1, steps + 1))  # one line per step: only rank 0 writes
    for key in ("loss", "aux_loss", "lr"):
        assert [l[key] for l in got] == pytest.approx([l[key] for l in ref[:steps]], rel=1e-5), key
    want_eval = [l for l in ref_eval if l["step"] <= steps]
    assert [(l["step"], l["eval_loss"]) for l in got_eval] == [
        (l["step"], pytest.approx(l["eval_loss"], rel=1e-5)) for l in want_eval
    ]


def _kill_and_resume(config: str, tmp_path: Path, ckpt: Path, reference, *overrides: str) -> str:
    """SIGKILL both ranks during step 6's checkpoint (steps 1-6 logged), resume from step 3's: the resumed
    steps 4-6 repeat the killed run's exactly, and the whole run matches one process."""
    recipe = _recipe(tmp_path, ckpt, grad_accum=1)
    _kill_at_checkpoint(config, recipe, STEPS, *overrides)
    before, _ = read_metrics(tmp_path / "run")
    assert [l["step"] for l in before] == list(range(1, STEPS + 1))
    code, out = _launch(config, recipe, *overrides)
    assert code == 0, out[-4000:]
    assert "resumed from" in out and "step-00000003" in out
    after, _ = read_metrics(tmp_path / "run")
    assert [l["loss"] for l in after] == [l["loss"] for l in before]  # bit-identical after the resume
    assert [l["lr"] for l in after] == [l["lr"] for l in before]
    _same_as_reference(tmp_path / "run", reference)
    _adapter_reads_back(tmp_path, ckpt, reference)
    return out


def _adapter_reads_back(tmp_path: Path, ckpt: Path, reference) -> None:
    """Rank 0 wrote the adapter whole: loaded by itself (as the server does) it gives one process's final
    validation loss, and export reads the run."""
    import torch
    from helpers.training import synthetic_data

    from gptoss_tune.data.batching import collate
    from gptoss_tune.export.exporter import export_run
    from gptoss_tune.model.adapter import load_with_adapter
    from gptoss_tune.train.objective import Objective

    model = load_with_adapter(tmp_path / "run" / "final", base_model=ckpt, device="cpu", dtype="fp32")
    objective = Objective(model)
    total, n = 0.0, 0
    with torch.no_grad():
        for row in synthetic_data().validation:
            out = objective(**collate([row], packing=True), evaluate=True)
            total, n = total + float(out.lm_loss_sum), n + int(out.trained_tokens)
    assert total / n == pytest.approx(reference[1][-1]["eval_loss"], rel=1e-5)
    report = export_run(tmp_path / "run", "adapter", tmp_path / "export", progress=lambda _: None)
    assert (tmp_path / "export").is_dir() and report


def test_ddp_matches_one_process_and_resumes_after_sigkill(small_ckpt, reference, tmp_path):
    out = _kill_and_resume("ddp", tmp_path, small_ckpt, reference)
    assert "(DDP)" in out
    resident, whole = _resident(out)
    assert resident == whole  # a full replica per rank


def test_fsdp2_with_sharded_experts_matches_one_process_halves_bytes_and_resumes(small_ckpt, reference, tmp_path):
    out = _kill_and_resume("fsdp2", tmp_path, small_ckpt, reference, "model.shard_experts=true")
    assert "(FSDP2)" in out
    resident, whole = _resident(out)
    assert resident == pytest.approx(whole / 2, rel=0.03)  # every tensor, experts included, split in two
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000006"
    assert json.loads((ckpt / "distribution.json").read_text())["strategy"] == "fsdp2"


def test_fsdp2_idle_experts_on_one_rank_and_nan_stops_before_any_update(small_ckpt, tmp_path):
    """Rank 1 trains on 2-token rows (>= 12 of 16 experts idle on it): no hang, no unused-parameter error.
    Its loss turns NaN at step 3 (its 5th micro-batch): both ranks stop (exit 3) after exactly 2 applied updates. Without
    shard_experts the float parameters are halved and the MXFP4 buffers stay whole on each rank. The model is
    bf16 with fp32 LoRA and a trained fp32 router here: FSDP2 all-gathers the mixed dtypes of one layer and
    reduce-scatters the fp32 gradients."""
    recipe = _recipe(tmp_path, small_ckpt, grad_accum=2)  # FSDP2 accumulates over 2 micro-batches per rank
    steps_dir = tmp_path / "steps"
    steps_dir.mkdir()
    code, out = _launch(
        "fsdp2",
        recipe,
        "model.dtype=bf16",
        "router.train=true",
        env={"GPTOSS_TEST_SHORT_RANK": "1", "GPTOSS_TEST_NAN_AT": "5:1", "GPTOSS_TEST_STEPS_DIR": str(steps_dir)},
    )
    # the ranks exit 3 (TrainingDiverged; torchrun may stop the slower one first) and torchrun exits 1
    assert code != 0 and "exitcode  : 3" in out, out[-4000:]
    assert "step 3: the loss is not finite" in out and "stopped before applying the step" in out
    assert "[rank0]: Traceback" not in out and "[rank1]: Traceback" not in out
    for rank in (0, 1):
        assert (steps_dir / f"rank{rank}").read_text().count("step") == 2
    got, _ = read_metrics(tmp_path / "run")
    assert [l["step"] for l in got] == [1, 2]
    resident, whole = _resident(out)
    experts = _expert_bytes(small_ckpt)
    assert resident == pytest.approx(experts + (whole - experts) / 2, rel=0.03)


@needs_deepspeed
def test_zero2_accumulates_like_one_process_and_nan_stops_before_engine_step(small_ckpt, reference_accum4, tmp_path):
    """ZeRO-2 with 2 micro-batches per rank (DeepSpeed's engine.step() between them only counts) for 3 steps
    like one process with 4 (loss, lr, eval at 3); a NaN loss on rank 1 in step 4 (its 7th micro-batch) stops
    both ranks before engine.step() applies it: 3 updates on each rank."""
    recipe = _recipe(tmp_path, small_ckpt, grad_accum=2)
    steps_dir = tmp_path / "steps"
    steps_dir.mkdir()
    code, out = _launch(
        "deepspeed-zero2", recipe, env={"GPTOSS_TEST_NAN_AT": "7:1", "GPTOSS_TEST_STEPS_DIR": str(steps_dir)}
    )
    assert code != 0 and "exitcode  : 3" in out, out[-4000:]
    assert "[rank0]: Traceback" not in out and "[rank1]: Traceback" not in out
    assert "(DeepSpeed ZeRO-2)" in out and "step 4: the loss is not finite" in out
    for rank in (0, 1):
        assert (steps_dir / f"rank{rank}").read_text().count("step") == 3
    _same_as_reference(tmp_path / "run", reference_accum4, steps=3)
    resident, whole = _resident(out)
    assert resident == whole  # ZeRO-2 partitions optimizer state and gradients, not parameters


@needs_deepspeed
def test_zero3_with_sharded_experts_matches_one_process_halves_bytes_and_resumes(small_ckpt, reference, tmp_path):
    out = _kill_and_resume("deepspeed-zero3", tmp_path, small_ckpt, reference, "model.shard_experts=true")
    assert "(DeepSpeed ZeRO-3)" in out
    assert " 0 trainable parameters" not in out
    resident, whole = _resident(out)
    assert resident == pytest.approx(whole / 2, rel=0.03)


def test_launch_detection_names_the_strategy_and_refuses_what_it_cannot_run():
    """What accelerate launch exports decides the strategy; FSDP1, ZeRO-1 and NVMe offload are refused by
    name instead of running something else."""
    from gptoss_tune.errors import UserError
    from gptoss_tune.train.distributed import detect_launch

    assert detect_launch({}).strategy == "single"
    assert detect_launch({"WORLD_SIZE": "2"}).strategy == "ddp"
    assert detect_launch({"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}).strategy == "fsdp2"
    ds = {"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
    assert detect_launch(ds).strategy == "zero3" and detect_launch(ds).deepspeed["zero_stage"] == 3
    for env, words in (
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "fsdp_version is 1"),
        ({**ds, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}, "zero_stage is '1'"),
        ({**ds, "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "nvme"}, "offload_param_device: nvme"),
    ):
        with pytest.raises(UserError, match=words):
            detect_launch(env)


def test_shard_experts_holds_the_same_bytes_as_frozen_parameters(small_ckpt):
    """model.shard_experts turns the packed blocks and scales into frozen uint8 parameters under the same
    names, holding the same bytes: the model's output does not change."""
    import torch

    from gptoss_tune.model.experts import MXFP4Experts
    from gptoss_tune.model.loader import load_model
    from gptoss_tune.train.distributed import hold_experts_as_parameters

    model = load_model(small_ckpt, device="cpu")
    ids = torch.tensor([[1000, 1003, 1006, 1009, 1012]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    sizes = sum(m.resident_bytes() for m in model.modules() if isinstance(m, MXFP4Experts))
    assert hold_experts_as_parameters(model) == sizes > 0
    packed = {n: p for n, p in model.named_parameters() if n.endswith(("_blocks", "_scales"))}
    assert len(packed) == 4 * 2 and all(p.dtype == torch.uint8 and not p.requires_grad for p in packed.values())
    assert not [n for n, _ in model.named_buffers() if n.endswith(("_blocks", "_scales"))]
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_resuming_under_another_strategy_is_refused_by_name(reference, small_ckpt, tmp_path):
    """Per-rank optimizer files of FSDP2 / ZeRO differ in layout: a checkpoint resumes only under the
    strategy that wrote it (distribution.json), and the refusal says which one that was."""
    import shutil

    from helpers.training import synthetic_data

    from gptoss_tune.errors import UserError
    from gptoss_tune.runs import write_manifest

    recipe = _recipe(tmp_path, small_ckpt, grad_accum=2)
    train(load_recipe(recipe, ["train.max_steps=3"]), data=synthetic_data())
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000003"
    assert json.loads((ckpt / "distribution.json").read_text())["strategy"] == "single"
    branch = tmp_path / "branch"
    shutil.copytree(ckpt, branch)
    (branch / "distribution.json").write_text(json.dumps({"strategy": "fsdp2", "world": 2}))
    write_manifest(branch)  # as if written so: an intact checkpoint of an FSDP2 run
    with pytest.raises(UserError, match="written under FSDP2, this launch runs one process"):
        train(load_recipe(recipe, [f"resume={branch}", f"output_dir={tmp_path / 'other'}"]), data=synthetic_data())
