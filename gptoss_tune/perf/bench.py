"""Training-throughput benchmark at the real gpt-oss dimensions, with random weights (no checkpoint).

`scripts/bench_train.py` is the command line: it turns its flags into a `BenchConfig` and calls `run`.
This module times training steps of ours and of the baseline (perf.models builds both with the same
weights), survives an out-of-memory run, and returns the result dict that perf.report reads (goals,
table, JSON); perf.flops counts the FLOPs for the MFU.

Ours: our GptOssForCausalLM with MXFP4-resident experts (whatever experts backend `MXFP4Experts`
resolves: the Triton kernels on CUDA when importable, else the plain torch reference), "gptoss_sink"
attention (compiled flex on CUDA), LoRA on attention and every expert, per-layer checkpointing, the
chunked LM loss. Baseline (the official recipe's approach): transformers' GptOssForCausalLM with bf16
experts, transformers' "eager" attention, PEFT LoRA on q/k/v/o plus `target_parameters` on every expert's
gate_up_proj and down_proj, non-reentrant gradient checkpointing, transformers' own loss.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from dataclasses import dataclass

import torch

from gptoss_tune.errors import UserError
from gptoss_tune.model.attention import clear_block_mask_cache
from gptoss_tune.model.lora import LoraSettings, attach_lora
from gptoss_tune.perf.flops import FORMULA, flops_per_token, mfu, peak_tflops
from gptoss_tune.perf.models import MODELS, bench_config, build_baseline, build_ours, dense_bytes
from gptoss_tune.perf.report import check_goals
from gptoss_tune.train.memory import build_optimizer, enable_checkpointing, training_state_bytes
from gptoss_tune.train.objective import Objective

GIB = 2**30


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark case; scripts/bench_train.py's flags, one field each (same names)."""

    model: str  # "tiny", "20b" or "120b"
    seq: int  # tokens per row
    batch: int = 1
    rank: int = 8
    alpha: float | None = None  # None: 2 x rank
    lora_on: str = "all"  # "all": attention + every expert; "attention": attention only
    steps: int = 5  # timed steps (the median is reported)
    warmup: int = 2  # untimed steps first (compilation, autotuning)
    baseline: bool = False  # also run the official recipe's approach in this process
    baseline_only: bool = False
    checkpointing: bool = True
    every_n: int = 1  # checkpoint every n-th decoder layer
    offload: bool = False  # checkpointed layer inputs in pinned host memory
    chunk_tokens: int = 512  # chunked loss: tokens per chunk
    optimizer: str = "adamw"
    attn: str | None = None  # attention implementation of ours (None: gptoss_sink)
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str | None = None  # "bf16" / "fp32"; None: bf16 on CUDA, fp32 on the CPU
    mixed_precision: str | None = None  # forward autocast "bf16" / "no"; None: bf16 on CUDA, no on the CPU
    seed: int = 0
    peak_tflops: float | None = None  # device peak dense bf16 TFLOP/s for the MFU; None: by device name
    profile: int = 0  # profile this many extra steps of ours (top ops in result["ours"]["profile"])
    # Wall seconds for the whole run (a device call's slot): timed steps stop once the next one would pass
    # it (at least one is timed), and the baseline is skipped if ours used it up. None: no limit.
    time_limit_s: float | None = None

    def __post_init__(self):
        for name, value, allowed in (("model", self.model, MODELS), ("lora_on", self.lora_on, ("all", "attention")),
                                     ("dtype", self.dtype, (None, "bf16", "fp32")),
                                     ("mixed_precision", self.mixed_precision, (None, "bf16", "no"))):  # fmt: skip
            if value not in allowed:
                raise UserError(f"benchmark {name}={value!r}: choose one of {', '.join(map(str, allowed))}")
        for name in ("seq", "batch", "rank", "steps", "every_n", "chunk_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"benchmark {name}={getattr(self, name)!r}: must be at least 1")
        if self.warmup < 0 or self.profile < 0:
            raise UserError("benchmark warmup and profile must be 0 or more")
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise UserError(f"benchmark time_limit_s={self.time_limit_s!r}: must be positive (or None)")

    @property
    def lora_alpha(self) -> float:
        return 2 * self.rank if self.alpha is None else self.alpha


@dataclass(frozen=True)
class Setup:
    """What `run` resolved from a BenchConfig: the model's config dict, device, dtype, autocast."""

    config: BenchConfig
    cfg: dict
    device: torch.device
    dtype: torch.dtype
    mixed_precision: str


def resolve(config: BenchConfig) -> Setup:
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if config.model != "tiny" and device.type != "cuda" and not config.device:
        # gpt-oss at its real size on the CPU takes tens of GB of host memory (the OOM killer ends it on a
        # small machine) and hours per step: refuse unless asked for explicitly.
        raise UserError(
            f"--model {config.model} needs a CUDA device (none here); pass --device cpu to insist, or --model tiny"
        )
    if config.dtype:
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[config.dtype]
    else:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # as the training loop's train.mixed_precision "auto": bf16 on CUDA, no on the CPU
    mixed = config.mixed_precision or ("bf16" if device.type == "cuda" else "no")
    return Setup(config, bench_config(config.model), device, dtype, mixed)


# ---------------------------------------------------------------------------------------------------
# running steps
# ---------------------------------------------------------------------------------------------------
@dataclass
class StepResult:
    seconds: list[float]
    losses: list[float]
    peak_gib: float | None
    peak_reserved_gib: float | None
    peak_gib_with_warmup: float | None
    cut_by_time_limit: bool = False


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(step, device, warmup: int, steps: int, deadline: float | None = None) -> StepResult:
    """Warm up (compilation, autotuning, allocator), then time `steps` steps one by one; fewer (at least one)
    when the next step would end after `deadline` (time.monotonic())."""
    losses = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        losses.append(step())
    _sync(device)
    warm_peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, cut = [], False
    for i in range(steps):
        if i and deadline is not None and time.monotonic() + seconds[-1] > deadline:
            cut = True
            break
        _sync(device)
        t0 = time.perf_counter()
        losses.append(step())
        _sync(device)
        seconds.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    reserved = torch.cuda.max_memory_reserved(device) / GIB if device.type == "cuda" else None
    with_warmup = max(warm_peak or 0, peak or 0) if peak is not None else None
    return StepResult(seconds, losses, peak, reserved, with_warmup, cut)


def _inputs(cfg, batch, seq, device, seed):
    g = torch.Generator(device=device).manual_seed(seed + 17)
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq), device=device, generator=g)
    pos = torch.arange(seq, device=device).expand(batch, seq)
    return ids, pos


def autocast_for(device, mixed_precision: str):
    """The forward's autocast, as the training loop's accelerate(mixed_precision=...) sets it (bf16 on CUDA by
    default): LoRA and other fp32 weights then meet the activations in bf16 matmuls."""
    if mixed_precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def ours_step_fn(model, ids, pos, optimizer, chunk_tokens, aux_loss_coef: float = 0.01, mixed_precision: str = "no"):
    """One optimizer step of the training loop's objective (gptoss_tune.train.objective): chunked LM loss plus the
    load-balancing loss from every layer's router logits, the forward under the training loop's autocast.
    Returns the LM loss."""
    objective = Objective(model, chunk_tokens=chunk_tokens)
    token_mask = torch.ones_like(ids)
    device = ids.device

    def step():
        with autocast_for(device, mixed_precision):
            out = objective(input_ids=ids, labels=ids, position_ids=pos, token_mask=token_mask)
        loss = out.lm_loss_sum / out.trained_tokens
        (loss + aux_loss_coef * out.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def baseline_step_fn(model, ids, pos, optimizer, mixed_precision: str = "no"):
    def step():  # the official recipe trains with TRL's SFTTrainer, bf16=True: autocast as well
        with autocast_for(ids.device, mixed_precision):
            loss = model(input_ids=ids, position_ids=pos, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def _summary(res: StepResult, tokens_per_step: int, flops: dict, peak: float | None) -> dict:
    med = sorted(res.seconds)[len(res.seconds) // 2]
    tps = tokens_per_step / med
    out = {
        "tokens_per_s": tps,
        "step_s_median": med,
        "step_s": res.seconds,
        "peak_gib": res.peak_gib,
        "peak_reserved_gib": res.peak_reserved_gib,
        "peak_gib_with_warmup": res.peak_gib_with_warmup,
        "loss_first": res.losses[0] if res.losses else None,
        "loss_last": res.losses[-1] if res.losses else None,
    }
    out.update(mfu(tps, flops, peak))
    if res.cut_by_time_limit:
        out["cut_by_time_limit"] = True  # fewer timed steps than asked for: the median is less robust
    return out


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _out_of_memory(what: str, device, run) -> dict:
    """run() -> its dict; on a CUDA out-of-memory error a {"skipped": ...} report instead, with the device
    memory freed, so the other model still runs and what did run is still printed."""
    try:
        return run()
    except torch.cuda.OutOfMemoryError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    # Outside the except block: the traceback, and with it every tensor its frames held, is gone.
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None

    clear_block_mask_cache()
    _free(device)
    return {"skipped": f"out of memory ({what}): {first[:240]}", "out_of_memory": True, "peak_gib_before_oom": peak}


def run_ours(setup: Setup, deadline: float | None = None) -> dict:
    return _out_of_memory("ours", setup.device, lambda: _run_ours(setup, deadline))


def run_baseline(setup: Setup, deadline: float | None = None) -> dict:
    return _out_of_memory("baseline", setup.device, lambda: _run_baseline(setup, deadline))


def _run_ours(setup: Setup, deadline: float | None = None) -> dict:

    c, device = setup.config, setup.device
    model = build_ours(setup.cfg, device, setup.dtype, c.seed, c.attn)
    experts = [] if c.lora_on == "attention" else ["gate_up_proj", "down_proj"]
    attach_lora(model, LoraSettings(rank=c.rank, alpha=c.lora_alpha, experts=experts))
    if c.checkpointing:
        enable_checkpointing(model, every_n_layers=c.every_n, offload=c.offload)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = build_optimizer(model.parameters(), c.optimizer, lr=1e-4)
    ids, pos = _inputs(setup.cfg, c.batch, c.seq, device, c.seed)
    step = ours_step_fn(model, ids, pos, optimizer, c.chunk_tokens, mixed_precision=setup.mixed_precision)
    res = run_steps(step, device, c.warmup, c.steps, deadline)
    backend = model.model.layers[0].mlp.experts.resolved_backend(device)
    profile = _profile(step, device, c.profile) if c.profile else None
    del model, optimizer, step
    clear_block_mask_cache()
    _free(device)
    return {
        "result": res,
        "experts_backend": backend,
        "trainable_params": trainable,
        "training_state_gib": training_state_bytes(trainable, c.optimizer) / GIB,
        "profile": profile,
    }


def _run_baseline(setup: Setup, deadline: float | None = None) -> dict:
    from peft import LoraConfig, get_peft_model

    c, device = setup.config, setup.device
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        need = dense_bytes(setup.cfg)
        if need > 0.9 * total:
            return {
                "skipped": f"does not fit: bf16 weights alone are {need / 1e9:.0f} GB, the device has {total / 1e9:.0f} GB"
            }
    model = build_baseline(setup.cfg, device, setup.dtype, c.seed)
    targets = dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    if c.lora_on == "all":
        targets["target_parameters"] = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    model = get_peft_model(
        model, LoraConfig(r=c.rank, lora_alpha=c.lora_alpha, lora_dropout=0.0, bias="none", **targets)
    )
    if c.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=device.type == "cuda" or None
    )
    ids, pos = _inputs(setup.cfg, c.batch, c.seq, device, c.seed)
    step = baseline_step_fn(model, ids, pos, optimizer, mixed_precision=setup.mixed_precision)
    res = run_steps(step, device, c.warmup, c.steps, deadline)
    experts_impl = getattr(model.base_model.model.config, "_experts_implementation", None)
    del model, optimizer, step
    _free(device)
    return {"result": res, "trainable_params": trainable, "experts_implementation": experts_impl}


def _profile(step, device, n: int) -> str:
    """Top ops by device time over n profiled steps (the 'why' when a goal is missed)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=False) as prof:
        for _ in range(n):
            step()
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"  # valid in torch 2.11-2.13
    return prof.key_averages().table(sort_by=key, row_limit=25)


def run(config: BenchConfig, on_partial=None) -> dict:
    """Measure the case `config` names; returns the result dict (JSON-able through perf.report.to_json).

    on_partial(result) is called with ours' result before the baseline starts (with an "incomplete" key),
    so a caller that may be killed meanwhile can keep what was measured."""
    deadline = time.monotonic() + config.time_limit_s if config.time_limit_s else None
    setup = resolve(config)
    device, c = setup.device, config
    flops = flops_per_token(setup.cfg, c.seq, c.rank, c.lora_on)
    peak = peak_tflops(device, c.peak_tflops)
    tokens = c.batch * c.seq
    import transformers

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "model": c.model,
        "seq": c.seq,
        "batch": c.batch,
        "rank": c.rank,
        "alpha": c.lora_alpha,
        "lora_on": c.lora_on,
        "dtype": str(setup.dtype).replace("torch.", ""),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peak_tflops": peak,
        "flops_per_token": flops,
        "formula": FORMULA,
        "settings": {
            "mixed_precision": setup.mixed_precision,
            "checkpointing": c.checkpointing,
            "every_n": c.every_n,
            "offload": c.offload,
            "chunk_tokens": c.chunk_tokens,
            "optimizer": c.optimizer,
            "attention": c.attn or "gptoss_sink",
            "warmup": c.warmup,
            "steps": c.steps,
            "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
            "time_limit_s": c.time_limit_s,
        },  # fmt: skip
    }
    if not c.baseline_only:
        o = run_ours(setup, deadline)
        if "skipped" in o:
            result["ours"] = o
        else:
            result["ours"] = _summary(o["result"], tokens, flops, peak)
            result["ours"].update({k: o[k] for k in ("experts_backend", "trainable_params", "training_state_gib")})
            if o["profile"]:
                result["ours"]["profile"] = o["profile"]
    if c.baseline or c.baseline_only:
        if on_partial is not None and "ours" in result:
            on_partial({**result, "incomplete": "the baseline was still to run"})
        if deadline is not None and time.monotonic() >= deadline:
            b = {"skipped": f"time limit: ours used the {c.time_limit_s:g} s of --time-limit"}
        else:
            b = run_baseline(setup, deadline)
        if "skipped" in b:
            result["baseline"] = b
        else:
            result["baseline"] = _summary(b["result"], tokens, flops, peak)
            result["baseline"].update(
                {"trainable_params": b["trainable_params"], "experts_implementation": b["experts_implementation"]}
            )
            if "ours" in result and "skipped" not in result["ours"]:
                result["speedup"] = result["ours"]["tokens_per_s"] / result["baseline"]["tokens_per_s"]
                lo, lb = result["ours"]["loss_first"], result["baseline"]["loss_first"]
                result["first_loss_rel_diff"] = abs(lo - lb) / abs(lb) if lb else None
    if "ours" in result:
        result["goals"] = check_goals(result)
    return result
