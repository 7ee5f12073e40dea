#!/usr/bin/env bash
# Equal tuning for the cpu tables: every method the same number of Optuna trials on the validation split.
# Usage: benchmarks/tune_cpu.sh DATASET [TRIALS] [METHOD ...]   (resumable: finished trials are kept)
# Writes benchmarks/tuned/<dataset>-cpu.json; one thread per study so that two can share 2 cores.
set -euo pipefail
dataset=${1:?dataset}; trials=${2:-10}; shift $(( $# >= 2 ? 2 : 1 ))
methods=${*:-"student-ce label-smoothing standard-kd surrogate-kd noise-logits db3kd-sd db3kd-bd db3kd-mbd hard-label-kd
  vote-kd tf-kd-self tf-kd-reg ban teacher-arch-ce sskd noise-input zsdb3kd zskt fs-bbt fs-bbt-labels"}
for m in $methods; do
  echo "== $m ($(date -u +%H:%M:%S))"
  OMP_NUM_THREADS=1 uv run db3kd tune --dataset "$dataset" --method "$m" --trials "$trials" --profile cpu \
    --data-root ../shared/datasets --no-tracking
done
