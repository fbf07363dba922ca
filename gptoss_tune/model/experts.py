"""The gpt-oss expert module with MXFP4-resident weights and per-expert LoRA.

`MXFP4Experts` replaces transformers' `GptOssExperts` at `model.layers.N.mlp.experts` and keeps the
experts exactly as the checkpoint stores them: packed uint8 blocks and E8M0 scales (4.25 bits a weight),
under the checkpoint's own tensor names, so loading is a plain copy. It takes the same call as
`GptOssExperts` (hidden states, top-k indices and top-k routing weights from transformers' own router,
which stays in place), so routing is exactly transformers'. Router logits are recorded by transformers
itself (`output_router_logits=True`) for the load-balancing loss.

LoRA on gate_up_proj and down_proj of every expert is stored per expert, A [E, r, in] and B [E, out, r],
and applied to the activations (x·Aᵀ·Bᵀ·scale); no dense delta is formed. `gptoss_tune.export.peft_format`
converts to PEFT's `target_parameters` layout for export.

Compute backends: "reference" (plain torch, one expert dequantised at a time; CPU and ground truth) and
"triton" (`gptoss_kernels.moe_triton`: fused MXFP4 kernels on CUDA; on the CPU only under
TRITON_INTERPRET=1, for tests). "auto" picks triton on CUDA when the kernels are importable, the
reference elsewhere; `GPTOSS_TUNE_EXPERTS_BACKEND=reference|triton` or `module.backend` forces either.
See docs/kernels.md.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
from torch import nn

from gptoss_kernels.moe_reference import ExpertLoRA, ExpertWeights, moe_experts_reference
from gptoss_kernels.mxfp4 import dequantize, packed_shapes
from gptoss_tune.errors import UserError
from gptoss_tune.model.config import EXPERT_PROJECTIONS


class ExpertsBackendError(UserError, ValueError):
    """A backend choice that cannot run here: a user's setting (one line from the CLI), and a bad value."""


BACKENDS = ("auto", "reference", "triton")
BACKEND_ENV = "GPTOSS_TUNE_EXPERTS_BACKEND"


def _take_shape(module: nn.Module, config) -> tuple[int, int, int]:
    """Set the experts' sizes and SwiGLU constants from a GptOssConfig on `module`; (E, H, I)."""
    module.num_experts = config.num_local_experts
    module.hidden_size = config.hidden_size
    module.intermediate_size = config.intermediate_size
    module.limit = float(getattr(config, "swiglu_limit", 7.0))
    module.alpha = float(getattr(config, "swiglu_alpha", 1.702))
    return module.num_experts, module.hidden_size, module.intermediate_size


class MXFP4Experts(nn.Module):
    def __init__(self, config, dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        E, H, I = _take_shape(self, config)
        gu_blocks, gu_scales = packed_shapes(E, 2 * I, H)
        dn_blocks, dn_scales = packed_shapes(E, H, I)
        u8 = dict(dtype=torch.uint8, device=device)
        self.register_buffer("gate_up_proj_blocks", torch.zeros(gu_blocks, **u8))
        self.register_buffer("gate_up_proj_scales", torch.zeros(gu_scales, **u8))
        self.register_buffer("down_proj_blocks", torch.zeros(dn_blocks, **u8))
        self.register_buffer("down_proj_scales", torch.zeros(dn_scales, **u8))
        fl = dict(dtype=dtype, device=device)
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(E, 2 * I, **fl), requires_grad=False)
        self.down_proj_bias = nn.Parameter(torch.zeros(E, H, **fl), requires_grad=False)
        self.lora_rank = 0
        self.lora_alpha = 0.0
        self.lora_targets: tuple[str, ...] = ()
        self.backend = "auto"
        # Quantisation-aware training (gptoss_tune.train.qat) sets a callable that replaces the forward.
        self.fake_quant = None

    # ---- LoRA -------------------------------------------------------------------------------------
    def add_lora(self, rank: int, alpha: float, targets=EXPERT_PROJECTIONS, dtype=torch.float32) -> None:
        """Per-expert LoRA on the given projections; A is Kaiming-uniform (as nn.Linear and PEFT), B is 0."""
        unknown = set(targets) - set(EXPERT_PROJECTIONS)
        if unknown:
            raise ValueError(f"unknown expert projection(s) {sorted(unknown)}; choose from {EXPERT_PROJECTIONS}")
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size
        device = self.gate_up_proj_blocks.device
        dims = {"gate_up_proj": (H, 2 * I), "down_proj": (I, H)}
        for proj in targets:
            d_in, d_out = dims[proj]
            a = torch.empty(E, rank, d_in, dtype=dtype, device=device)
            bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)) on a [r, in] weight
            a.uniform_(-bound, bound)
            setattr(self, f"{proj}_lora_A", nn.Parameter(a))
            setattr(self, f"{proj}_lora_B", nn.Parameter(torch.zeros(E, d_out, rank, dtype=dtype, device=device)))
        self.lora_rank = rank
        self.lora_alpha = float(alpha)
        self.lora_targets = tuple(p for p in EXPERT_PROJECTIONS if p in targets)

    @property
    def lora_scaling(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    def lora_factors(self) -> ExpertLoRA | None:
        if not self.lora_targets:
            return None
        get = lambda name: getattr(self, name, None)  # noqa: E731
        return ExpertLoRA(
            get("gate_up_proj_lora_A"),
            get("gate_up_proj_lora_B"),
            get("down_proj_lora_A"),
            get("down_proj_lora_B"),
            self.lora_scaling,
        )

    # ---- weights ----------------------------------------------------------------------------------
    def packed_weights(self) -> ExpertWeights:
        return ExpertWeights(
            self.gate_up_proj_blocks,
            self.gate_up_proj_scales,
            self.gate_up_proj_bias,
            self.down_proj_blocks,
            self.down_proj_scales,
            self.down_proj_bias,
        )

    def resident_bytes(self) -> int:
        """Bytes held by the expert weight matrices (blocks + scales); biases and LoRA not included."""
        # by name: the packed tensors are buffers, or frozen parameters with model.shard_experts
        packed = (
            getattr(self, n)
            for n in ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales")
        )
        return sum(t.numel() * t.element_size() for t in packed)

    def dequantized(self, proj: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense [E, in, out] weight of one projection (transformers' layout). For export and tests."""
        blocks = getattr(self, f"{proj}_blocks")
        scales = getattr(self, f"{proj}_scales")
        return dequantize(blocks, scales, dtype).transpose(1, 2)

    # ---- forward ----------------------------------------------------------------------------------
    def resolved_backend(self, device: torch.device) -> str:
        """ "reference" or "triton" for tensors on `device`; a UserError when the choice cannot run there."""
        env = os.environ.get(BACKEND_ENV)
        choice = env or self.backend
        where = f"{BACKEND_ENV}={choice!r}" if env else f"experts backend {choice!r}"
        if choice not in BACKENDS:
            raise ExpertsBackendError(f"{where}: choose one of {', '.join(BACKENDS)}")
        if choice == "auto":
            if device.type != "cuda":
                return "reference"
            ops = _triton_ops()
            if ops is None or getattr(ops, "INTERPRET", False):
                _warn_reference_on_cuda(ops)
                return "reference"
            return "triton"
        if choice == "triton":
            ops = _triton_ops()
            if ops is None:
                raise ExpertsBackendError(
                    f"{where}: Triton or gptoss_kernels' Triton ops are not importable here "
                    f"(pip install -e '.[kernels]' on a CUDA machine); use reference or auto"
                )
            if device.type != "cuda" and not getattr(ops, "INTERPRET", False):
                raise ExpertsBackendError(
                    f"{where}: the Triton kernels run on CUDA tensors and the model is on {device} "
                    f"(TRITON_INTERPRET=1 runs them interpreted, for tests); use reference or auto"
                )
        return choice

    def forward(self, hidden_states: torch.Tensor, router_indices=None, routing_weights=None) -> torch.Tensor:
        if self.fake_quant is not None:
            return self.fake_quant(self, hidden_states, router_indices, routing_weights)
        backend = self.resolved_backend(hidden_states.device)
        args = (hidden_states, router_indices, routing_weights, self.packed_weights(), self.lora_factors())
        if backend == "triton":
            try:
                return _triton_ops().moe_experts(*args, limit=self.limit, alpha=self.alpha)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # a Triton compile or launch failure: say how to go on without the kernels
                if hasattr(e, "add_note"):  # Python >= 3.11
                    e.add_note(
                        f"gptoss_tune: this came from the fused Triton expert kernels; {BACKEND_ENV}=reference "
                        f"runs the experts in plain torch instead (slower, same results)"
                    )
                raise
        return moe_experts_reference(*args, limit=self.limit, alpha=self.alpha)

    def extra_repr(self) -> str:
        s = f"experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, mxfp4"
        if self.lora_targets:
            s += f", lora(r={self.lora_rank}, alpha={self.lora_alpha:g}, on={list(self.lora_targets)})"
        return s


_TRITON_OPS = False
_TRITON_IMPORT_ERROR = ""
_WARNED_REFERENCE_ON_CUDA = False


def _triton_ops():
    """The Triton MoE ops module, or None where Triton or the kernels are not available."""
    global _TRITON_OPS, _TRITON_IMPORT_ERROR
    if _TRITON_OPS is False:
        try:
            from gptoss_kernels import moe_triton  # type: ignore[attr-defined]

            _TRITON_OPS = moe_triton
        except Exception as e:  # ImportError, or Triton without a usable backend
            _TRITON_OPS = None
            _TRITON_IMPORT_ERROR = f"{type(e).__name__}: {e}"
    return _TRITON_OPS


def _warn_reference_on_cuda(ops) -> None:
    """ "auto" on CUDA without usable kernels runs the reference: correct, but several times slower and
    with a dense bf16 copy of one expert at a time, so say so once rather than silently."""
    global _WARNED_REFERENCE_ON_CUDA
    if _WARNED_REFERENCE_ON_CUDA:
        return
    _WARNED_REFERENCE_ON_CUDA = True
    why = (
        "Triton is running interpreted (TRITON_INTERPRET=1 was set when it was imported)"
        if ops is not None
        else f"the kernels do not import ({_TRITON_IMPORT_ERROR or 'Triton missing'}; pip install -e '.[kernels]')"
    )
    warnings.warn(
        f"gptoss_tune: the fused Triton expert kernels are not used on CUDA: {why}. The experts run the "
        f"plain torch reference (much slower); set {BACKEND_ENV}=reference to choose it explicitly.",
        RuntimeWarning,
        stacklevel=3,
    )


class DenseExperts(nn.Module):
    """Dense experts, held as transformers' `GptOssExperts` holds them: `gate_up_proj` [E, H, 2I] (gate and up
    interleaved) and `down_proj` [E, I, H], with their biases, under the checkpoint's own names.

    For serving a checkpoint whose experts are dense (the merged-bf16 export): they are used as they are,
    so a fine-tune merged into them is served exactly. Quantising them to MXFP4 on load instead (what the
    loader does for training) measured KL 1.6e-2 against the tuned model on the tiny checkpoint, the same
    damage as the merged-mxfp4 export. Memory: 2 bytes a weight in bf16 (3.8x MXFP4's 4.25 bits). Plain torch,
    the same computation as transformers' GptOssExperts (one matmul per expert hit); no LoRA.
    """

    def __init__(self, config, dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        E, H, I = _take_shape(self, config)
        fl = dict(dtype=dtype, device=device)
        self.gate_up_proj = nn.Parameter(torch.zeros(E, H, 2 * I, **fl), requires_grad=False)
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(E, 2 * I, **fl), requires_grad=False)
        self.down_proj = nn.Parameter(torch.zeros(E, I, H, **fl), requires_grad=False)
        self.down_proj_bias = nn.Parameter(torch.zeros(E, H, **fl), requires_grad=False)
        self.lora_targets: tuple[str, ...] = ()

    def dequantized(self, proj: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense [E, in, out] weight of one projection, as MXFP4Experts.dequantized gives it."""
        return getattr(self, proj).to(dtype)

    def forward(self, hidden_states: torch.Tensor, router_indices=None, routing_weights=None) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hit = torch.nn.functional.one_hot(router_indices, num_classes=self.num_experts).permute(2, 1, 0)
            experts = (hit.sum(dim=(-1, -2)) > 0).nonzero().flatten().tolist()
        for e in experts:
            pos, tok = torch.where(hit[e])
            gate_up = hidden_states[tok] @ self.gate_up_proj[e] + self.gate_up_proj_bias[e]
            gate, up = gate_up[..., ::2], gate_up[..., 1::2]
            gate = gate.clamp(max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
            glu = gate * torch.sigmoid(gate * self.alpha)
            y = ((up + 1) * glu) @ self.down_proj[e] + self.down_proj_bias[e]
            out.index_add_(0, tok, (y * routing_weights[tok, pos, None]).to(hidden_states.dtype))
        return out

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, dense"
