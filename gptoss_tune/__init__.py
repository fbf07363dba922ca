"""gptoss_tune: LoRA fine-tuning of gpt-oss-20b / gpt-oss-120b on MXFP4-resident experts.

Public API (stable): `load_model(path, lora=None, device=None, dtype=None)` and `LoraSettings`.
Imports are lazy so the CLI starts quickly and `gptoss_kernels` can import the format module.
"""

__version__ = "0.1.0"

__all__ = ["load_model", "LoraSettings", "UserError", "__version__"]


def __getattr__(name):
    if name == "load_model":
        from gptoss_tune.model.loader import load_model

        return load_model
    if name == "LoraSettings":
        from gptoss_tune.model.lora import LoraSettings

        return LoraSettings
    if name == "UserError":
        from gptoss_tune.errors import UserError

        return UserError
    raise AttributeError(f"module 'gptoss_tune' has no attribute {name!r}")
