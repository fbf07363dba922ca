"""Run a GPU script and fail if it imported a package the lent GPU machines lack.

    python tests/helpers/gpu_machine_imports.py scripts/bench_train.py --model tiny ...

The GPU machines (the device tool's README) have torch, transformers, peft, accelerate,
safetensors, triton, pyyaml, but not the project's other dependencies, and nothing can be installed there
without carrying wheels. The script runs as `__main__`; at exit, if any module below was imported, this
prints them and exits 3 (the script's own exit status otherwise).

pydantic is the exception: the settings types of the model stage (LoraSettings) are pydantic models, so
every GPU plan installs it from the wheels scripts/gpu_wheels.sh carries (CARRIED; a test checks that the
script lists them).
"""

import runpy
import sys

CARRIED = ("pydantic", "pydantic-core", "typing-inspection", "annotated-types", "typing-extensions")
ABSENT_ON_GPU_MACHINE = ("datasets", "fastapi", "starlette", "uvicorn", "openai_harmony", "openai",
                         "wandb", "deepspeed", "quicktok", "bitsandbytes")  # fmt: skip


def main() -> int:
    script, sys.argv = sys.argv[1], sys.argv[1:]
    try:
        runpy.run_path(script, run_name="__main__")
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    loaded = sorted(n for n in ABSENT_ON_GPU_MACHINE if n in sys.modules)
    if loaded:
        print(f"{script} imported {loaded}, which the GPU machine does not have", file=sys.stderr)
        return 3
    return status


if __name__ == "__main__":
    sys.exit(main())
