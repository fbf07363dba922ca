"""`gptoss-tune serve --print-vllm-command`: the `vllm serve` command for an export, for production.

vLLM serves gpt-oss with its harmony tool-call and reasoning parsers; an adapter goes through its LoRA
options. gptoss_tune's own checkpoints and run directories are refused with the export command to run.
"""

from __future__ import annotations

import json
from pathlib import Path

from gptoss_tune.errors import UserError
from gptoss_tune.export.peft_format import PEFT_CONFIG_FILE, read_peft_settings
from gptoss_tune.export.vllm_route import ROUTER_WARNING, VLLM_GPTOSS_ARGS, VLLM_LORA_RANKS, lora_args  # noqa: F401
from gptoss_tune.model.adapter import CONFIG_FILE as ADAPTER_CONFIG
from gptoss_tune.model.config import EXPERT_PROJECTIONS
from gptoss_tune.runs import CHECKPOINTS


def vllm_command(model_dir: str, adapter: str | None = None, host: str = "127.0.0.1", port: int = 8000,
                 api_key: str | None = None, served_model_name: str | None = None) -> tuple[list[str], list[str]]:  # fmt: skip
    """(argv of `vllm serve ...`, notes for the user) for an exported model or a base + PEFT adapter."""
    notes: list[str] = []
    base = model_dir
    lora_dir = None
    if adapter is None and (Path(model_dir) / PEFT_CONFIG_FILE).is_file():
        lora_dir = model_dir
        _, cfg = read_peft_settings(model_dir)
        base = cfg.get("base_model_name_or_path") or model_dir
    elif adapter is not None:
        lora_dir = adapter
    p = Path(base)
    looks_local = p.is_absolute() or str(base).startswith((".", "~"))  # not a hub id such as openai/gpt-oss-20b
    if (p.exists() and not p.is_dir()) or (not p.exists() and looks_local):
        raise UserError(
            f"{base}: no such model directory (pass an export directory, or a hub id such as openai/gpt-oss-20b)"
        )
    if (
        (p / ADAPTER_CONFIG).is_file()
        or (p / CHECKPOINTS).is_dir()
        or (lora_dir and (Path(lora_dir) / ADAPTER_CONFIG).is_file())
    ):
        raise UserError(
            f"{lora_dir or base}: vLLM does not read gptoss_tune checkpoints; export first "
            f"(`gptoss-tune export RUN_DIR --format merged-mxfp4 --out DIR`, or --format adapter) and pass that directory"
        )
    cfg_file = p / "config.json"
    if p.is_dir() and not cfg_file.is_file():
        raise UserError(
            f"{base}: not a model directory (no config.json); pass a merged export, a gpt-oss checkpoint or a PEFT adapter export"
        )
    if cfg_file.is_file():
        try:
            cfg = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{cfg_file}: not valid JSON ({e})") from None
        if not cfg.get("quantization_config"):
            notes.append(
                "this checkpoint has bf16 experts (merged-bf16); vLLM's gpt-oss kernels are built for MXFP4 and bf16 "
                "support depends on the vLLM version. The merged-mxfp4 export loads like openai/gpt-oss-*."
            )
    cmd = ["vllm", "serve", str(base)]
    name = served_model_name or (Path(base).name if Path(base).exists() else str(base))
    if lora_dir is None:
        cmd += ["--served-model-name", name]
    cmd += ["--host", host, "--port", str(port)]
    if api_key:
        cmd += ["--api-key", api_key]
    cmd += VLLM_GPTOSS_ARGS
    if lora_dir is not None:
        settings, cfg = read_peft_settings(lora_dir)
        lora_name = served_model_name or Path(lora_dir).resolve().name
        cmd += lora_args(lora_name, lora_dir, settings.rank)
        notes.append(f"requests use model '{lora_name}' for the adapter (the base stays available under its own name)")
        if len(settings.experts) == 1:
            raise UserError(
                f"{lora_dir}: this adapter has LoRA on {settings.experts[0]} only, and vLLM's gpt-oss LoRA loader "
                f"asserts both expert slots ({', '.join(EXPERT_PROJECTIONS)}); export it again with "
                f"`gptoss-tune export RUN_DIR --format adapter` (which writes the other slot as zeros)"
            )
        if settings.experts:
            notes.append(
                "this adapter has expert LoRA (target_parameters): vLLM's gpt-oss LoRA loader applies it on the MXFP4 "
                "experts (checked with vLLM 0.33); older versions reject it: then serve the merged-mxfp4 export"
            )
        if cfg.get("modules_to_save"):
            notes.append(ROUTER_WARNING)
    return cmd, notes
