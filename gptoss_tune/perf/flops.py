"""FLOPs per trained token and the device's peak, for the benchmark's MFU.

N = active matmul weights per token (attention projections, router, top-k experts, lm_head; 3.61 B for
20b, 5.13 B for 120b), N_lora = active LoRA weights, a = attention score+value FLOPs of the forward per
token (causal, averaged over the sequence; the window on sliding layers):
  model_flops  = 4 N + 6 N_lora + 3 a   frozen base weights need no weight gradient: forward 2N,
                                        backward to the activations 2N; LoRA weights 6 per weight;
                                        attention forward a, backward 2a. Recompute not counted.
  flops_6n     = 6 (N + N_lora) + 3 a   the usual 6N convention of full fine-tuning, for comparison
                                        with other tools' MFU claims (overstates LoRA work by ~1.5x).
MFU = tokens/s x flops / peak dense bf16 FLOP/s of the device (H100/H200 SXM: 989.4 TFLOP/s).
"""

from __future__ import annotations

import torch

# Dense bf16 peaks; the first key found in the device name wins (PCIe and NVL parts are slower than SXM).
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200 NVL": 835.0,
    "H100": 989.4,
    "H200": 989.4,
    "B200": 2250.0,
}
FORMULA = (
    "model_flops = 4*N + 6*N_lora + 3*a per trained token (frozen base: no weight grads); "
    "flops_6n = 6*(N + N_lora) + 3*a; mfu = tokens/s * flops / peak"
)


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


def mfu(tokens_per_s: float, flops: dict, peak: float | None) -> dict[str, float]:
    """{"mfu", "mfu_6n"} of a measured rate; empty without a known peak."""
    if not peak:
        return {}
    return {
        "mfu": tokens_per_s * flops["model_flops"] / (peak * 1e12),
        "mfu_6n": tokens_per_s * flops["flops_6n"] / (peak * 1e12),
    }
