"""How long a context the device can hold while serving: the default of `--max-model-len`.

Measured after the model has loaded, so its weights are already out of the free memory:

    tokens = (free x FREE_FRACTION - RESERVE - fixed) / per_token

per_token = max_concurrency x the KV cache of one token (every request holds its own cache; only the
full-attention layers grow, sliding layers keep 127 tokens) + the prompt pass's memory per token:
  CPU   prefill runs in chunks (serve.generate): a chunk's dense scores against each token of the prompt
        (MIN_PREFILL_CHUNK rows at the least; PREFILL_SCORE_BUDGET is counted in `fixed`);
  CUDA  one pass (the flex route): the activations of one layer per prompt token, generously.
Forwards take turns on the model (one lock), so one prompt pass is counted, not max_concurrency.

Free memory: CUDA torch.cuda.mem_get_info; CPU MemAvailable, or the cgroup's limit minus its usage when
that is lower (containers). The estimate is rounded down to a multiple of 256 and capped at the model's
max_position_embeddings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from gptoss_tune.serve.generate import DENSE_ATTENTION_BYTES, MIN_PREFILL_CHUNK, PREFILL_SCORE_BUDGET

GIB = 2**30
FREE_FRACTION = 0.9  # other processes, allocator fragmentation, the tokenizer and server themselves
RESERVE = 1 * GIB
MIN_CONTEXT = 256
# CUDA prompts under FLEX_MIN_PREFILL (1,024) rows take the dense route: 1,024 x 1,024 scores per head.
CUDA_DENSE_ROWS = 1024


@dataclass
class ContextEstimate:
    tokens: int  # the context to serve (multiple of 256, at most the model's, at least MIN_CONTEXT)
    model_limit: int  # the model's max_position_embeddings
    free_bytes: int
    per_token_bytes: int
    fixed_bytes: int
    fits: bool = True  # False: not even MIN_CONTEXT tokens fit; `tokens` is MIN_CONTEXT anyway

    @property
    def limited_by_memory(self) -> bool:
        return self.tokens < self.model_limit

    def describe(self, max_concurrency: int) -> str:
        if not self.limited_by_memory:
            return f"the model's limit; {self.free_bytes / GIB:.1f} GiB free hold more"
        return (
            f"estimated: {self.free_bytes / GIB:.1f} GiB free hold {self.tokens} tokens for {max_concurrency} "
            f"concurrent request(s) at {self.per_token_bytes / 1024:.0f} KiB per token; --max-model-len to change"
        )


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def cpu_free_bytes() -> int:
    """MemAvailable, or the cgroup's remaining room when lower (a container's limit is not in /proc/meminfo)."""
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError):
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = 0
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2 ("max": no limit)
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        limit, usage = _read_int(Path(limit_file)), _read_int(Path(usage_file))
        if limit is not None and usage is not None and limit < 2**60:
            free = min(free, max(0, limit - usage))
    return free


def free_bytes(device: torch.device) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return cpu_free_bytes()


def _dtype_bytes(model) -> int:
    for name, p in model.named_parameters():
        if "self_attn" in name and p.is_floating_point():
            return p.element_size()
    return 2


def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    """One request's KV cache per token of context: keys and values of the full-attention layers."""
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    full = sum(1 for t in types if t == "full_attention")
    return full * 2 * config.num_key_value_heads * config.head_dim * dtype_bytes


def prefill_bytes_per_token(config, dtype_bytes: int, device_type: str) -> int:
    """The prompt pass's memory per prompt token (see the module docstring)."""
    if device_type != "cuda":
        return config.num_attention_heads * MIN_PREFILL_CHUNK * DENSE_ATTENTION_BYTES
    h, hd, inter = config.hidden_size, config.head_dim, config.intermediate_size
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * hd
    # residual, norms, attention and MoE outputs; q, k, v and the attention output (twice: rotary copies);
    # per routed expert its input, gate/up (2 x intermediate, and their activation) and output.
    elems = 6 * h + 2 * qkv + config.num_experts_per_tok * (4 * inter + 2 * h)
    return elems * dtype_bytes + 2 * 4 * config.num_local_experts  # router logits and weights in fp32


def estimate_context(model, max_concurrency: int, free: int | None = None) -> ContextEstimate:
    """The context (tokens) `model` can serve with `max_concurrency` requests on the memory left now."""
    device = next(model.parameters()).device
    config = model.config
    free = free_bytes(device) if free is None else free
    nbytes = _dtype_bytes(model)
    per_token = max_concurrency * kv_bytes_per_token(config, nbytes) + prefill_bytes_per_token(
        config, nbytes, device.type
    )
    if device.type == "cuda":
        fixed = RESERVE + config.num_attention_heads * CUDA_DENSE_ROWS**2 * DENSE_ATTENTION_BYTES
    else:
        fixed = RESERVE + PREFILL_SCORE_BUDGET
    model_limit = int(getattr(config, "max_position_embeddings", 131072))
    room = max(0, int(free * FREE_FRACTION) - fixed)
    tokens = min(model_limit, room // per_token // 256 * 256)
    return ContextEstimate(max(MIN_CONTEXT, tokens), model_limit, free, per_token, fixed, fits=tokens >= MIN_CONTEXT)
