#!/usr/bin/env bash
# Device check for a GPU machine (no network; jax, flax, optax, orbax, einops, torch preinstalled).
#
#   bash experiments/bench/gpu_check.sh            # from anywhere; results in $OUT or experiments/results/
#
# Environment: OUT (results folder), PYTHON (default python3), SKIP_INSTALL=1, TEST_TIMEOUT,
# SSD_TIMEOUT, ATTN_TIMEOUT, TUNE_TIMEOUT, HYBRID_TIMEOUT (seconds), TUNE_ARGS (e.g. --quick), SSD_LENGTHS, SSD_CHUNKS, ATTN_LENGTHS (comma lists).
#
# Stages (each under its own timeout, so one that hangs or runs long cannot eat the others' time;
# the benchmarks print one JSON line per case, flushed, so a timed-out stage still leaves its
# finished cases behind):
#   1. pip install --no-deps -e .   (no build isolation: nothing can be downloaded; PYTHONPATH is set
#      to the checkout as well, so the rest runs even if the install fails)
#   2. pytest -m gpu on the Pallas kernel tests (flash attention, SSD): compiled kernels against the
#      references at realistic shapes                                   -> pytest_gpu.log, .xml
#   3. SSD benchmark, pallas vs xla, fwd+bwd, bf16                       -> bench_ssd_pallas.jsonl
#   4. attention benchmark (ours vs cuDNN, jax's Pallas mha, XLA)       -> bench_attention.jsonl
#   5. kernel block tuning (bench/kernels.py --tune)                    -> bench_kernels.jsonl, tuned_blocks.json
#   6. 124M hybrid train step at L=4K, pallas vs xla, MFU               -> bench_hybrid_step.jsonl
# STAGES (default 2,3,4,5,6) picks the stages after the install. All of them take up to ~17 minutes
# with the default timeouts (mostly compile time): split them over two calls where one call is limited
# to 10 minutes (e.g. STAGES=2,3 then STAGES=4,5,6). Narrow the sweeps with the
# environment variables below when time is short. Exit status: that of the pytest stage.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUT_DIR="${OUT:-$ROOT/experiments/results}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
TEST_TIMEOUT="${TEST_TIMEOUT:-300}"
SSD_TIMEOUT="${SSD_TIMEOUT:-240}"
ATTN_TIMEOUT="${ATTN_TIMEOUT:-150}"
TUNE_TIMEOUT="${TUNE_TIMEOUT:-150}"
HYBRID_TIMEOUT="${HYBRID_TIMEOUT:-150}"
STAGES="${STAGES:-2,3,4,5,6}"
want() { [[ ",$STAGES," == *",$1,"* ]]; }
TEST_RC=0
SSD_LENGTHS="${SSD_LENGTHS:-2048,4096,8192,16384}"
SSD_CHUNKS="${SSD_CHUNKS:-256,128}"
ATTN_LENGTHS="${ATTN_LENGTHS:-2048,8192}"

log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$OUT_DIR/gpu_check.log"; }

log "stage 1: install"
if [ -z "${SKIP_INSTALL:-}" ]; then
  "$PY" -m pip install --no-deps --no-build-isolation -e . > "$OUT_DIR/pip_install.log" 2>&1 \
    || log "pip install failed (see pip_install.log); continuing with PYTHONPATH=$ROOT"
fi
"$PY" - > "$OUT_DIR/env.json" 2>> "$OUT_DIR/gpu_check.log" <<'EOF'
import json, platform, jax
print(json.dumps({"python": platform.python_version(), "jax": jax.__version__,
                  "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
                  "device_kind": jax.devices()[0].device_kind}))
EOF
cat "$OUT_DIR/env.json" | tee -a "$OUT_DIR/gpu_check.log"

if want 2; then
log "stage 2: pytest -m gpu (timeout ${TEST_TIMEOUT}s)"
timeout "$TEST_TIMEOUT" "$PY" -m pytest -m gpu tests/test_ssd_pallas.py tests/test_flash_attention.py \
  -q -rs -p no:cacheprovider --durations=15 --junitxml="$OUT_DIR/pytest_gpu.xml" \
  > "$OUT_DIR/pytest_gpu.log" 2>&1
TEST_RC=$?
log "pytest exit status $TEST_RC: $(tail -n 1 "$OUT_DIR/pytest_gpu.log")"
fi

if want 3; then
log "stage 3: SSD benchmark (timeout ${SSD_TIMEOUT}s)"
timeout "$SSD_TIMEOUT" "$PY" experiments/bench/ssd_pallas.py --lengths "$SSD_LENGTHS" --chunks "$SSD_CHUNKS" \
  --repeats 5 > "$OUT_DIR/bench_ssd_pallas.jsonl" 2> "$OUT_DIR/bench_ssd_pallas.err"
log "ssd benchmark exit status $? ($(wc -l < "$OUT_DIR/bench_ssd_pallas.jsonl") lines)"
fi

if want 4; then
log "stage 4: attention benchmark (timeout ${ATTN_TIMEOUT}s)"
timeout "$ATTN_TIMEOUT" "$PY" experiments/bench/attention.py --lengths "$ATTN_LENGTHS" --dims 64,128 \
  --modes fwd+bwd --repeats 5 > "$OUT_DIR/bench_attention.jsonl" 2> "$OUT_DIR/bench_attention.err"
log "attention benchmark exit status $? ($(wc -l < "$OUT_DIR/bench_attention.jsonl") lines)"
fi

if want 5; then
log "stage 5: kernel block tuning (timeout ${TUNE_TIMEOUT}s) -> tuned_blocks.json"
timeout "$TUNE_TIMEOUT" "$PY" experiments/bench/kernels.py --tune --table "$OUT_DIR/tuned_blocks.json" --reps 5 ${TUNE_ARGS:-} \
  > "$OUT_DIR/bench_kernels.jsonl" 2> "$OUT_DIR/bench_kernels.err"
log "kernel tuning exit status $? ($(wc -l < "$OUT_DIR/bench_kernels.jsonl") lines)"
fi

if want 6; then
log "stage 6: 124M hybrid train step at L=4K, pallas vs xla, MFU (timeout ${HYBRID_TIMEOUT}s)"
ALTBENCH_KERNEL_TABLE="$OUT_DIR/tuned_blocks.json" timeout "$HYBRID_TIMEOUT" "$PY" experiments/bench/hybrid_step.py \
  > "$OUT_DIR/bench_hybrid_step.jsonl" 2> "$OUT_DIR/bench_hybrid_step.err"
log "hybrid step exit status $? ($(wc -l < "$OUT_DIR/bench_hybrid_step.jsonl") lines)"
fi
log "done; results in $OUT_DIR"
exit "$TEST_RC"
