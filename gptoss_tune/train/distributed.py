"""Which distribution strategy a launch runs, and the wrapping each one needs (the trainer's call sites).

    single   one process
    ddp      accelerate's DDP (distributed_type MULTI_GPU / MULTI_CPU): a full replica per rank
    fsdp2    torch fully_shard per decoder layer (+ lm_head, + the root) on a 1-D device mesh of the ranks
    zero2    DeepSpeed ZeRO-2 (optimizer state and gradients partitioned), deepspeed.initialize directly
    zero3    DeepSpeed ZeRO-3 (parameters partitioned too)

The strategy comes from what `accelerate launch --config_file ...` exported (ACCELERATE_USE_FSDP,
FSDP_VERSION, ACCELERATE_USE_DEEPSPEED, ACCELERATE_DEEPSPEED_ZERO_STAGE, ...), not from the Accelerator:
with `cpu=True` accelerate silently turns an FSDP config into DDP and refuses DeepSpeed, so CPU ranks
never ran sharded code. Here the Accelerator is built with those variables hidden (it then only owns the
process group, the device, autocast and the small all-reduces) and the model is wrapped by us, on GPU and
CPU (gloo) alike; what cannot be honoured (FSDP1, ZeRO stage 1, NVMe offload) is a UserError, never a
silent fallback.

Mixed precision: the recipe's train.mixed_precision (autocast) decides under every strategy; FSDP2 keeps
each parameter's own dtype (fp32 LoRA, bf16 frozen weights) and reduces gradients in fp32; DeepSpeed runs
without its bf16/fp16 sections (those would cast the fp32 LoRA, norms and router to bf16).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from gptoss_tune.atomic_io import atomic_write_text
from gptoss_tune.errors import UserError
from gptoss_tune.model.experts import MXFP4Experts
from gptoss_tune.train.chunked_ce import lm_eval_sums, lm_loss_sum

STRATEGY_NAMES = {
    "single": "one process",
    "ddp": "DDP",
    "fsdp2": "FSDP2",
    "zero2": "DeepSpeed ZeRO-2",
    "zero3": "DeepSpeed ZeRO-3",
}
_HIDDEN_FROM_ACCELERATE = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
EXPERT_PACKED = ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales")


@dataclass
class Launch:
    """What the launch asked for: the strategy and, for DeepSpeed, the accelerate config's fields."""

    strategy: str
    world: int
    deepspeed: dict = field(default_factory=dict)  # zero_stage, offload devices, gradient_clipping, config file

    @property
    def name(self) -> str:
        return STRATEGY_NAMES[self.strategy]

    @property
    def sharded(self) -> bool:
        """Per-rank optimizer state (one file per rank in a checkpoint)."""
        return self.strategy in ("fsdp2", "zero2", "zero3")

    @property
    def partitions_parameters(self) -> bool:
        """Each rank holds a part of every trainable parameter (ZeRO-2 keeps them whole, like DDP)."""
        return self.strategy in ("fsdp2", "zero3")

    @property
    def deepspeed_engine(self) -> bool:
        return self.strategy in ("zero2", "zero3")


def _true(v: str | None) -> bool:
    return str(v).lower() in ("1", "true", "yes")


def detect_launch(env=None) -> Launch:
    """The strategy of this launch from accelerate's environment; a UserError for what cannot run."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if _true(env.get("ACCELERATE_USE_FSDP")):
        version = env.get("FSDP_VERSION", "1")
        if version != "2":
            raise UserError(
                f"accelerate config: fsdp_config.fsdp_version is {version}; gptoss-tune runs FSDP2 only "
                f"(set fsdp_version: 2, as recipes/accelerate/fsdp2.yaml does)"
            )
        if _true(env.get("FSDP_OFFLOAD_PARAMS")):
            raise UserError(
                "accelerate config: fsdp_config.fsdp_offload_params: true is not supported; set it to false "
                "(train.offload_activations / the memory settings of the recipe offload what helps here)"
            )
        return Launch("fsdp2", world)
    if _true(env.get("ACCELERATE_USE_DEEPSPEED")):
        ds = {
            "zero_stage": env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"),
            "offload_optimizer_device": env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none"),
            "offload_param_device": env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none"),
            "gradient_clipping": env.get("ACCELERATE_GRADIENT_CLIPPING"),
            "config_file": env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"),
        }
        stage = ds["zero_stage"]
        if stage is None and ds["config_file"]:
            stage = str(_read_ds_file(ds["config_file"]).get("zero_optimization", {}).get("stage", ""))
        if stage not in ("2", "3"):
            raise UserError(
                f"accelerate config: deepspeed_config.zero_stage is {stage!r}; gptoss-tune runs ZeRO stage 2 or 3 "
                f"(recipes/accelerate/deepspeed-zero2.yaml, deepspeed-zero3.yaml); use ddp.yaml for no partitioning"
            )
        for key in ("offload_optimizer_device", "offload_param_device"):
            if ds[key] not in ("none", "cpu", None):
                raise UserError(
                    f"accelerate config: deepspeed_config.{key}: {ds[key]} is not supported; use none or cpu"
                )
        ds["zero_stage"] = int(stage)
        return Launch(f"zero{stage}", world, ds)
    return Launch("ddp" if world > 1 else "single", world)


def _read_ds_file(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: the accelerate config's deepspeed_config_file cannot be read as JSON ({e})") from None


@contextlib.contextmanager
def hidden_from_accelerate(launch: Launch):
    """Build the Accelerator inside this: under FSDP2/DeepSpeed it must set up a plain multi-process state
    (process group, device), not its own FSDP/DeepSpeed plugin; the trainer wraps the model itself."""
    saved = {}
    if launch.strategy in ("fsdp2", "zero2", "zero3"):
        saved = {k: os.environ.pop(k) for k in _HIDDEN_FROM_ACCELERATE if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


# ---- the MXFP4 experts as frozen parameters --------------------------------------------------------------


def hold_experts_as_parameters(model) -> int:
    """model.shard_experts: re-register every MXFP4Experts' packed blocks and scales (uint8 buffers, whole on
    every rank) as frozen uint8 parameters, which FSDP2 shards per decoder layer and ZeRO-3 partitions;
    inside a layer's forward both hand the kernels the full tensors again. Same tensors, same names (the
    state-dict keys do not change). Returns the bytes moved."""
    moved = 0
    for m in model.modules():
        if isinstance(m, MXFP4Experts):
            for name in EXPERT_PACKED:
                t = m._buffers.pop(name, None)
                if t is None:
                    continue
                m.register_parameter(name, nn.Parameter(t, requires_grad=False))
                moved += t.numel() * t.element_size()
    return moved


# ---- bytes per rank ------------------------------------------------------------------------------------


def _local_bytes(t: torch.Tensor) -> int:
    if hasattr(t, "ds_tensor"):  # a ZeRO-3 partitioned parameter: this rank's partition
        return t.ds_tensor.numel() * t.ds_tensor.element_size()
    if hasattr(t, "to_local"):  # an FSDP2 DTensor: this rank's shard
        t = t.to_local()
    return t.numel() * t.element_size()


def _whole_numel(t: torch.Tensor) -> int:
    return t.ds_numel if hasattr(t, "ds_numel") else t.numel()


def resident_bytes(module: nn.Module) -> int:
    """Bytes of parameters and buffers this rank holds (its shards where sharded)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += _local_bytes(t)
    return total


def whole_bytes(module: nn.Module) -> int:
    """Bytes of the full model's parameters and buffers (what one unsharded replica holds)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += _whole_numel(t) * t.element_size()
    return total


def trainable_numel(params) -> int:
    """Trainable parameters counted whole (ZeRO-3 leaves numel() == 0 on a partitioned parameter)."""
    return sum(_whole_numel(p) for p in params)


def _size(n: int) -> str:
    unit = "GiB" if n >= 2**30 else "MiB" if n >= 2**20 else "KiB"
    return f"{n / {'GiB': 2**30, 'MiB': 2**20, 'KiB': 2**10}[unit]:.4g} {unit}"


def resident_summary(module: nn.Module) -> str:
    """The start line's memory figure: parameters and buffers on this rank against one whole replica."""
    return f"{_size(resident_bytes(module))} of parameters resident per rank (whole model {_size(whole_bytes(module))})"


# ---- FSDP2 ----------------------------------------------------------------------------------------------


def _chunked_loss(self, hidden, labels, chunk_tokens: int, evaluate: bool):
    """lm_head's own method for the objective's loss, so FSDP2 unshards lm_head.weight around it (the
    objective reads the weight outside lm_head's forward: the logits are never formed whole)."""
    if evaluate:
        return lm_eval_sums(hidden, self.weight, labels, chunk_tokens)
    return lm_loss_sum(hidden, self.weight, labels, chunk_tokens=chunk_tokens)


def shard_fsdp2(objective: nn.Module, model, device: torch.device) -> nn.Module:
    """fully_shard each decoder layer, lm_head (with its chunked-loss method registered) and the root (the
    embeddings and final norm) on a 1-D mesh of all ranks; reductions in fp32, parameters in their own dtypes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    world = torch.distributed.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    # param_dtype None: LoRA stays fp32 and frozen weights bf16 in compute (autocast does the casts, as
    # under DDP); reduce_dtype fp32: LoRA gradients are averaged in fp32 (accelerate's bf16 policy reduced
    # them in bf16: 4.6e-4 relative drift from DDP by step 2).
    mp = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    kw = {"mesh": mesh, "mp_policy": mp}
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    head = model.lm_head
    head.chunked_loss = types.MethodType(_chunked_loss, head)
    fully_shard(head, **kw)
    register_fsdp_forward_method(head, "chunked_loss")
    fully_shard(objective, **kw)
    return objective


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class LocalOptimizerState:
    """An FSDP2 optimizer's state as plain tensors (this rank's shards) for a per-rank checkpoint file, and
    back: loading wraps each shard as a DTensor like its parameter again."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def state_dict(self) -> dict:
        sd = self.optimizer.state_dict()
        sd["state"] = {
            k: {n: (v.to_local() if hasattr(v, "to_local") else v) for n, v in s.items()}
            for k, s in sd["state"].items()
        }
        return sd

    def load_state_dict(self, sd: dict) -> None:
        from torch.distributed.tensor import DTensor

        self.optimizer.load_state_dict(sd)
        for p, s in self.optimizer.state.items():
            if not isinstance(p, DTensor):
                continue
            for n, v in list(s.items()):
                if isinstance(v, torch.Tensor) and not isinstance(v, DTensor) and v.shape == p.to_local().shape:
                    s[n] = DTensor.from_local(
                        v.to(p.device), p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
                    )


# ---- DeepSpeed ------------------------------------------------------------------------------------------


def import_deepspeed(cpu: bool):
    """deepspeed, set up for this machine: on CPU ranks its CPU accelerator over our gloo group, without
    building its shared-memory communication op (a C++ build at first use; gloo does the work here)."""
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed

        # not `import deepspeed.comm.torch as ...`: deepspeed.comm's attribute `torch` is torch itself
        ds_torch = importlib.import_module("deepspeed.comm.torch")
    except ImportError as e:
        raise UserError(
            f"accelerate config asks for DeepSpeed, which does not import here ({e}); "
            f"pip install --no-build-isolation 'gptoss-tune[deepspeed]', or launch with recipes/accelerate/fsdp2.yaml"
        ) from None
    if cpu:
        ds_torch.build_shm_op = lambda: None
    return deepspeed


def deepspeed_config(launch: Launch, cfg, num_processes: int) -> dict:
    """The DeepSpeed config of this run: ZeRO stage and offload from the accelerate config (or its
    deepspeed_config_file), batch sizes and accumulation from the recipe, gradient clipping =
    train.max_grad_norm. No scheduler (ours is stepped once per optimizer step) and no bf16/fp16 section."""
    ds = launch.deepspeed
    base = _read_ds_file(ds["config_file"]) if ds.get("config_file") else {}
    zero = dict(base.get("zero_optimization", {}))
    zero["stage"] = ds["zero_stage"]
    # ZeRO-3 otherwise replaces torch.nn.functional.linear, process-wide, by a matmul followed by a separate
    # bias add: in bf16 that rounds twice (0.26% off DDP's loss at the first step of the tiny bf16 model).
    zero.setdefault("memory_efficient_linear", False)
    for key, target in (("offload_optimizer_device", "offload_optimizer"), ("offload_param_device", "offload_param")):
        if ds.get(key) == "cpu":
            zero[target] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * num_processes,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def init_deepspeed(deepspeed, objective: nn.Module, model, optimizer, config: dict):
    """deepspeed.initialize over our objective and optimizer; returns the engine. Under ZeRO-3 lm_head.weight
    is registered as an external parameter of the objective, which reads it outside lm_head's forward."""
    if config["zero_optimization"]["stage"] == 3:
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter

        engine, *_ = deepspeed.initialize(model=objective, optimizer=optimizer, config=config)
        register_external_parameter(objective, model.lm_head.weight)
        return engine
    engine, *_ = deepspeed.initialize(model=objective, optimizer=optimizer, config=config)
    return engine


def deepspeed_base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW inside the ZeRO optimizer (over this rank's fp32 partitions): its param_groups carry
    the learning rate DeepSpeed uses, so our schedule steps it."""
    return engine.optimizer.optimizer


class DeepSpeedOptimizerState:
    """This rank's AdamW state under ZeRO-2/3 as plain tensors (exp_avg, exp_avg_sq, step of each fp32
    partition), saved and loaded by us: DeepSpeed's own checkpoints are pickles, and the model's trainable
    weights come from the adapter, loaded before deepspeed.initialize partitions them."""

    def __init__(self, engine):
        zero = engine.optimizer
        self.optimizer = zero.optimizer
        # ZeRO-3 puts each partition into param_groups only during step(): key the state by partition index
        flats = getattr(zero, "fp32_partitioned_groups_flat", None)
        self.partitions = list(flats if flats is not None else zero.single_partition_of_fp32_groups)

    def state_dict(self) -> dict:
        state = {}
        for i, flat in enumerate(self.partitions):
            if flat in self.optimizer.state:
                state[i] = dict(self.optimizer.state[flat])
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        return {"state": state, "param_groups": groups, "partitions": [int(p.numel()) for p in self.partitions]}

    def load_state_dict(self, sd: dict) -> None:
        sizes = [int(p.numel()) for p in self.partitions]
        if list(sd.get("partitions", [])) != sizes:
            raise UserError(
                f"the checkpoint's DeepSpeed optimizer partitions ({sd.get('partitions')}) do not match this launch's "
                f"({sizes}); resume with the same number of processes and accelerate config"
            )
        for i, s in sd["state"].items():
            flat = self.partitions[int(i)]
            self.optimizer.state[flat] = {
                k: (v.to(flat.device) if isinstance(v, torch.Tensor) and v.dim() else v) for k, v in s.items()
            }
        for group, saved in zip(self.optimizer.param_groups, sd["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})


def deepspeed_grad_norm(params) -> float:
    """The global gradient norm after the last backward of a step, before engine.step() applies it (every rank
    must call this: ZeRO-3 gathers the partitions)."""
    from deepspeed.utils import safe_get_full_grad

    total = 0.0
    for p in params:
        g = safe_get_full_grad(p)
        if g is not None:
            total += float(g.double().pow(2).sum())
    return total**0.5


# ---- which strategy wrote a checkpoint -------------------------------------------------------------------

DISTRIBUTION = "distribution.json"


def write_checkpoint_strategy(ckpt_dir: Path, launch: Launch) -> None:
    """Main process: distribution.json in a checkpoint being written (the per-rank optimizer files of FSDP2,
    ZeRO-2 and ZeRO-3 differ in layout; a resume under another strategy is refused by name)."""
    atomic_write_text(
        Path(ckpt_dir) / DISTRIBUTION, json.dumps({"strategy": launch.strategy, "world": launch.world}) + "\n"
    )


def read_checkpoint_strategy(ckpt_dir: Path) -> str | None:
    """The strategy that wrote a checkpoint; None for checkpoints written before this file existed."""
    try:
        return str(json.loads((Path(ckpt_dir) / DISTRIBUTION).read_text())["strategy"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
