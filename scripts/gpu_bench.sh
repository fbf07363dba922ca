#!/usr/bin/env bash
# FIRST CALL: scripts/gpu_quick.py (issue 15), the verdict and the headline figures in one call of <= 8 min;
# a task now gets 15 minutes of device time in all. This staged runner keeps the follow-ups (tiles, demo,
# kernels with the behaviour checks, 131k-offload, 20b-attn, 20b-4096, moe at four shapes): one call per
# later session. docs/benchmarks.md has both.
#
# Everything issues 6 and 7 need measured on a GPU, from the repository root of a plain checkout (no
# install: the repo and a `gptoss_kernels` shim go on PYTHONPATH; only torch, transformers, peft,
# safetensors and triton are needed, which the lent GPU machines have):
#
#   bash scripts/gpu_bench.sh                  # every stage, in the suggested order below, within the time budget
#   bash scripts/gpu_bench.sh tests 20b        # some stages
#
# Stages (rough device time, not yet measured):
#   tests     the gpu-marked tests of attention (compiled flex vs dense, 9 compiled variants of
#             flex forward + backward) and the chunked loss (~4-7 min: run it in a call of its own)
#   kernels   scripts/check_moe_gpu.py (E = 32 and 128, real shapes) and check_convergence_gpu.py (~3-5 min)
#   demo      `python -m gptoss_tune.demo` on the GPU: the training loop (accelerate, bf16, Triton experts, flex
#             attention), evaluation, early stopping, export and the server, end to end (~2-4 min); needs the
#             wheels the image lacks: `bash scripts/gpu_wheels.sh` here, then carry [".whl"] (15 MB)
#   tiles     scripts/check_moe_tiles.py --device cuda: every autotuning candidate and fixed tile of the MoE
#             kernels at 2880 vs the float64 reference (the layer check only meets the ones autotuning picks) (~2 min)
#   20b       bench_train 20b seq 2048, baseline in the same run, profile of ours (~4 min)
#   120b      bench_train 120b seq 2048 (the baseline cannot fit: skipped by the script) (~3 min)
#   131k      bench_train 20b, one 131,072-token sequence (~4 min; ~64 GiB expected, see docs/benchmarks.md)
#   131k-offload  the same with the layer inputs in pinned host memory (--offload): run it if 131k
#             reports out_of_memory (about 17 GiB less on the device, ~1 s more per step)
#   moe       scripts/bench_moe.py, all four shapes, vs torch bf16 grouped GEMM and transformers+PEFT (~5 min)
#   20b-attn  bench_train 20b seq 2048, LoRA on attention only, baseline
#   20b-4096  bench_train 20b seq 4096, baseline
#
# Time: one device call may run 600 s. The whole invocation stays within BUDGET seconds (default 560);
# each stage gets min(STAGE_TIMEOUT, what is left) and a stage that cannot get MIN_STAGE seconds is
# skipped (and named), so a call always returns its results. Suggested calls for a 30-minute session
# (planned before the budget became 15 minutes: after gpu_quick.py, pick one):
#   kernels tiles | demo 20b | 120b 131k | moe | tests | 20b-attn 20b-4096   (131k-offload only if 131k ran out of memory)
#
# Output: $OUT (default ./bench-out) gets at most three files, whatever the stages (the device tool
# returns at most 8): env.txt, gpu_bench.log (every stage's full output) and results.jsonl (one JSON line
# per stage: {"stage", "rc", "seconds", "result"}, result being the stage's JSON report where it has one).
# The tables are printed as each stage ends; a summary line per stage comes last.
set -u
OUT=${OUT:-$PWD/bench-out}
BUDGET=${BUDGET:-560}
STAGE_TIMEOUT=${STAGE_TIMEOUT:-540}
MIN_STAGE=${MIN_STAGE:-90}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/gpu_bench.log"
RESULTS="$OUT/results.jsonl"
echo "gpu_bench.sh $* ($(date -u +%Y-%m-%dT%H:%M:%SZ))" >> "$LOG"
TMP=$(mktemp -d)
ln -s "$PWD/kernels" "$TMP/gptoss_kernels"  # kernels/ imports as gptoss_kernels (never as `kernels`)
export PYTHONPATH="$PWD:$TMP${PYTHONPATH:+:$PYTHONPATH}"
# Every stage imports the model stage, whose settings types are pydantic models, which the GPU image lacks:
# unpack the carried wheels (.whl/, bash scripts/gpu_wheels.sh here first, then carry [".whl"]) first.
if ! $PY -c "import pydantic" 2> /dev/null; then
  if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$TMP/site" .whl/*.whl >> "$LOG" 2>&1
    export PYTHONPATH="$PYTHONPATH:$TMP/site"
  else
    echo "gpu_bench.sh: pydantic is not importable and .whl/ holds no wheels: run bash scripts/gpu_wheels.sh where PyPI is reachable, then carry .whl" >&2
    exit 2
  fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
START=$SECONDS
SUMMARY=()

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1
  $PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__)" 2>&1
  $PY -c "import triton; print('triton', triton.__version__)" 2>&1
  $PY -c "from gptoss_tune.model.experts import _triton_ops; print('experts triton ops importable:', _triton_ops() is not None)" 2>&1 | tail -1
  $PY -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" 2>&1 | tail -1
  git log -1 --format='commit %H %s' 2>/dev/null
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# record STAGE RC SECONDS [JSON_FILE]: one line of results.jsonl
record() {
  $PY - "$1" "$2" "$3" "${4:-}" >> "$RESULTS" <<'EOF'
import json, sys
stage, rc, seconds, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
result = None
if path:
    try:
        text = open(path).read().strip()
        result = json.loads(text) if text.startswith(("{", "[")) else text[-4000:]
    except (OSError, ValueError) as e:
        result = f"no report ({type(e).__name__})"
print(json.dumps({"stage": stage, "rc": rc, "seconds": seconds, "result": result}))
EOF
}

# run STAGE JSON_FILE_OR_EMPTY TAIL_LINES COMMAND...: bounded by the budget, output appended to the log
run() {
  local stage=$1 json=$2 lines=$3
  shift 3
  local left=$((BUDGET - (SECONDS - START)))
  local limit=$((left < STAGE_TIMEOUT ? left : STAGE_TIMEOUT))
  if ((limit < MIN_STAGE)); then
    echo "== $stage SKIPPED: ${left}s of the ${BUDGET}s budget left (run it in another call)"
    SUMMARY+=("$stage skipped (budget)")
    record "$stage" -1 0
    return
  fi
  echo "== $stage (limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout -k 15 "$limit" "$@" > "$TMP/stage.log" 2>&1
  local rc=$?
  cat "$TMP/stage.log" >> "$LOG"
  grep -v '^{' "$TMP/stage.log" | tail -n "$lines"
  local took=$((SECONDS - t0))
  local why=""
  if ((rc == 124 || (rc == 137 && took >= limit))); then
    why=" (timed out)"
  elif ((rc == 137)); then
    why=" (killed: out of host memory?)"
  fi
  echo "== $stage rc=$rc$why ${took}s"
  SUMMARY+=("$stage rc=$rc$why ${took}s")
  record "$stage" "$rc" "$took" "$json"
}

bench() {
  local stage=$1
  shift
  run "$stage" "$TMP/$stage.json" 16 $PY scripts/bench_train.py "$@" --json-out "$TMP/$stage.json"
}

for stage in ${@:-kernels tiles demo 20b 120b 131k moe tests 20b-attn 20b-4096}; do
  case $stage in
    tests)
      run tests "" 25 $PY -m pytest -q -p no:xdist -p no:cacheprovider --maxfail=3 --durations=12 -m gpu tests/model/test_attention.py tests/train/test_chunked_ce.py ;;
    kernels)
      run kernels-check "$TMP/check.json" 24 $PY scripts/check_moe_gpu.py --experts 32 128 --tokens 2048 --json "$TMP/check.json"
      run kernels-convergence "$TMP/conv.json" 26 $PY scripts/check_convergence_gpu.py --steps 20 --json "$TMP/conv.json" ;;
    demo)
      # The whole toolkit on the GPU (`make demo`: checkpoint, load, training loop with evaluation and early
      # stopping, export, server, openai client), which needs the packages the image lacks: carried as
      # wheels in .whl/ (bash scripts/gpu_wheels.sh here first, then carry [".whl"]).
      if compgen -G ".whl/*.whl" > /dev/null; then
        [ -d "$TMP/site" ] || $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$TMP/site" .whl/*.whl >> "$LOG" 2>&1
        run demo "$TMP/stage.log" 12 env PYTHONPATH="$PYTHONPATH:$TMP/site" WANDB_MODE=disabled $PY -m gptoss_tune.demo
      else
        echo "== demo SKIPPED: no wheels in .whl/ (run bash scripts/gpu_wheels.sh where PyPI is reachable, then carry .whl)"
        SUMMARY+=("demo skipped (no .whl)")
        record demo -1 0
      fi ;;
    tiles) run tiles "$TMP/tiles.json" 40 $PY scripts/check_moe_tiles.py --device cuda --json "$TMP/tiles.json" ;;
    moe) run moe "$TMP/moe.json" 45 $PY scripts/bench_moe.py --json "$TMP/moe.json" ;;
    20b) bench 20b_2048 --model 20b --seq 2048 --baseline --profile 1 ;;
    120b) bench 120b_2048 --model 120b --seq 2048 --profile 1 ;;
    131k) bench 20b_131072 --model 20b --seq 131072 --warmup 1 --steps 2 ;;
    131k-offload) bench 20b_131072_offload --model 20b --seq 131072 --warmup 1 --steps 2 --offload ;;
    20b-attn) bench 20b_2048_attention --model 20b --seq 2048 --lora-on attention --baseline ;;
    20b-4096) bench 20b_4096 --model 20b --seq 4096 --baseline ;;
    *) echo "unknown stage $stage (stages: tests kernels tiles demo 20b 120b 131k 131k-offload moe 20b-attn 20b-4096)"; SUMMARY+=("$stage unknown") ;;
  esac
done
rm -rf "$TMP"
echo "== summary ($((SECONDS - START))s; files in $OUT: env.txt gpu_bench.log results.jsonl)"
for line in ${SUMMARY[@]+"${SUMMARY[@]}"}; do echo "   $line"; done
