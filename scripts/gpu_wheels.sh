#!/usr/bin/env bash
# Wheels for what the lent GPU machines lack, so the `demo` stage of scripts/gpu_bench.sh can run the whole
# toolkit there (training loop, data stage, export, server, openai client) and not only the benchmarks.
# Run HERE (it needs PyPI, which the GPU machine cannot reach), after `make install`:
#
#   bash scripts/gpu_wheels.sh            # -> .whl/ (git-ignored, ~15 MB), then pass carry: [".whl"] to the run
#
# The GPU image (the device tool's KINDS.md) has torch, transformers, peft, accelerate, safetensors, triton,
# numpy, pandas, pyarrow, tiktoken, huggingface-hub, httpx, anyio, click, h11, ... but not the packages
# below (the closure of our dependencies minus that list; wandb is left out: tracking goes to
# metrics.jsonl without it). Versions are the ones installed in .venv, i.e. the ones CI tests.
# PYTHON_VERSION (default 3.12, the GPU machine's) picks the wheels' Python.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYV=${PYTHON_VERSION:-3.12}
DEST=${DEST:-.whl}
NAMES="pydantic pydantic-core typing-inspection annotated-types annotated-doc typing-extensions
       datasets dill multiprocess openai-harmony quicktok-v1
       fastapi starlette opentelemetry-api importlib-metadata zipp uvicorn
       openai httpx2 httpcore2 truststore jiter sniffio idna tzdata"
specs=$($PY - $NAMES <<'PYEOF'
import sys, importlib.metadata as md
out = []
for n in sys.argv[1:]:
    try:
        out.append(f"{n}=={md.version(n)}")
    except md.PackageNotFoundError:
        pass  # not needed by this .venv's versions (e.g. importlib-metadata on newer Pythons)
print(" ".join(out))
PYEOF
)
mkdir -p "$DEST"
plat=""
for n in 17 24 27 28 31 34 35; do plat="$plat --platform manylinux_2_${n}_x86_64"; done
# shellcheck disable=SC2086
$PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    $plat --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" $specs
ls "$DEST"/*.whl | wc -l | xargs echo "wheels in $DEST:"
du -sh "$DEST"
