"""gptoss_kernels: the expert (MoE) compute of gpt-oss on MXFP4 weights with fused LoRA.

Installed under the import name ``gptoss_kernels`` (the directory is ``kernels/``); the name ``kernels``
belongs to a Hugging Face package that transformers probes for.

Each op comes as a plain torch reference (``*_reference.py``, runs anywhere, the ground truth for tests)
and, where written, Triton kernels (``*_kernels.py``, ``@triton.jit`` only) with their launchers and
``autograd.Function`` beside them.
"""

from .moe_reference import ExpertLoRA, ExpertWeights, moe_experts_reference, swiglu_reference

__all__ = ["ExpertLoRA", "ExpertWeights", "moe_experts_reference", "swiglu_reference"]
