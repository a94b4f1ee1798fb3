#!/usr/bin/env bash
# CPU calibration for docs/training-on-cpu.md: which architecture, optimizer and model size give the lowest
# validation bits/byte for a given number of CPU minutes on this machine.
#
#   bash benchmarks/cpu_calibration.sh [VARIANT ...]     (default: all of them, one after the other)
#   python benchmarks/cpu_calibration_report.py          (table + plot from runs/calib/*/metrics.jsonl)
#
# Every variant: the same prepared data (all of ../shared/data, prepared into runs/all-data, see below),
# 4,096 tokens per step (batch 8 x context 512), 2 threads, warmup 40 steps then cosine to 10%, validation on
# the same 64 windows of the validation split, and a step count sized so the schedule ends in about MINUTES
# minutes on an idle 2-core machine (--max-minutes caps it should the machine be slower).
#
# Data (once):
#   slm prepare ../shared/data/*.jsonl.gz --out runs/all-data --vocab-size 8192 --val-fraction 0.02 --seed 0
#
# MACHINE=amx sizes the schedules for a 2-core Intel Xeon with AMX (bf16 + compile, measured by a 70-step probe
# of each shape); the default sizes are the 2-core AMD EPYC's (fp32). EXTRA adds flags to every variant (a
# data mix, --loss-on story).
set -euo pipefail
cd "$(dirname "$0")/.."
SLM=${SLM:-.venv/bin/slm}
DATA=${DATA:-runs/all-data}
OUT=${OUT:-runs/calib}
MINUTES=${MINUTES:-20}
MACHINE=${MACHINE:-epyc}
read -r -a EXTRA <<<"${EXTRA:-}"

COMMON=(--data "$DATA" --batch-size 8 --threads 2 --warmup-steps 40 --eval-windows 64 --log-interval 10
        --max-minutes "$((MINUTES * 2))")
ADAMW=(--optimizer adamw --lr 1.5e-3)
MUON=(--optimizer muon --muon-lr 0.02 --lr 1.5e-3)

# name: steps per 20 minutes (measured tokens/s), eval interval, model and optimizer flags
declare -A ARGS=(
  [a-gpt2-16m-adamw]="270 27 --preset slm-16m ${ADAMW[*]}"
  [b-llama-16m-adamw]="270 27 --preset llama-16m ${ADAMW[*]}"
  [c-llama-16m-muon]="190 19 --preset llama-16m ${MUON[*]}"
  [d1-llama-6l256-muon]="430 43 --preset llama-16m --n-layer 6 --n-head 4 --d-model 256 ${MUON[*]}"
  [d2-llama-6l192-muon]="600 60 --preset llama-16m --n-layer 6 --n-head 3 --d-model 192 ${MUON[*]}"
  [d3-llama-8l320-muon]="300 30 --preset llama-16m --n-layer 8 --n-head 5 --d-model 320 ${MUON[*]}"
  [e-llama-7l320-muon]="330 33 --preset llama-16m --n-layer 7 --n-head 5 --d-model 320 ${MUON[*]}"
  [f-llama-16m-adamw-b16]="135 14 --preset llama-16m --batch-size 16 ${ADAMW[*]}"
)
# Steps per 20 minutes on the AMX Xeon (tokens/s of the probe: c 3,100, d1 5,450, d3 3,310; e estimated
# from d3, ~3,700, as is its EPYC figure above; f, 8,192 tokens a step, from step_time.py's ratio to d1, ~4,350;
# its EPYC figure is b's halved, not measured).
declare -A AMX_STEPS=(
  [c-llama-16m-muon]=908 [d1-llama-6l256-muon]=1597 [d3-llama-8l320-muon]=970 [e-llama-7l320-muon]=1090
  [f-llama-16m-adamw-b16]=635
)
ORDER=(a-gpt2-16m-adamw c-llama-16m-muon d1-llama-6l256-muon b-llama-16m-adamw d2-llama-6l192-muon)

# RESUME=1 continues variants whose runs were stopped (training is deterministic, so a resumed run ends
# exactly where an uninterrupted one would).
variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=("${ORDER[@]}")
mkdir -p "$OUT"
for name in "${variants[@]}"; do
  read -r steps every flags <<<"${ARGS[$name]}"
  if [ "$MACHINE" = amx ]; then steps=${AMX_STEPS[$name]}; every=$((steps / 10)); fi
  steps=$((steps * MINUTES / 20)); every=$((every * MINUTES / 20))
  # shellcheck disable=SC2086
  cmd=("$SLM" train "${COMMON[@]}" --out "$OUT/$name" --max-steps "$steps" --eval-interval "$every" $flags "${EXTRA[@]}")
  if [ "${RESUME:-0}" = 1 ]; then
    cmd+=(--resume)
  else
    rm -rf "${OUT:?}/$name"
  fi
  echo "$(date -u +%FT%TZ) ${cmd[*]}" | tee -a "$OUT/commands.log"
  "${cmd[@]}" >> "$OUT/$name.log" 2>&1
done
