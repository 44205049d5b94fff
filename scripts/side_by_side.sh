#!/usr/bin/env bash
# spikeclip against the PyTorch + SpikingJelly reference, measured side by side on this machine.
#
#   scripts/side_by_side.sh [--cases img_train_b32,txt_infer_b1024] [--iters N] [--threads N]
#
# Sets up the reference in a virtual environment outside the repository ($SPIKECLIP_REF_VENV,
# default ~/.cache/spikeclip-ref: torch and spikingjelly==0.0.0.0.14 from the package index;
# extra pip arguments in $SPIKECLIP_REF_PIP_ARGS, e.g. "--index-url
# https://download.pytorch.org/whl/cpu" for the smaller CPU-only torch), builds the release
# binary, then runs every case ours-then-theirs, each in its own process, back to back, and
# prints a markdown table of medians, peak RSS and ratios, with the CPU model and the SIMD path
# each of our kernels took. Threads: RAYON_NUM_THREADS and torch's intra-op threads, 2 by
# default. The raw JSON of both sides is kept in $SIDE_BY_SIDE_OUT (default a temporary dir).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cases=img_train_b32,img_train_b64,img_infer_b64,txt_train_b256,txt_infer_b1024,lif_fwd_bwd
iters=""
threads=2
while [ $# -gt 0 ]; do
    case "$1" in
        --cases) cases=$2; shift 2 ;;
        --iters) iters=$2; shift 2 ;;
        --threads) threads=$2; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "side_by_side.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

venv=${SPIKECLIP_REF_VENV:-$HOME/.cache/spikeclip-ref}
py="$venv/bin/python"
if ! [ -x "$py" ] || ! "$py" -c 'import torch, spikingjelly, safetensors' 2>/dev/null; then
    echo "setting up the reference in $venv" >&2
    python3 -m venv "$venv"
    # shellcheck disable=SC2086 # the extra arguments are meant to split
    "$py" -m pip install --quiet ${SPIKECLIP_REF_PIP_ARGS:-} torch spikingjelly==0.0.0.0.14 safetensors
fi

(cd "$root" && cargo build --release --quiet)
bin="${CARGO_TARGET_DIR:-$root/target}/release/spikeclip"
out=${SIDE_BY_SIDE_OUT:-$(mktemp -d)}
mkdir -p "$out"
iter_args=()
[ -n "$iters" ] && iter_args=(--iters "$iters")
export RAYON_NUM_THREADS=$threads OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads

IFS=, read -r -a names <<< "$cases"
for name in "${names[@]}"; do
    echo "$name: spikeclip" >&2
    "$bin" bench --case "$name" --json "$out/ours_$name.json" "${iter_args[@]}" > "$out/ours_$name.log"
    echo "$name: reference" >&2
    "$py" "$root/scripts/bench_reference.py" --case "$name" --threads "$threads" \
        --json "$out/ref_$name.json" "${iter_args[@]}" > "$out/ref_$name.log"
done

"$py" - "$out" "$threads" "${names[@]}" <<'EOF'
import json, pathlib, sys

out, threads, names = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3:]

def result(side, name):
    return json.loads((out / f"{side}_{name}.json").read_text())[name]

def mib(r):
    return f"{r['peak_rss_mib']:.0f} MiB"

def seconds(s):
    return f"{s:.3f} s" if s < 1 else f"{s:.2f} s"

print("| case | spikeclip median | reference median | speed | spikeclip peak RSS "
      "| reference peak RSS | memory |")
print("|---|---|---|---|---|---|---|")
for name in names:
    ours, ref = result("ours", name), result("ref", name)
    speed = ref["median_s"] / ours["median_s"]
    memory = ours["peak_rss_mib"] / ref["peak_rss_mib"]
    print(f"| `{name}` | {seconds(ours['median_s'])} | {seconds(ref['median_s'])} | {speed:.2f}x "
          f"| {mib(ours)} | {mib(ref)} | {memory:.2f}x |")
log = (out / f"ours_{names[0]}.log").read_text().splitlines()
ref_log = (out / f"ref_{names[0]}.log").read_text().splitlines()
print()
print(f"{threads} threads each; speed = reference median / spikeclip median, "
      "memory = spikeclip peak RSS / reference peak RSS.")
for line in log:
    if line.startswith(("cpu:", "simd:")):
        print(f"- {line}")
if ref_log:
    print(f"- reference: {ref_log[0].split('(', 1)[-1].rstrip(')')}")
print(f"- raw results: {out}")
EOF
