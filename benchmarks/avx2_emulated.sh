#!/usr/bin/env bash
# Training speed of this checkout against an older commit, with ATen's, oneDNN's and MKL's kernels capped at
# AVX2: what an AVX2-only CPU gets, measured on a newer one. For each mode (a short run's default: eager; a long
# run's: compiled) runs `slm train --preset P --max-steps 16` in the order base, this, this, base, and prints
# the median tokens/s of steps 4-16 with the precision and mode the run chose (--dtype is left at auto).
#
#   bash benchmarks/avx2_emulated.sh BASE_COMMIT DATA_DIR [PRESET]
#
# Each side gets its own slm cache (the bf16 probe is measured under the caps) and its own inductor cache:
# PyTorch 2.13's inductor cache does not key kernels on ATEN_CPU_CAPABILITY, and a capped process running
# kernels an uncapped one compiled gave NaN losses.
set -euo pipefail
base=$1 data=$(realpath "$2") preset=${3:-cpu-7m}
here=$(cd "$(dirname "$0")/.." && pwd)
python=$here/.venv/bin/python
scratch=$(mktemp -d /tmp/slm-avx2-XXXX)
trap 'git -C "$here" worktree remove --force "$scratch/base" >/dev/null 2>&1; rm -rf "$scratch"' EXIT
git -C "$here" worktree add --detach "$scratch/base" "$base" >/dev/null 2>&1
export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2

run() {  # side src mode rep
    local out=$scratch/$1-$3-$4 flag=--no-compile
    [ "$3" = compiled ] && flag=--compile
    XDG_CACHE_HOME=$scratch/cache-$1 TORCHINDUCTOR_CACHE_DIR=$scratch/inductor-$1 PYTHONPATH=$2 \
        "$python" -c "from slm.cli import main; main()" train --preset "$preset" --data "$data" --out "$out" \
        --max-steps 16 --log-interval 1 --eval-interval 1000 $flag > "$out.log" 2>&1
    "$python" - "$out" "$1" "$3" "$4" <<'EOF'
import json, statistics, sys
out, side, mode, rep = sys.argv[1:]
chose = " ".join(open(out + ".log").readline().split(" | ")[2:4])  # "fp32 eager": what the run picked
rates = [r["tokens_per_s"] for r in map(json.loads, open(out + "/metrics.jsonl"))
         if r.get("kind") == "train" and r["step"] >= 4]
print(f"| {mode} | {side} | {rep} | {chose} | {statistics.median(rates):,.0f} |")
EOF
}

echo "$preset, kernels capped at AVX2; this checkout ($(git -C "$here" rev-parse --short HEAD)) vs $base"
echo "| mode | side | run | chose | tokens/s |"
echo "|---|---|---|---|---|"
for mode in eager compiled; do
    run base "$scratch/base/src" $mode 1
    run this "$here/src" $mode 1
    run this "$here/src" $mode 2
    run base "$scratch/base/src" $mode 2
done
