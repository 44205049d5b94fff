#!/usr/bin/env bash
# The GPU checks of issue 19 on one CUDA device (default cuda:0), ending in one table:
#   1. the LIF fixtures (SpikingJelly) through the portable ops on the GPU;
#   2. the portable-vs-fused parity tests, and three training steps of each stage portable vs
#      fused (these take their tensors on the CPU: the CUDA build's portable ops, the CPU's
#      fused kernels as reference);
#   3. `demo --quick --device cuda`, its report saying where it ran;
#   4. the bench cases img_train_b64, img_infer_b64 and clip_b16_images on the GPU.
#
# Usage: scripts/gpu_check.sh [DEVICE]   (DEVICE: cuda or cuda:N)
# Uses the nvcc on PATH, else installs the pinned toolkit of scripts/cuda_toolkit.sh. Logs
# and results go to $GPU_CHECK_OUT (default: a new temporary directory). A failed check is
# marked in the table and the script exits non-zero after printing it.
set -uo pipefail

cd "$(dirname "$0")/.."
DEVICE="${1:-cuda:0}"
OUT="${GPU_CHECK_OUT:-$(mktemp -d -t spikeclip-gpu-check.XXXXXX)}"
mkdir -p "$OUT"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-$(nproc)}"
if ! command -v nvcc >/dev/null; then
    eval "$(bash scripts/cuda_toolkit.sh)" || { echo "error: no CUDA toolkit" >&2; exit 1; }
fi
TARGET="${CARGO_TARGET_DIR:-target}"
BIN="$TARGET/release/spikeclip"

ROWS=()
FAILED=0

# check NAME LOG COMMAND...: runs COMMAND with its output in $OUT/LOG, adds a table row.
check() {
    local name="$1" log="$OUT/$2"
    shift 2
    local start=$SECONDS
    if "$@" >"$log" 2>&1; then
        ROWS+=("| $name | ok | $((SECONDS - start)) s | $(summary "$log") |")
    else
        ROWS+=("| $name | FAILED (see $log) | $((SECONDS - start)) s | $(tail -n 1 "$log") |")
        FAILED=1
    fi
}

# The line of a log that says what a check found: cargo test's result, or the last line.
summary() {
    grep -h '^test result:' "$1" | tail -n 1 || tail -n 1 "$1"
}

# bench_row CASE: the bench case's median and throughput from the bench table.
bench_row() {
    local line
    line="$(grep -E "^$1 " "$OUT/bench.log" | tail -n 1)"
    if [[ -z "$line" ]]; then
        ROWS+=("| bench $1 on $DEVICE | FAILED (see $OUT/bench.log) | - | no result |")
        FAILED=1
        return
    fi
    read -r _ median _ _ rss per_s <<<"$line"
    ROWS+=("| bench $1 on $DEVICE | ok | median $median s | ${per_s:-?} items/s, peak RSS $rss MiB |")
}

check "build --release --features cuda" build.log cargo build --release --features cuda
check "LIF fixtures, portable ops on $DEVICE" lif_parity.log \
    env SPIKECLIP_TEST_DEVICE="$DEVICE" cargo test --features cuda --test lif_parity
check "device flag, CUDA build" device.log cargo test --features cuda --lib ops::device
check "portable vs fused ops (CPU tensors)" portable_ops.log \
    cargo test --features cuda --test portable_ops
check "3 steps of each stage, portable vs fused" portable_training.log \
    cargo test --features cuda --test portable_training
check "demo --quick --device $DEVICE" demo.log \
    "$BIN" --device "$DEVICE" demo --quick --out "$OUT/demo"
if [[ -f "$OUT/demo/report.json" ]]; then
    ran_on="$(grep -o '"device": *"[^"]*"' "$OUT/demo/report.json" | head -n 1)"
    ROWS+=("| demo report names its device | ${ran_on:-MISSING} | - | $OUT/demo/report.md |")
    [[ "$ran_on" == *"$DEVICE"* ]] || FAILED=1
fi
check "bench on $DEVICE" bench.log "$BIN" --device "$DEVICE" bench \
    --case img_train_b64,img_infer_b64,clip_b16_images --json "$OUT/bench.json"
for case in img_train_b64 img_infer_b64 clip_b16_images; do
    bench_row "$case"
done

echo
echo "GPU check on $DEVICE ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null \
    | head -n 1 || echo 'nvidia-smi missing')), logs in $OUT"
echo
echo "| check | result | time | detail |"
echo "|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
exit "$FAILED"
