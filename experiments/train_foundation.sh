#!/usr/bin/env bash
# Train (or resume) the 2-D foundation model of issue #32 and its ablations on synthetic data,
# in the background, resuming from last.ckpt across sessions:
#   experiments/train_foundation.sh [air_match_synth|air_match_local_synth|voxelmorph_synth] [overrides]
# Runs go to logs/foundation/<experiment>/ (checkpoints/last.ckpt, csv/ metrics, run_record.json).
# THREADS (default 1) caps torch's CPU threads, leaving the other core free.
set -euo pipefail
cd "$(dirname "$0")/.."
exp="${1:-air_match_synth}"; shift || true
dir="logs/foundation/$exp"
resume=()
if [[ -f "$dir/checkpoints/last.ckpt" ]]; then resume=(ckpt_path=last); fi
OMP_NUM_THREADS="${THREADS:-1}" exec python -m air_reg.train "experiment=$exp" \
    "hydra.run.dir=$dir" trainer.enable_progress_bar=false test=false "${resume[@]}" "$@"
