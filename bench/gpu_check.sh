#!/usr/bin/env bash
# The prepared GPU check (issue 14): on a one-GPU machine, from a fresh copy of the repo, in
# under 8 minutes. Each section runs under its own time limit; a failing or timed-out section
# is reported and the next one still runs. A summary closes the output.
#
#   bash bench/gpu_check.sh                 # on the GPU machine (repo root or anywhere)
#   bash bench/gpu_check.sh --cpu-dry-run   # the same steps on CPU with a tiny family
#
# Sections: setup (torch + requirements, offline-tolerant), CUDA tests (pytest -m gpu), DARE
# masks CPU == CUDA bit for bit (+ mask throughput), family (bench/make_family.py: the 542M
# "0.5B" family, or a tiny one in the dry run), merges (every registered method on CPU and on
# --device cuda: wall, peak RSS, peak GPU memory, CPU/CUDA agreement), AIM calibration with
# device_map="auto", vLLM evaluation (skipped when vLLM cannot be installed).
set -uo pipefail   # no -e here: a section's failure is reported, not fatal

cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--cpu-dry-run" ]] && DRY=1
DEVICE=cuda
FAMILY_ARGS=""   # make_family.py's defaults: hidden 2048, 8 layers, vocab 32000 (4 x 1.08 GB)
SMALL_FAMILY="--hidden 1024 --layers 4 --intermediate 2816 --vocab 16000"   # 4 x 0.14 GB
if ((DRY)); then
  DEVICE=cpu
  FAMILY_ARGS="--hidden 64 --layers 2 --intermediate 128 --vocab 512"
fi
WORK=${GPU_CHECK_WORK:-bench_out/gpu_check}
LOGS=$WORK/logs
mkdir -p "$LOGS"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PIP_DISABLE_PIP_VERSION_CHECK=1
DEADLINE=${GPU_CHECK_SECONDS:-460}   # the sections' limits are cut to end within this
SUMMARY=()
START=$SECONDS

# section NAME LIMIT_S FUNCTION: run FUNCTION in a subshell (set -e there) under `timeout`,
# log to $LOGS/NAME.log, echo it live, and record ok / FAILED / TIMEOUT / SKIPPED (exit 3).
section() {
  local name=$1 limit=$2 fn=$3 began=$SECONDS rc
  local left=$((DEADLINE - (SECONDS - START)))
  if ((left < 5)); then
    SUMMARY+=("$(printf '%-10s %-40s' "$name" "NOT RUN (out of time)")")
    return
  fi
  ((limit > left)) && limit=$left
  echo "=== $name (limit ${limit}s) ==="
  timeout --kill-after=10 "$limit" bash -c "set -euo pipefail; $(declare -f "$fn"); $fn" \
    2>&1 | tee "$LOGS/$name.log"
  rc=${PIPESTATUS[0]}
  local took=$((SECONDS - began)) status
  case $rc in
    0) status=ok ;;
    3) status=SKIPPED ;;
    124|137) status="TIMEOUT after ${limit}s" ;;
    *) status="FAILED (exit $rc; log $LOGS/$name.log)" ;;
  esac
  SUMMARY+=("$(printf '%-10s %-40s %4ss' "$name" "$status" "$took")")
}

setup() {
  # the dry run keeps this machine's environment as it is
  if ((!DRY)); then
    # torch: keep one that imports (the GPU image's CUDA build); else the default wheel, which
    # on Linux x86-64 is the CUDA build
    if ! $PY -c 'import torch' 2>/dev/null; then
      $PY -m pip install -q --retries 0 --timeout 20 torch
    fi
    # requirements.txt: from the index if reachable, else from wheels carried in .whl/
    $PY -m pip install -q --retries 0 --timeout 20 -r requirements.txt ||
      { [[ -d .whl ]] && $PY -m pip install -q --no-index --find-links .whl -r requirements.txt; } ||
      echo "setup: requirements.txt did not fully install (offline?); using what is there"
  fi
  # what is still missing: the merge path needs torch, safetensors, yaml, tqdm; AIM also
  # transformers, accelerate, tokenizers; evaluation lm_eval (and vllm for its backend)
  $PY - <<'EOF'
import importlib.util, torch
need = ["safetensors", "yaml", "tqdm", "transformers", "accelerate", "tokenizers", "pytest"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
optional = [m for m in ("lm_eval", "datasets", "vllm") if importlib.util.find_spec(m) is None]
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
print(f"missing optional modules: {optional or 'none'}")
raise SystemExit(f"missing required modules: {missing}" if missing else 0)
EOF
  if ((!DRY)); then $PY -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; fi
}

cuda_tests() {
  # the suite's CUDA tests are marked `gpu` (pytest.ini); without CUDA they are skipped
  OMP_NUM_THREADS=4 $PY -m pytest -q -m gpu tests/test_methods.py tests/test_dare_masks.py \
    tests/test_aim_stats.py tests/test_new_methods.py
}

masks() {
  $PY bench/gpu_check.py masks --device "$DEVICE" --work "$WORK"
  $PY bench/bench_masks.py --device "$DEVICE" --elements $((DRY ? 1 << 20 : 1 << 26)) --repeats 3
  $PY bench/bench_masks.py --device cpu --threads "$(nproc)" \
    --elements $((DRY ? 1 << 20 : 1 << 26)) --repeats 3
}

family() {
  # shellcheck disable=SC2086  # the size flags split into words on purpose
  if [[ -f "$WORK/family/expert3/config.json" ]]; then
    echo "reusing $WORK/family"
  elif [[ -e "$WORK/family" ]]; then  # never delete a folder this script did not make
    echo "family: $WORK/family exists but holds no family; move it or set GPU_CHECK_WORK"
    return 1
  elif ! timeout 100 $PY bench/make_family.py --out "$WORK/family" --experts 3 $FAMILY_ARGS; then
    echo "family: the family did not build within 100 s; using a smaller one ($SMALL_FAMILY)"
    rm -rf "$WORK/family"  # made just now by the timed-out build
    $PY bench/make_family.py --out "$WORK/family" --experts 3 $SMALL_FAMILY
  fi
  du -sh "$WORK/family"
}

merges() {
  $PY bench/gpu_check.py merges --device "$DEVICE" --family "$WORK/family" --work "$WORK/merges"
}

aim() {
  $PY bench/gpu_check.py aim --device "$DEVICE" --work "$WORK"
}

vllm_eval() {
  if ! $PY -c 'import vllm' 2>/dev/null && ((!DRY)); then
    $PY -m pip install -q --retries 0 --timeout 20 vllm ||
      { [[ -d .whl ]] && $PY -m pip install -q --no-index --find-links .whl vllm; } || true
  fi
  $PY bench/gpu_check.py vllm --work "$WORK"
}

export PY DEVICE WORK DRY LOGS FAMILY_ARGS SMALL_FAMILY

section setup 90 setup
section masks 60 masks
section cuda-tests 120 cuda_tests
section family 150 family
section merges 200 merges
section aim 60 aim
section vllm 120 vllm_eval

echo
echo "=== summary ($((SECONDS - START)) s; device $DEVICE; logs in $LOGS) ==="
printf '%s\n' "${SUMMARY[@]}"
echo "cuda-tests: $(tail -n 1 "$LOGS/cuda-tests.log" 2>/dev/null)"
grep -h -E '^(masks|aim|vllm|family):|^\| |elements/s' \
  "$LOGS"/{masks,family,merges,aim,vllm}.log 2>/dev/null || true
