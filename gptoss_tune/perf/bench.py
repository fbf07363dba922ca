"""Training-throughput benchmark at the real gpt-oss dimensions, with random weights (no checkpoint).

`scripts/bench_train.py` is the command line; this module holds the pieces so tests can reach them.

Ours: our GptOssForCausalLM with MXFP4-resident experts (whatever experts backend `MXFP4Experts`
resolves: the Triton kernels on CUDA when importable, else the plain torch reference), "gptoss_sink"
attention (compiled flex on CUDA), LoRA on attention and every expert, per-layer checkpointing, the
chunked LM loss. Baseline (the official recipe's approach): transformers' GptOssForCausalLM with bf16
experts, transformers' "eager" attention, PEFT LoRA on q/k/v/o plus `target_parameters` on every expert's
gate_up_proj and down_proj, non-reentrant gradient checkpointing, transformers' own loss.

Both models get the same weights: every tensor is drawn from a generator seeded by (seed, tensor name),
and the baseline's bf16 experts are the dequantised MXFP4 experts of ours. With LoRA B = 0 at the
start both compute the same function, so their first-step losses must agree (printed as a check
that the two runs do the same work).

FLOPs counted per trained token (N = active matmul weights per token: attention projections, router,
top-k experts, lm_head; N_lora = active LoRA weights; a = attention score+value FLOPs in the forward,
causal, per token averaged over the sequence):
  model_flops  = 4 N + 6 N_lora + 3 a   frozen base weights need no weight gradient: forward 2N,
                                        backward to the activations 2N; LoRA weights 6 per weight;
                                        attention forward a, backward 2a. Recompute not counted.
  flops_6n     = 6 (N + N_lora) + 3 a   the usual 6N convention of full fine-tuning, for comparison
                                        with other tools' MFU claims (overstates LoRA work by ~1.5x).
MFU = tokens/s x flops / peak dense bf16 FLOP/s of the device (H100/H200 SXM: 989.4 TFLOP/s).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import time
import zlib
from dataclasses import dataclass

import torch

from gptoss_tune.errors import UserError
from gptoss_tune.model.config import published_config, tiny_config

# Dense bf16 peaks; the first key found in the device name wins (PCIe and NVL parts are slower than SXM).
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200 NVL": 835.0,
    "H100": 989.4,
    "H200": 989.4,
    "B200": 2250.0,
}
GIB = 2**30


# ---------------------------------------------------------------------------------------------------
# models with random weights
# ---------------------------------------------------------------------------------------------------
def bench_config(name: str) -> dict:
    if name == "tiny":
        return tiny_config(layers=2, experts=8, top_k=2, hidden=64, heads=4, kv_heads=2, head_dim=16, sliding_window=16)
    return published_config(name)


def _gen(seed: int, name: str, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


# E8M0 exponent 120 gives MXFP4 weights of std ~2.9 * 2**-7 = 0.023, about 1/sqrt(2880) like the real model.
_SCALE_LO, _SCALE_HI = 119, 122


def _random_mxfp4(seed, name_prefix, blocks_shape, scales_shape, device):
    blocks = torch.randint(
        0, 256, blocks_shape, dtype=torch.uint8, device=device, generator=_gen(seed, name_prefix + "_blocks", device)
    )
    scales = torch.randint(
        _SCALE_LO,
        _SCALE_HI,
        scales_shape,
        dtype=torch.uint8,
        device=device,
        generator=_gen(seed, name_prefix + "_scales", device),
    )
    return blocks, scales


def _std(name: str) -> float:
    if name.endswith("sinks"):
        return 1.0
    if name.endswith("embed_tokens.weight"):
        return 1.0
    return 0.02


@torch.no_grad()
def fill_random_(model, seed: int = 0) -> None:
    """Deterministic random weights by tensor name, drawn on the model's device (nothing on the host).

    MXFP4 blocks/scales for our experts; for transformers' dense experts the dequantised same blocks,
    so both models hold the same function. Norm weights are ones.
    """
    from gptoss_kernels.mxfp4 import dequantize, packed_shapes

    for name, t in list(model.state_dict(keep_vars=True).items()):
        device = t.device
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # transformers' dense [E, in, out]
            E, d_in, d_out = t.shape
            b_shape, s_shape = packed_shapes(E, d_out, d_in)
            blocks, scales = _random_mxfp4(seed, name, b_shape, s_shape, device)
            for e in range(E):  # one expert at a time: the dense temporaries stay small
                t[e].copy_(dequantize(blocks[e], scales[e], t.dtype).t())
            del blocks, scales
        elif name.endswith("_blocks"):
            prefix = name[: -len("_blocks")]
            scales_t = model.get_buffer(prefix + "_scales")
            blocks, scales = _random_mxfp4(seed, prefix, t.shape, scales_t.shape, device)
            t.copy_(blocks)
            scales_t.copy_(scales)
        elif name.endswith("_scales"):
            continue  # filled with its blocks
        elif name.endswith("layernorm.weight") or name == "model.norm.weight":
            t.fill_(1.0)
        elif t.is_floating_point():
            x = torch.randn(t.shape, dtype=torch.float32, device=device, generator=_gen(seed, name, device))
            t.copy_(x.mul_(_std(name)))
            del x


def _meta_build(build):
    with torch.device("meta"):
        return build()


def build_ours(cfg: dict, device, dtype, seed: int = 0, attn_implementation: str | None = None):
    """Our model (MXFP4 experts) at cfg's dimensions with random weights, materialised straight on `device`."""
    from gptoss_tune.model.attention import ATTN_IMPLEMENTATION
    from gptoss_tune.model.loader import _reset_rotary, build_config, build_empty_model

    config = build_config(cfg, attn_implementation or ATTN_IMPLEMENTATION)
    model = build_empty_model(config, dtype)
    model.to_empty(device=device)
    _reset_rotary(model, config, device)
    fill_random_(model, seed)
    model.requires_grad_(False)
    return model


def build_baseline(cfg: dict, device, dtype, seed: int = 0):
    """transformers' own GptOssForCausalLM, bf16 experts, "eager" attention, the same random weights."""
    from transformers import GptOssConfig, GptOssForCausalLM

    from gptoss_tune.model.loader import _reset_rotary

    config = GptOssConfig.from_dict(dict(cfg))
    config._attn_implementation = "eager"
    config.use_cache = False

    def build():
        m = GptOssForCausalLM(config)
        m.to(dtype)
        for layer in m.model.layers:
            layer.input_layernorm.float()
            layer.post_attention_layernorm.float()
        m.model.norm.float()
        return m

    model = _meta_build(build)
    model.to_empty(device=device)
    _reset_rotary(model, config, device)
    fill_random_(model, seed)
    model.requires_grad_(False)
    return model


def dense_bytes(cfg: dict, dtype_bytes: int = 2) -> int:
    """Bytes of every weight of the model in a dense dtype (the baseline's resident size)."""
    H, V, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    I, E = cfg["intermediate_size"], cfg["num_local_experts"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    attn = H * nh * hd * 2 + H * nkv * hd * 2
    experts = E * (H * 2 * I + I * H)
    return dtype_bytes * (2 * V * H + L * (attn + experts + E * H))


# ---------------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------------
def active_params(cfg: dict, rank: int, lora_on: str) -> dict[str, int]:
    H, V, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    I, E, k = cfg["intermediate_size"], cfg["num_local_experts"], cfg["num_experts_per_tok"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    attn = H * nh * hd * 2 + H * nkv * hd * 2
    experts = k * (H * 2 * I + I * H)
    n = L * (attn + E * H + experts) + V * H
    lora_attn = rank * ((H + nh * hd) * 2 + (H + nkv * hd) * 2)
    lora_experts = k * rank * ((H + 2 * I) + (I + H)) if lora_on == "all" else 0
    return {"matmul": n, "lora": L * (lora_attn + lora_experts)}


def attention_forward_flops(cfg: dict, seq: int, doc_len: int | None = None) -> float:
    """Per token: 2 matmuls x 2 FLOPs x heads x head_dim x mean visible keys (causal; window on sliding layers)."""
    nh, hd, window = cfg["num_attention_heads"], cfg["head_dim"], cfg["sliding_window"]
    n = doc_len or seq
    total = 0.0
    for kind in cfg["layer_types"]:
        if kind == "sliding_attention" and window < n:
            visible = (window * (window + 1) / 2 + (n - window) * window) / n
        else:
            visible = (n + 1) / 2
        total += 4 * nh * hd * visible
    return total


def flops_per_token(cfg: dict, seq: int, rank: int, lora_on: str) -> dict[str, float]:
    p = active_params(cfg, rank, lora_on)
    a = attention_forward_flops(cfg, seq)
    return {
        "model_flops": 4 * p["matmul"] + 6 * p["lora"] + 3 * a,
        "flops_6n": 6 * (p["matmul"] + p["lora"]) + 3 * a,
        "active_matmul_params": p["matmul"],
        "active_lora_params": p["lora"],
        "attention_forward_flops": a,
    }


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    return peak_for_device_name(torch.cuda.get_device_name(device))


def peak_for_device_name(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


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


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(step, device, warmup: int, steps: int) -> StepResult:
    """Warm up (compilation, autotuning, allocator), then time `steps` steps one by one."""
    losses = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        losses.append(step())
    _sync(device)
    warm_peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        losses.append(step())
        _sync(device)
        seconds.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    reserved = torch.cuda.max_memory_reserved(device) / GIB if device.type == "cuda" else None
    return StepResult(seconds, losses, peak, reserved, max(warm_peak or 0, peak or 0) if peak is not None else None)


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
    from gptoss_tune.train.objective import Objective

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
    if peak:
        out["mfu"] = tps * flops["model_flops"] / (peak * 1e12)
        out["mfu_6n"] = tps * flops["flops_6n"] / (peak * 1e12)
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
    from gptoss_tune.model.attention import clear_block_mask_cache

    clear_block_mask_cache()
    _free(device)
    return {"skipped": f"out of memory ({what}): {first[:240]}", "out_of_memory": True, "peak_gib_before_oom": peak}


def run_ours(cfg, args, device, dtype) -> dict:
    return _out_of_memory("ours", device, lambda: _run_ours(cfg, args, device, dtype))


def run_baseline(cfg, args, device, dtype) -> dict:
    return _out_of_memory("baseline", device, lambda: _run_baseline(cfg, args, device, dtype))


def _run_ours(cfg, args, device, dtype) -> dict:
    from gptoss_tune.model.attention import clear_block_mask_cache
    from gptoss_tune.model.lora import LoraSettings, attach_lora
    from gptoss_tune.train.memory import build_optimizer, enable_checkpointing, training_state_bytes

    model = build_ours(cfg, device, dtype, args.seed, args.attn)
    experts = [] if args.lora_on == "attention" else ["gate_up_proj", "down_proj"]
    attach_lora(model, LoraSettings(rank=args.rank, alpha=args.alpha, experts=experts))
    if args.checkpointing:
        enable_checkpointing(model, every_n_layers=args.every_n, offload=args.offload)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = build_optimizer(model.parameters(), args.optimizer, lr=1e-4)
    ids, pos = _inputs(cfg, args.batch, args.seq, device, args.seed)
    step = ours_step_fn(model, ids, pos, optimizer, args.chunk_tokens, mixed_precision=_mixed_precision(args, device))
    res = run_steps(step, device, args.warmup, args.steps)
    backend = model.model.layers[0].mlp.experts.resolved_backend(device)
    profile = _profile(step, device, args.profile) if args.profile else None
    del model, optimizer, step
    clear_block_mask_cache()
    _free(device)
    return {
        "result": res,
        "experts_backend": backend,
        "trainable_params": trainable,
        "training_state_gib": training_state_bytes(trainable, args.optimizer) / GIB,
        "profile": profile,
    }


def _run_baseline(cfg, args, device, dtype) -> dict:
    from peft import LoraConfig, get_peft_model

    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        need = dense_bytes(cfg)
        if need > 0.9 * total:
            return {
                "skipped": f"does not fit: bf16 weights alone are {need / 1e9:.0f} GB, the device has {total / 1e9:.0f} GB"
            }
    model = build_baseline(cfg, device, dtype, args.seed)
    targets = dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    if args.lora_on == "all":
        targets["target_parameters"] = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    model = get_peft_model(
        model, LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, bias="none", **targets)
    )
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=device.type == "cuda" or None
    )
    ids, pos = _inputs(cfg, args.batch, args.seq, device, args.seed)
    step = baseline_step_fn(model, ids, pos, optimizer, mixed_precision=_mixed_precision(args, device))
    res = run_steps(step, device, args.warmup, args.steps)
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


GOALS = [
    # (model, seq, lora_on, min tokens/s, max peak GiB, min speedup over the baseline)
    ("20b", 2048, "all", 10_000, 16.0, 5.0),
    ("120b", 2048, "all", 5_000, 75.0, None),
    ("20b", 131072, "all", None, 80.0, None),
]


def check_goals(result: dict) -> list[dict]:
    out = []
    ours = result["ours"]
    for model, seq, lora_on, min_tps, max_peak, min_speedup in GOALS:
        if (result["model"], result["seq"], result["lora_on"]) != (model, seq, lora_on):
            continue
        if "skipped" in ours:  # ours did not run (out of memory): every goal of the case is missed
            out.append({"goal": f"{model} seq {seq}: runs", "value": None, "met": False, "detail": ours["skipped"]})
            continue
        checks = []
        if min_tps is not None:
            checks.append(("tokens/s", ours["tokens_per_s"], ">=", min_tps))
        if max_peak is not None and ours.get("peak_gib_with_warmup") is not None:
            # the warm-up (compilation, autotuning) counts: a run that exceeds the budget there never starts
            checks.append(("peak GiB", ours["peak_gib_with_warmup"], "<=", max_peak))
        if min_speedup is not None and result.get("speedup"):
            checks.append(("speedup", result["speedup"], ">=", min_speedup))
        for what, value, op, target in checks:
            met = value >= target if op == ">=" else value <= target
            miss = "" if met else (f"missed by {abs(value - target):.4g} ({value / target:.2f}x the target)")
            out.append({"goal": f"{model} seq {seq}: {what} {op} {target}", "value": value, "met": met, "detail": miss})
    return out


def _mixed_precision(args, device) -> str:
    """--mixed-precision, default as the training loop's train.mixed_precision "auto": bf16 on CUDA, no on the CPU."""
    return getattr(args, "mixed_precision", None) or ("bf16" if device.type == "cuda" else "no")


def run(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.model != "tiny" and device.type != "cuda" and not args.device:
        # gpt-oss at its real size on the CPU takes tens of GB of host memory (the OOM killer ends it on a
        # small machine) and hours per step: refuse unless asked for explicitly.
        raise UserError(
            f"--model {args.model} needs a CUDA device (none here); pass --device cpu to insist, or --model tiny"
        )
    dtype = (
        {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    if args.alpha is None:
        args.alpha = 2 * args.rank
    cfg = bench_config(args.model)
    flops = flops_per_token(cfg, args.seq, args.rank, args.lora_on)
    peak = peak_tflops(device, args.peak_tflops)
    tokens = args.batch * args.seq
    import transformers

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "model": args.model,
        "seq": args.seq,
        "batch": args.batch,
        "rank": args.rank,
        "alpha": args.alpha,
        "lora_on": args.lora_on,
        "dtype": str(dtype).replace("torch.", ""),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peak_tflops": peak,
        "flops_per_token": flops,
        "formula": "model_flops = 4*N + 6*N_lora + 3*a per trained token (frozen base: no weight grads); "
        "flops_6n = 6*(N + N_lora) + 3*a; mfu = tokens/s * flops / peak",
        "settings": {
            "mixed_precision": _mixed_precision(args, device),
            "checkpointing": args.checkpointing,
            "every_n": args.every_n,
            "offload": args.offload,
            "chunk_tokens": args.chunk_tokens,
            "optimizer": args.optimizer,
            "attention": args.attn or "gptoss_sink",
            "warmup": args.warmup,
            "steps": args.steps,
            "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        },  # fmt: skip
    }
    if not args.baseline_only:
        o = run_ours(cfg, args, device, dtype)
        if "skipped" in o:
            result["ours"] = o
        else:
            result["ours"] = _summary(o["result"], tokens, flops, peak)
            result["ours"].update({k: o[k] for k in ("experts_backend", "trainable_params", "training_state_gib")})
            if o["profile"]:
                result["ours"]["profile"] = o["profile"]
    if args.baseline or args.baseline_only:
        b = run_baseline(cfg, args, device, dtype)
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


def format_table(result: dict) -> str:
    rows = [("", "tokens/s", "step s", "peak GiB", "MFU", "MFU(6N)", "first loss")]
    for key in ("ours", "baseline"):
        r = result.get(key)
        if not r:
            continue
        if "skipped" in r:
            rows.append((key, r["skipped"], "", "", "", "", ""))
            continue
        f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        rows.append((key, f(r["tokens_per_s"], ",.0f"), f(r["step_s_median"], ".3f"), f(r["peak_gib"], ".2f"),
                     f(r.get("mfu"), ".1%"), f(r.get("mfu_6n"), ".1%"), f(r["loss_first"], ".4f")))  # fmt: skip
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = [
        f"gpt-oss-{result['model']} seq {result['seq']} x{result['batch']}, LoRA r={result['rank']} on {result['lora_on']}, {result['device']}"
    ]
    lines += ["  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in rows]
    if result.get("speedup"):
        lines.append(
            f"speedup {result['speedup']:.2f}x; first-step loss differs by {result['first_loss_rel_diff']:.2e} (relative)"
        )
    for g in result.get("goals", []):
        value = "" if g["value"] is None else f" (value {g['value']:.4g})"
        lines.append(f"goal {g['goal']}: {'MET' if g['met'] else 'MISSED ' + g['detail']}{value}")
    if "experts_backend" in result.get("ours", {}):
        lines.append(f"experts backend: {result['ours']['experts_backend']}")
    return "\n".join(lines)


def to_json(result: dict) -> str:
    def default(o):
        if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
            return None
        return str(o)

    return json.dumps(result, default=default)
