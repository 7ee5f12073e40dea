#!/usr/bin/env bash
# The protocol's cpu tables (issue 18), resumable end to end: rerun it until it prints "done".
# Usage: benchmarks/tables_cpu.sh DATASET   (mnist or fmnist; 2 cores, hours)
#   1. MBD labels through a resumable run (chunk checkpoints under .cache/db3kd/runs), so that the
#      tuning trials and every seed read them from the label cache instead of recomputing them;
#   2. equal tuning: 10 Optuna trials per method on the validation split (benchmarks/tune_cpu.sh);
#   3. the harness: 5 seeds for the rows of the paper's Table 1 and label-smoothing, 3 for the others.
# Records are written as cases finish and finished cases are reused (same config hash, teacher and code).
set -euo pipefail
dataset=${1:?dataset}
table1="student-ce teacher-ce standard-kd surrogate-kd noise-logits db3kd-sd db3kd-bd db3kd-mbd label-smoothing"
others="hard-label-kd vote-kd tf-kd-self tf-kd-reg ban teacher-arch-ce sskd noise-input zsdb3kd zskt fs-bbt fs-bbt-labels"
OMP_NUM_THREADS=1 uv run db3kd run --dataset "$dataset" --method db3kd-mbd --profile cpu --run-dir .cache/db3kd/runs \
  --set milestone_students=false --data-root ../shared/datasets --no-tracking --no-progress >/dev/null
benchmarks/tune_cpu.sh "$dataset" 10 $(echo "$table1" | sed 's/teacher-ce//') $others
pick() { local out=""; for m in $1; do out="${out:+$out or }$dataset-$m-s"; done; echo "$out"; }
uv run pytest benchmarks -m "$dataset" --profile cpu --seeds 5 --data-root ../shared/datasets -k "$(pick "$table1")"
uv run pytest benchmarks -m "$dataset" --profile cpu --seeds 3 --data-root ../shared/datasets -k "$(pick "$others")"
echo done
