"""gpt-oss configurations in the published config.json layout (see docs/gpt-oss-facts.md)."""

from __future__ import annotations

import copy

QUANTIZATION_CONFIG = {
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
    "quant_method": "mxfp4",
}

VOCAB_SIZE = 201088
BOS_ID, PAD_ID, EOS_ID = 199998, 199999, 200002  # <|startoftext|>, <|endoftext|>, <|return|>
CALL_ID, END_ID = 200012, 200007  # <|call|>, <|end|>

# The linear layers LoRA can adapt: transformers' GptOssAttention modules, and GptOssExperts' two 3-D weights.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_PROJECTIONS = ("gate_up_proj", "down_proj")

_BASE = {
    "architectures": ["GptOssForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": EOS_ID,
    "experts_per_token": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "initial_context_length": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 2880,
    "max_position_embeddings": 131072,
    "model_type": "gpt_oss",
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "output_router_logits": False,
    "pad_token_id": PAD_ID,
    "quantization_config": QUANTIZATION_CONFIG,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "transformers_version": "4.55.0.dev0",
    "use_cache": True,
    "vocab_size": VOCAB_SIZE,
}

GENERATION_CONFIG = {
    "bos_token_id": BOS_ID,
    "do_sample": True,
    "eos_token_id": [EOS_ID, PAD_ID, CALL_ID],
    "pad_token_id": PAD_ID,
    "transformers_version": "4.55.0.dev0",
}


def layer_types(num_layers: int) -> list[str]:
    """Even layers slide, odd layers attend to everything (as published)."""
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]


def published_config(name: str) -> dict:
    """config.json of openai/gpt-oss-20b or -120b."""
    cfg = copy.deepcopy(_BASE)
    if name in ("20b", "gpt-oss-20b"):
        pass
    elif name in ("120b", "gpt-oss-120b"):
        cfg.update(num_hidden_layers=36, num_local_experts=128)
    else:
        raise ValueError(f"unknown gpt-oss size {name!r}; choose 20b or 120b")
    cfg["layer_types"] = layer_types(cfg["num_hidden_layers"])
    return cfg


def tiny_config(
    layers: int = 2,
    experts: int = 8,
    top_k: int = 2,
    hidden: int = 64,
    intermediate: int | None = None,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    vocab: int = VOCAB_SIZE,
    sliding_window: int = 128,
) -> dict:
    """A small config in exactly the published layout; only sizes differ."""
    intermediate = hidden if intermediate is None else intermediate
    for label, n in (("layers", layers), ("experts", experts), ("top-k", top_k), ("heads", heads), ("kv-heads", kv_heads),
                     ("head-dim", head_dim), ("vocab", vocab), ("sliding-window", sliding_window), ("hidden", hidden),
                     ("intermediate", intermediate)):  # fmt: skip
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"--{label} must be a positive integer, got {n}")
    if head_dim % 2:
        raise ValueError(f"--head-dim must be even (rotary embeddings rotate pairs), got {head_dim}")
    for label, dim in (("hidden", hidden), ("intermediate", intermediate)):
        if dim % 32:
            raise ValueError(f"--{label} must be a multiple of 32 (MXFP4 blocks hold 32 weights), got {dim}")
    if top_k > experts:
        raise ValueError(f"--top-k ({top_k}) cannot exceed --experts ({experts})")
    if heads % kv_heads:
        raise ValueError(f"--heads ({heads}) must be a multiple of --kv-heads ({kv_heads})")
    cfg = copy.deepcopy(_BASE)
    cfg.update(
        num_hidden_layers=layers,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        experts_per_token=top_k,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        sliding_window=sliding_window,
        layer_types=layer_types(layers),
    )
    return cfg
