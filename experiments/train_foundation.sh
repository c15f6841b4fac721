#!/usr/bin/env bash
# Train (or resume) the 2-D foundation model of issue #32 and its ablations on synthetic data,
# in the background, resuming from last.ckpt across sessions:
#   experiments/train_foundation.sh [air_match_synth|air_match_local_synth|air_match_labels_synth|voxelmorph_synth] [overrides]
#   experiments/train_foundation.sh --save [experiment]   # copy the checkpoint and metrics to git
# Runs go to logs/foundation/<experiment>/ (checkpoints/last.ckpt, csv/ metrics, run_record.json).
# A fresh checkout has no logs/: the run then resumes from the copy kept under
# experiments/results/foundation/<experiment>/ (last.ckpt, metrics*.csv), saved by --save;
# each resumed part of the run logs its own metrics*.csv (Lightning's CSVLogger starts afresh).
# THREADS (default 1) caps torch's CPU threads, leaving the other core free.
set -euo pipefail
cd "$(dirname "$0")/.."
save=false
if [[ "${1:-}" == "--save" ]]; then save=true; shift; fi
exp="${1:-air_match_synth}"; shift || true
dir="logs/foundation/$exp"
kept="experiments/results/foundation/$exp"
if $save; then
    mkdir -p "$kept"
    cp "$dir/checkpoints/last.ckpt" "$kept/last.ckpt"
    cp "$dir"/csv/metrics*.csv "$kept/"
    echo "saved $dir -> $kept"; exit 0
fi
if [[ ! -f "$dir/checkpoints/last.ckpt" && -f "$kept/last.ckpt" ]]; then
    mkdir -p "$dir/checkpoints" "$dir/csv"
    cp "$kept/last.ckpt" "$dir/checkpoints/last.ckpt"
    cp "$kept"/metrics*.csv "$dir/csv/"
fi
resume=()
if [[ -f "$dir/checkpoints/last.ckpt" ]]; then
    resume=(ckpt_path=last)
    # Lightning's CSVLogger starts metrics.csv afresh: keep the earlier part beside it
    if [[ -f "$dir/csv/metrics.csv" ]]; then mv "$dir/csv/metrics.csv" "$dir/csv/metrics.$(date +%s).csv"; fi
fi
OMP_NUM_THREADS="${THREADS:-1}" exec python -m air_reg.train "experiment=$exp" \
    "hydra.run.dir=$dir" trainer.enable_progress_bar=false test=false "${resume[@]}" "$@"
