"""`load_model`: a transformers GptOssForCausalLM with MXFP4-resident experts, optionally with LoRA.

The model is built on the meta device (no memory), its experts swapped for `MXFP4Experts`, then
materialised on the target device and filled tensor by tensor from safetensors: at most one checkpoint
tensor is in host memory at a time, and MXFP4 experts are copied as packed uint8 without ever being
dequantised. A bf16 checkpoint (experts already dequantised, as `gate_up_proj` / `down_proj`) is
quantised to MXFP4 one layer's tensor at a time with OpenAI's rule (for training on a bf16 base), or,
with `keep_dense_experts=True` (serving a merged-bf16 export), kept dense in `DenseExperts`: quantising
a merged fine-tune loses it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open

from gptoss_kernels.mxfp4 import quantize_experts_io
from gptoss_tune.devices import resolve_device
from gptoss_tune.errors import CheckpointError, UserError
from gptoss_tune.model.attention import ROUTES, default_attn_implementation, register_attention
from gptoss_tune.model.checkpoint import CheckpointIndex, index_checkpoint, read_config, resolve_model_dir
from gptoss_tune.model.experts import DenseExperts, MXFP4Experts
from gptoss_tune.model.lora import LoraSettings, attach_lora

log = logging.getLogger(__name__)

# Attention implementations that run gpt-oss here without anything else installed: ours (gptoss_tune.model.attention)
# and transformers' eager. Others (flex_attention, hub kernels) are passed through to transformers.
KNOWN_ATTENTION = (*ROUTES, "eager")


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 where the hardware does it well; fp32 on the CPU, where bf16 matmuls are slow and lossy.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build_config(cfg: dict, attn_implementation: str = "eager"):
    from transformers import GptOssConfig

    register_attention()  # our "gptoss_sink*" names must be known before a model is built
    config = GptOssConfig.from_dict(dict(cfg))
    config._attn_implementation = attn_implementation
    return config


def build_empty_model(config, dtype: torch.dtype, dense_experts: bool = False):
    """GptOssForCausalLM on the meta device with MXFP4Experts (or DenseExperts) in every layer."""
    from transformers import GptOssForCausalLM

    experts_cls = DenseExperts if dense_experts else MXFP4Experts
    with torch.device("meta"):
        model = GptOssForCausalLM(config)
        model.to(dtype)
        for layer in model.model.layers:
            layer.mlp.experts = experts_cls(config, dtype=dtype)
            for name in ("input_layernorm", "post_attention_layernorm"):
                getattr(layer, name).float()
        model.model.norm.float()
    return model


def _expected_tensors(model) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def _dense_expert_name(name: str) -> str | None:
    """'...experts.gate_up_proj_blocks' -> '...experts.gate_up_proj' (the bf16 checkpoint's name)."""
    for proj in ("gate_up_proj", "down_proj"):
        if name.endswith(f"experts.{proj}_blocks"):
            return name[: -len("_blocks")]
    return None


# The dtypes a non-expert tensor may have on disk: gpt-oss publishes them in bf16, and fp32 holds every
# bf16 value exactly. float16 cannot (its range ends at 65,504, bf16's at 3.4e38; a converted
# checkpoint has lost values), so it is refused rather than loaded silently.
FLOAT_DTYPES = (torch.bfloat16, torch.float32)


def plan_state(model, idx: CheckpointIndex) -> tuple[dict[str, str], dict[str, str]]:
    """Check every checkpoint tensor's name, dtype and shape against the model (on any device, the meta
    device included: nothing is read but headers). Returns (model tensor -> checkpoint tensor, and
    expert blocks -> the dense bf16 expert tensor they are quantised from)."""
    expected = _expected_tensors(model)
    plan: dict[str, str] = {}  # model tensor -> checkpoint tensor
    dense_experts: dict[str, str] = {}  # blocks name -> dense checkpoint name
    for name in expected:
        if name in idx.tensors:
            plan[name] = name
            continue
        dense = _dense_expert_name(name)
        if dense is not None and dense in idx.tensors:
            dense_experts[name] = dense
            continue
        if name.endswith("_scales") and name.replace("_scales", "_blocks") in expected:
            blocks = name.replace("_scales", "_blocks")
            if _dense_expert_name(blocks) in idx.tensors:
                continue  # produced together with the blocks from the dense tensor
        raise CheckpointError(
            f"{idx.model_dir}: tensor '{name}' is missing from the checkpoint "
            f"({len(idx.tensors)} tensors in {', '.join(f.name for f in idx.files())}); "
            f"the checkpoint is incomplete or does not match its config.json"
        )
    used = set(plan.values()) | set(dense_experts.values())
    unexpected = sorted(set(idx.tensors) - used)
    if unexpected:
        more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
        raise CheckpointError(
            f"{idx.tensors[unexpected[0]].file}: unexpected tensor(s) {', '.join(unexpected[:3])}{more} "
            f"for a gpt-oss model of this config.json; the checkpoint does not match its config"
        )
    for name, src in plan.items():
        shape, dtype = expected[name]
        info = idx.tensors[src]
        if dtype == torch.uint8:
            if info.dtype != torch.uint8:
                raise CheckpointError(
                    f"{info.file}: tensor '{src}' has dtype {_dtype_name(info.dtype)}, expected uint8 (MXFP4)"
                )
        elif info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{info.file}: tensor '{src}' has dtype {_dtype_name(info.dtype)}, expected bf16 (as gpt-oss is published; "
                f"fp32 is accepted too){_FP16_HINT if info.dtype == torch.float16 else ''}"
            )
        if info.shape != shape:
            raise CheckpointError(
                f"{info.file}: tensor '{src}' has shape {list(info.shape)}, expected {list(shape)} from config.json"
            )
    for name, src in dense_experts.items():
        info = idx.tensors[src]
        blocks_shape = expected[name][0]
        E, out, g, _ = blocks_shape
        want = (E, g * 32, out)  # transformers' [E, in, out]
        if info.shape != want or info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{info.file}: tensor '{src}' has shape {list(info.shape)} and dtype {_dtype_name(info.dtype)}, "
                f"expected {list(want)} bf16 (or fp32){_FP16_HINT if info.dtype == torch.float16 else ''}"
            )
    return plan, dense_experts


_FP16_HINT = "; float16 cannot hold bf16's range, so this checkpoint was converted with loss: use the original bf16 one"


def _dtype_name(dtype) -> str:
    names = {torch.bfloat16: "bf16", torch.float16: "float16", torch.float32: "fp32", torch.uint8: "uint8"}
    return names.get(dtype, str(dtype).removeprefix("torch."))


def check_checkpoint(path: str | Path) -> dict:
    """Check a checkpoint without loading it: config.json (sizes), the shard index, and every tensor's
    name, dtype and shape in the safetensors headers against the model the config describes (built on
    the meta device: no memory, no tensor data read). Returns the config. Raises CheckpointError."""
    model_dir = resolve_model_dir(path)
    cfg = read_config(model_dir)
    idx = index_checkpoint(model_dir)
    model = _build_empty(cfg, "eager", torch.bfloat16, model_dir, None)
    plan_state(model, idx)
    return cfg


def load_state(model, idx: CheckpointIndex, device: torch.device, planned=None) -> None:
    """Copy every checkpoint tensor into the model, checking names, dtypes and shapes first."""
    plan, dense_experts = planned or plan_state(model, idx)
    state = dict(model.named_parameters())
    state.update(dict(model.named_buffers()))
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, src in plan.items():
        by_file.setdefault(idx.tensors[src].file, []).append((name, src))
    for name, src in dense_experts.items():
        by_file.setdefault(idx.tensors[src].file, []).append((name, src))
    if dense_experts:
        log.warning(
            "%s holds bf16 experts; quantising them to MXFP4 on load: lossy unless they came from MXFP4 (a fine-tune "
            "merged into them, as in a merged-bf16 export, is largely lost: serve that with `gptoss-tune serve`, "
            "which keeps them bf16, or serve the base with the adapter export)",
            idx.model_dir,
        )
    load_device = "cpu" if device.type == "meta" else str(device)
    with torch.no_grad():
        for f, items in by_file.items():
            with safe_open(str(f), framework="pt", device=load_device) as st:
                for name, src in items:
                    if name in dense_experts:
                        _quantize_into(
                            st.get_slice(src), state[name], state[name.replace("_blocks", "_scales")], device
                        )
                        continue
                    t = st.get_tensor(src)
                    state[name].copy_(t)
                    del t


def _quantize_into(dense_slice, blocks: torch.Tensor, scales: torch.Tensor, device: torch.device) -> None:
    """Quantise a checkpoint's dense [E, in, out] expert tensor into (blocks, scales) one expert at a time.

    Quantising a whole layer at once holds ~15 bytes of fp32/uint8 temporaries per weight on the device
    (32 GB for a 120b gate_up_proj, 8 GB for 20b: more than the GPUs these models are meant to fit);
    per expert it is 0.25 GB at most. MXFP4 blocks never span experts, so the result is bit-identical.
    """
    for e in range(blocks.shape[0]):
        w = dense_slice[e : e + 1].to(device)
        b, s = quantize_experts_io(w)
        blocks[e : e + 1].copy_(b)
        scales[e : e + 1].copy_(s)
        del w, b, s


def load_model(
    path: str | Path,
    lora: LoraSettings | dict | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    keep_dense_experts: bool = False,
):
    """Load a gpt-oss checkpoint as transformers' GptOssForCausalLM with MXFP4-resident experts.

    path: a checkpoint directory, or a hub id already in the local Hugging Face cache.
    lora: None for no adapter, or LoraSettings / a dict of its fields (rank, alpha, dropout, attention,
        experts): LoRA through PEFT on the attention projections and per-expert LoRA on every layer's
        experts. Only LoRA parameters are trainable; everything else is frozen.
    device: default cuda when available, else cpu. dtype: default bf16 on cuda, fp32 on cpu (the
        dtype of every non-expert weight and of the activations; experts stay MXFP4 regardless).
    attn_implementation: transformers' attention implementation name. Default "gptoss_sink"
        (gptoss_tune.model.attention): flex attention with sinks on CUDA, dense math on the CPU, packed rows
        kept apart. "gptoss_sink_flex" / "gptoss_sink_eager" force a route; "eager" is transformers' own
        (quadratic memory, and it attends across packed examples).
    keep_dense_experts: a checkpoint with dense (bf16) experts keeps them dense (`DenseExperts`, the
        model's dtype) instead of quantising them to MXFP4: what serving a merged-bf16 export needs. Not
        with expert LoRA (DenseExperts has none): then they are quantised, with a warning.
    Returns the model in eval mode.
    """
    device = resolve_device(device)
    if isinstance(dtype, str):
        try:
            dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
                     "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}[dtype]  # fmt: skip
        except KeyError:
            raise UserError(f"dtype {dtype!r} is not one of bf16, fp16, fp32") from None
    dtype = dtype or default_dtype(device)
    model_dir = resolve_model_dir(path)
    cfg = read_config(model_dir)
    idx = index_checkpoint(model_dir)
    attn = attn_implementation or default_attn_implementation(device)
    dense = keep_dense_experts and _has_dense_experts(idx)
    if dense and lora is not None and LoraSettings.coerce(lora).experts:
        log.warning("%s: expert LoRA needs MXFP4 experts; the checkpoint's bf16 experts are quantised", model_dir)
        dense = False
    model = _build_empty(cfg, attn, dtype, model_dir, attn_implementation, device, dense)
    planned = plan_state(model, idx)  # every header checked on the meta device, before any memory is taken
    model.to_empty(device=device)
    _reset_rotary(model, model.config, device)
    load_state(model, idx, device, planned)
    _load_generation_config(model, model_dir)
    model.requires_grad_(False)
    model.eval()
    model.config.name_or_path = str(path)
    model.gptoss_tune_model_dir = str(model_dir)
    if lora is not None:
        attach_lora(model, lora)
    return model


def _has_dense_experts(idx: CheckpointIndex) -> bool:
    return any(n.endswith(".mlp.experts.gate_up_proj") for n in idx.tensors)


def _build_empty(cfg: dict, attn: str, dtype, model_dir: Path, asked_attn: str | None, device=None, dense=False):
    config = build_config(cfg, attn)
    try:
        return build_empty_model(config, dtype, dense)
    except Exception as e:
        why = " ".join(str(e).split())
        if asked_attn and asked_attn not in KNOWN_ATTENTION:
            raise UserError(
                f"attn_implementation {asked_attn!r}: transformers cannot run it for gpt-oss here ({why}); "
                f"use {default_attn_implementation(device)!r} (the default) or 'eager'"
            ) from None
        if not isinstance(e, (ValueError, TypeError, AssertionError)):
            raise
        raise CheckpointError(f"{model_dir / 'config.json'}: cannot build a gpt-oss model from it ({why})") from None


def _reset_rotary(model, config, device) -> None:
    """Rotary tables are non-persistent buffers, empty after materialising from meta: compute them."""
    rotary_cls = type(model.model.rotary_emb)
    model.model.rotary_emb = rotary_cls(config=config).to(device)


def _load_generation_config(model, model_dir: Path) -> None:
    if (model_dir / "generation_config.json").is_file():
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(str(model_dir))
        except Exception as e:
            log.warning("ignoring %s: %s", model_dir / "generation_config.json", e)
