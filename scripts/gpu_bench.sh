#!/usr/bin/env bash
# Everything issue 7 needs measured on a GPU, from the repository root of a plain checkout:
#
#   bash scripts/gpu_bench.sh                 # all stages, in this order
#   bash scripts/gpu_bench.sh tests 20b       # some stages (each stage is bounded by STAGE_TIMEOUT s)
#
# Stages: tests (the gpu-marked tests), 20b (seq 2048, baseline in the same run, profile), 120b (seq 2048),
# 131k (20b, one 131,072-token sequence), 20b-attn (LoRA on attention only, baseline), 20b-4096 (baseline).
# Writes <stage>.json / .log under $OUT (or ./bench-out) and prints each table.
set -u
OUT=${OUT:-$PWD/bench-out}
STAGE_TIMEOUT=${STAGE_TIMEOUT:-540}
mkdir -p "$OUT"
SHIM=$(mktemp -d)
ln -s "$PWD/kernels" "$SHIM/gptoss_kernels"  # kernels/ imports as gptoss_kernels (never as `kernels`)
export PYTHONPATH="$PWD:$SHIM${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
  $PY -c "import triton; print('triton', triton.__version__)" 2>&1
  $PY -c "from gptoss_tune.experts import _triton_ops; print('experts triton ops:', _triton_ops() is not None)" 2>&1
  $PY -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" 2>&1 | tail -1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

bench() {
  local name=$1
  shift
  local t0=$SECONDS
  timeout "$STAGE_TIMEOUT" $PY scripts/bench_train.py "$@" --json-out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name rc=$rc ($((SECONDS - t0)) s): $*"
  grep -v '^{' "$OUT/$name.log" | tail -n 14
}

for stage in ${@:-tests 20b 120b 131k 20b-attn 20b-4096}; do
  case $stage in
    tests)
      t0=$SECONDS
      timeout "$STAGE_TIMEOUT" $PY -m pytest -q -p no:xdist -p no:cacheprovider -m gpu tests/test_attention.py tests/test_chunked_ce.py > "$OUT/tests.log" 2>&1
      echo "== tests rc=$? ($((SECONDS - t0)) s)"
      tail -n 15 "$OUT/tests.log" ;;
    20b) bench 20b_2048 --model 20b --seq 2048 --baseline --profile 1 ;;
    120b) bench 120b_2048 --model 120b --seq 2048 --profile 1 ;;
    131k) bench 20b_131072 --model 20b --seq 131072 --warmup 1 --steps 2 ;;
    20b-attn) bench 20b_2048_attention --model 20b --seq 2048 --lora-on attention --baseline ;;
    20b-4096) bench 20b_4096 --model 20b --seq 4096 --baseline ;;
    *) echo "unknown stage $stage" ;;
  esac
done
