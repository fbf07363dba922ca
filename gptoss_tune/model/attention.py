"""Sink-aware attention for gpt-oss, registered with transformers as "gptoss_sink".

gpt-oss attention is causal, slides over the last 128 positions (the current one included) on even
layers, and has one learned "sink" logit per head in the softmax denominator that carries no value.
With lse = logsumexp of the visible scores of a query row,

    out = softmax([scores, sink])[:-1] @ V = out_without_sink * sigmoid(lse - sink)

so any attention kernel that returns its lse gives the sink for free, gradient included (the sigmoid
term is differentiable in lse and in the sink; flex_attention differentiates through its lse output).

Two routes compute the same function:
  flex   torch's flex_attention (compiled) with a BlockMask built from causal + window + documents +
         padding: memory linear in the sequence length. CUDA; on the CPU it runs uncompiled and forward
         only (torch 2.13 refuses the backward there), which the tests use to check the block masks.
  eager  plain dense math (scores [B, H, Q, K] in fp32): the CPU path, the decode path (q_len 1 against
         a KV cache) and the reference. Quadratic memory.
"gptoss_sink" picks flex on CUDA for training (>= FLEX_MIN_QUERY query rows) and long prefills
(>= FLEX_MIN_PREFILL rows), eager otherwise (decode, short prompts, the CPU);
"gptoss_sink_flex" / "gptoss_sink_eager" force one route.

Packed rows. The training batches carry no attention_mask and position ids that restart at 0 at every
packed example (gptoss_tune.data.batching). transformers' gpt-oss model does not hand position_ids to its
mask builders (checked in transformers 5.17 and 5.23), so its own "eager" attention attends ACROSS
packed examples. Here every layer receives position_ids as a keyword argument, and document ids are
derived from it exactly as transformers' `find_packed_sequence_indices` does (a new example starts where
the position does not increase by one), only when there is no 2D attention_mask and no KV cache offset
(the same condition transformers uses), so generation is unaffected.

Masks. A mask function registered under the same names hands every layer a `SinkMask` (sizes, cache
offsets, padding) instead of a dense [B, 1, Q, K] tensor. transformers builds one per layer type per
forward, so all sliding layers share one and all full layers share another; the BlockMask built from
it is cached on it (and in a small LRU keyed by the mask's content, so steps with the same packing
layout reuse it).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

ATTN_IMPLEMENTATION = "gptoss_sink"
ATTN_FLEX = "gptoss_sink_flex"
ATTN_EAGER = "gptoss_sink_eager"
ROUTES = {ATTN_IMPLEMENTATION: "auto", ATTN_FLEX: "flex", ATTN_EAGER: "eager"}

# "gptoss_sink" on CUDA takes the flex route for training (gradients needed) from this many query rows,
# and for inference only from FLEX_MIN_PREFILL rows: a decode step (1 row) or a short prefill is cheaper
# densely than building a block mask, and serving then never waits for flex to compile for each new
# prompt length. 1,024 rows x 1,024 keys x 64 heads of fp32 scores is 268 MB per sequence.
FLEX_MIN_QUERY = int(os.environ.get("GPTOSS_TUNE_FLEX_MIN_QUERY", "16"))
FLEX_MIN_PREFILL = int(os.environ.get("GPTOSS_TUNE_FLEX_MIN_PREFILL", "1024"))
BLOCK_MASK_CACHE_SIZE = 8


# ---------------------------------------------------------------------------------------------------
# the mask handed to every layer
# ---------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class SinkMask:
    """What our mask function returns instead of a dense mask: everything a layer needs to build its own.

    Positions: query row i is absolute position i + q_offset, key column j is absolute j + kv_offset.
    padding: bool [B, >= kv_offset + kv_length] (True = real token), or None when the model was called
    without a 2D attention_mask (then packed rows are recognised from position_ids).
    """

    batch_size: int
    q_length: int
    kv_length: int
    q_offset: int | torch.Tensor = 0
    kv_offset: int | torch.Tensor = 0
    padding: torch.Tensor | None = None
    # per-forward memo: (window, position_ids object) -> (documents, BlockMask or None)
    _memo: list = field(default_factory=list, repr=False)

    @property
    def has_offsets(self) -> bool:
        return not (_is_zero(self.q_offset) and _is_zero(self.kv_offset))


def _is_zero(x) -> bool:
    return (x == 0) if isinstance(x, int) else False


def sink_mask_interface(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> SinkMask:
    """Registered in transformers' AttentionMaskInterface; called once per layer type per forward.

    transformers' `mask_function` (causal, or sliding causal) is not used: the window comes from each
    attention module, causality is always on, and packing comes from position_ids.
    """
    padding = None
    if attention_mask is not None:
        padding = attention_mask.to(torch.bool)
        need = int(kv_offset) + kv_length if not isinstance(kv_offset, torch.Tensor) else None
        if need is not None and padding.shape[-1] < need:
            padding = torch.nn.functional.pad(padding, (0, need - padding.shape[-1]))
    return SinkMask(batch_size, q_length, kv_length, q_offset, kv_offset, padding)


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] example index per token: a new example starts where the position does not grow by one."""
    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)


def make_mask_mod(
    window: int | None,
    q_offset=0,
    kv_offset=0,
    padding: torch.Tensor | None = None,
    documents: torch.Tensor | None = None,
):
    """The visibility rule as a flex mask_mod; also evaluated densely (broadcast indices) by the eager route."""

    def mask_mod(b, h, q_idx, kv_idx):
        q_pos = q_idx + q_offset
        kv_pos = kv_idx + kv_offset
        visible = kv_pos <= q_pos
        if window is not None:
            visible = visible & (q_pos - kv_pos < window)
        if padding is not None:
            visible = visible & padding[b, kv_pos]
        if documents is not None:
            visible = visible & (documents[b, q_idx] == documents[b, kv_idx])
        return visible

    return mask_mod


def dense_mask(mask_mod, batch_size: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    """bool [B, 1, Q, K] from a mask_mod, by broadcasting index tensors (no vmap)."""
    b = torch.arange(batch_size, device=device).view(-1, 1, 1, 1)
    q = torch.arange(q_len, device=device).view(1, 1, -1, 1)
    kv = torch.arange(kv_len, device=device).view(1, 1, 1, -1)
    return mask_mod(b, 0, q, kv).expand(batch_size, 1, q_len, kv_len)


# ---------------------------------------------------------------------------------------------------
# the two routes
# ---------------------------------------------------------------------------------------------------
def apply_sinks(out_without_sink: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """out [B, H, Q, D] * sigmoid(lse [B, H, Q] - sink [H]); the factor in fp32, the product in out's dtype.

    A query that sees no key (lse = -inf) gets 0, as softmax over [nothing, sink] would give.
    """
    acc = torch.float64 if lse.dtype == torch.float64 else torch.float32
    factor = torch.sigmoid(lse.to(acc) - sinks.to(acc).view(1, -1, 1))
    return out_without_sink * factor.unsqueeze(-1).to(out_without_sink.dtype)


def dense_attention_lse(
    query, key, value, mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, training: bool = False
):
    """(out_without_sink [B, H, Q, D], lse [B, H, Q] fp32) by dense math; mask: bool (True = visible) or additive float.

    Scores, softmax and lse in fp32 (fp64 for fp64 inputs). Masked scores get the most negative value
    rather than -inf, so a fully masked row stays finite (uniform weights, lse ~ -3.4e38, hence a zero
    sink factor) and its gradient is zero, not NaN.
    """
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32  # fp64 only for tests
    scores = torch.matmul(query, key.transpose(-1, -2)).to(acc) * scaling
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(acc).min)
        else:
            scores = (scores + mask.to(acc)).clamp(min=torch.finfo(acc).min)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    if dropout > 0.0 and training:
        probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs.to(value.dtype), value)
    return out, lse


# torch.compile keeps at most dynamo's `recompile_limit` (8 by default) compiled versions of a function
# and past that runs it UNCOMPILED, with only a log warning: flex_attention then computes dense
# [B, H, Q, K] scores and create_block_mask a dense [B, 1, Q, K] mask (17 GB at 131,072 tokens). A training
# run compiles each once per window (2) x mask kind (plain, packed, padded) x grad mode (training, and
# evaluation under no_grad), plus a static-shape version of each before dynamo makes the sequence length
# dynamic: more than 8 within one run (tests/model/test_attention.py counts them). Hence the higher limit.
RECOMPILE_LIMIT = 64
COMPILE_BACKEND = "inductor"  # tests use "eager": the same guards and recompiles without code generation
COMPILE_ON_CPU = False  # tests: exercise the compiled routes' caching on the CPU
_COMPILED: dict = {}


def _ensure_recompile_headroom() -> None:
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    if getattr(dynamo_config, name) < RECOMPILE_LIMIT:
        setattr(dynamo_config, name, RECOMPILE_LIMIT)


def _compiled(fn):
    """torch.compile(fn) once per backend, with room for every variant a training run needs."""
    key = (fn.__name__, COMPILE_BACKEND)
    if key not in _COMPILED:
        _ensure_recompile_headroom()
        _COMPILED[key] = torch.compile(fn, backend=COMPILE_BACKEND)
    return _COMPILED[key]


def _use_compiled(device) -> bool:
    return (torch.device(device).type == "cuda" or COMPILE_ON_CPU) and not torch.compiler.is_compiling()


def _flex_fn(device: torch.device):
    """Compiled flex_attention on CUDA (fused kernels, linear memory); the uncompiled one elsewhere."""
    # inside a compiled model, dynamo compiles flex_attention with the rest
    return _compiled(flex_attention) if _use_compiled(device) else flex_attention


def flex_attention_lse(query, key, value, block_mask, scaling: float):
    """(out_without_sink [B, H, Q, D], lse [B, H, Q] fp32) through flex_attention; the lse is differentiable."""
    if query.device.type != "cuda":
        if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
            raise NotImplementedError(
                "the flex attention route has no backward on the CPU in torch; use attn_implementation "
                f"'{ATTN_IMPLEMENTATION}' or '{ATTN_EAGER}' to train on the CPU"
            )
        # torch refuses CPU inputs that require grad even under no_grad
        query, key, value = query.detach(), key.detach(), value.detach()
    out, aux = _flex_fn(query.device)(
        query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1],
        return_aux=AuxRequest(lse=True),
    )  # fmt: skip
    return out, aux.lse


_BLOCK_MASKS: OrderedDict = OrderedDict()


def _content_key(t: torch.Tensor | None):
    if t is None:
        return None
    return (tuple(t.shape), t.detach().to("cpu").numpy().tobytes())


def build_block_mask(mask_mod, batch_size: int, q_len: int, kv_len: int, device, batched: bool):
    # On CUDA the compiled builder never materialises the Q x K mask (131k^2 bools would be 17 GB).
    # torch.compile(create_block_mask) is what torch recommends over its deprecated `_compile=True`.
    build = _compiled(create_block_mask) if _use_compiled(device) else create_block_mask
    return build(mask_mod, B=batch_size if batched else None, H=None, Q_LEN=q_len, KV_LEN=kv_len, device=device)


def _block_mask_for(spec: SinkMask, window, documents, q_len, kv_len, device):
    """The BlockMask for one (sizes, offsets, window, documents, padding); LRU-cached by content."""
    if documents is not None and not bool(documents[:, -1].any()):
        documents = None  # one example per row: plain causal blocks, shared with unpacked batches
    if not isinstance(spec.q_offset, int) or not isinstance(spec.kv_offset, int):
        key = None  # tensor offsets (static caches): no content key, build every time
    else:
        key = (str(device), spec.batch_size, q_len, kv_len, spec.q_offset, spec.kv_offset, window,
               _content_key(documents), _content_key(spec.padding))  # fmt: skip
        hit = _BLOCK_MASKS.get(key)
        if hit is not None:
            _BLOCK_MASKS.move_to_end(key)
            return hit
    mod = make_mask_mod(window, spec.q_offset, spec.kv_offset, spec.padding, documents)
    block_mask = build_block_mask(
        mod, spec.batch_size, q_len, kv_len, device, batched=documents is not None or spec.padding is not None
    )
    if key is not None:
        _BLOCK_MASKS[key] = block_mask
        while len(_BLOCK_MASKS) > BLOCK_MASK_CACHE_SIZE:
            _BLOCK_MASKS.popitem(last=False)
    return block_mask


def clear_block_mask_cache() -> None:
    _BLOCK_MASKS.clear()


# ---------------------------------------------------------------------------------------------------
# the attention function transformers calls
# ---------------------------------------------------------------------------------------------------
def _spec_from(attention_mask, batch_size: int, q_len: int, kv_len: int) -> SinkMask:
    if isinstance(attention_mask, SinkMask):
        return attention_mask
    # No mask from our mask function (e.g. a caller building masks itself): keys end at the last query.
    return SinkMask(batch_size, q_len, kv_len, q_offset=kv_len - q_len, kv_offset=0)


def _documents_for(spec: SinkMask, position_ids, q_len: int, kv_len: int):
    """Packed-example ids [B, L], or None when packing does not apply (mask given, cache offsets, q != kv)."""
    if position_ids is None or spec.padding is not None or spec.has_offsets or q_len != kv_len:
        return None
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    if position_ids.shape[-1] != q_len:
        return None
    return document_ids(position_ids.expand(spec.batch_size, -1))


def _memo_get(spec: SinkMask, window, position_ids):
    for w, pid, value in spec._memo:
        if w == window and pid is position_ids:
            return value
    return None


def sink_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    s_aux: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    route: str = "auto",
    **kwargs,
):
    """transformers attention interface: q [B, H, Q, D], k/v [B, Hkv, K, D] -> ([B, Q, H, D], None)."""
    B, _, q_len, head_dim = query.shape
    kv_len = key.shape[2]
    scaling = head_dim**-0.5 if scaling is None else scaling
    sinks = s_aux if s_aux is not None else module.sinks
    window = sliding_window if sliding_window is not None else getattr(module, "sliding_window", None)
    training = module.training

    if route == "auto":
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        route = (
            "flex"
            if query.device.type == "cuda" and q_len >= (FLEX_MIN_QUERY if grad else FLEX_MIN_PREFILL)
            else "eager"
        )
    if route == "flex" and dropout > 0.0 and training:
        raise ValueError("the flex attention route has no attention dropout; set attention_dropout to 0")

    if isinstance(attention_mask, torch.Tensor) or (
        attention_mask is not None and not isinstance(attention_mask, SinkMask)
    ):
        # A mask prepared by the caller: a dense tensor (eager route) or a BlockMask (flex route).
        if isinstance(attention_mask, torch.Tensor):
            mask = attention_mask[..., :kv_len]
            out, lse = dense_attention_lse(query, key, value, mask, scaling, dropout, training)
        else:
            out, lse = flex_attention_lse(query, key, value, attention_mask, scaling)
        return apply_sinks(out, lse, sinks).transpose(1, 2).contiguous(), None

    spec = _spec_from(attention_mask, B, q_len, kv_len)
    memo = _memo_get(spec, window, position_ids)
    if memo is None:
        documents = _documents_for(spec, position_ids, q_len, kv_len)
        memo = [documents, None]
        spec._memo.append((window, position_ids, memo))
    documents = memo[0]

    if route == "flex":
        if memo[1] is None:
            memo[1] = _block_mask_for(spec, window, documents, q_len, kv_len, query.device)
        out, lse = flex_attention_lse(query, key, value, memo[1], scaling)
    else:
        mod = make_mask_mod(window, spec.q_offset, spec.kv_offset, spec.padding, documents)
        mask = dense_mask(mod, B, q_len, kv_len, query.device)
        out, lse = dense_attention_lse(query, key, value, mask, scaling, dropout, training)
    return apply_sinks(out, lse, sinks).transpose(1, 2).contiguous(), None


def _route_fn(route: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        return sink_attention_forward(module, query, key, value, attention_mask, route=route, **kwargs)

    attention.__name__ = f"sink_attention_{route}"
    return attention


_REGISTERED = False


def register_attention() -> None:
    """Register "gptoss_sink", "gptoss_sink_flex" and "gptoss_sink_eager" with transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for name, route in ROUTES.items():
        AttentionInterface.register(name, _route_fn(route))
        AttentionMaskInterface.register(name, sink_mask_interface)
    _REGISTERED = True


def default_attn_implementation(device: torch.device | str | None = None) -> str:
    """The training/inference default: "gptoss_sink" (flex on CUDA, dense math on the CPU).

    Not transformers' "eager": that one is quadratic in memory and, for gpt-oss, ignores packed-row
    boundaries (see the module docstring).
    """
    return ATTN_IMPLEMENTATION


__all__ = [
    "ATTN_IMPLEMENTATION",
    "ATTN_FLEX",
    "ATTN_EAGER",
    "SinkMask",
    "apply_sinks",
    "dense_attention_lse",
    "flex_attention_lse",
    "document_ids",
    "make_mask_mod",
    "register_attention",
    "default_attn_implementation",
    "sink_attention_forward",
    "clear_block_mask_cache",
]

# Registering on import keeps `attn_implementation="gptoss_sink"` usable anywhere gptoss_tune is imported.
register_attention()
