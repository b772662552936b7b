#!/usr/bin/env bash
# Regenerates the Fashion-MNIST study in docs/study/fashion-mnist/: the paper's protocol
# (2 seeds), the authors' protocol (1 seed), the lam sweep at batch 16384, the paper's 100
# epochs at the smallest and largest batch, Barlow Twins, and the schedule without warm-up
# (pilot, 3 seeds, ablation, cosine without ramp, heavy-ball, authors' protocol, CNN, TVLARS as
# published), each a resumable sweep (an interrupted study, started again, runs only what is
# missing), then their reports and
# figures. About 17 CPU-hours on one thread per run, two runs at a time; needs
# Fashion-MNIST (apt-get install dataset-fashion-mnist, or --data-dir in src/tvlars/grids/).
# Long studies belong in a checkout pinned at a commit: git worktree add ../study HEAD.
# Run folders stay in runs/ (not committed: checkpoints).
set -euo pipefail
cd "$(dirname "$0")/.."
tvlars=${TVLARS:-.venv/bin/tvlars}
runs=${RUNS:-runs}
docs=docs/study/fashion-mnist
grids="fashion-mnist-paper fashion-mnist-official fashion-mnist-lam fashion-mnist-100 fashion-mnist-barlowtwins fashion-mnist-barlowtwins-long
       fashion-mnist-schedule-pilot fashion-mnist-schedule fashion-mnist-schedule-ablation fashion-mnist-schedule-official
       fashion-mnist-schedule-cnn fashion-mnist-schedule-published fashion-mnist-schedule-cosine
       fashion-mnist-schedule-heavyball"
for grid in $grids; do
  "$tvlars" sweep "$grid" --out "$runs/$grid"
done
for grid in $grids; do
  dest="$docs/${grid#fashion-mnist-}"      # docs/study/fashion-mnist/paper, .../barlowtwins, ...
  "$tvlars" report "$runs/$grid" --out "$dest"
  "$tvlars" report "$runs/$grid" --out "$dest/final" --metric final
  "$tvlars" plot "$runs/$grid" --out "$dest/figures" --format png   # the docs show PNGs
done

# Views across grids, folders of links that tvlars report and plot read as one sweep:
# schedule-all, every warm-up-free schedule at 3 seeds beside both LARS baselines (the cosine
# row's seed 0 is the ablation's); schedule-16384, every method at batch 16384, each at its best lr.
view() {  # view NAME GLOB SWEEP...: link the runs matching GLOB of each SWEEP into $runs/NAME
  local name=$1 glob=$2 sweep run
  shift 2
  mkdir -p "$runs/$name"
  for sweep in "$@"; do
    for run in "$runs/$sweep"/$glob/; do
      if [ -f "$run/config.yaml" ]; then
        ln -sfn "$(cd "$run" && pwd)" "$runs/$name/${sweep#fashion-mnist-}--$(basename "$run")"
      fi
    done
  done
}
view schedule-all '*' fashion-mnist-schedule fashion-mnist-schedule-cosine fashion-mnist-schedule-heavyball
view schedule-all 'schedule-warmup-cosine_*' fashion-mnist-schedule-ablation
view schedule-16384 '*batch_size-16384_*' fashion-mnist-schedule fashion-mnist-schedule-ablation fashion-mnist-schedule-cosine \
  fashion-mnist-schedule-heavyball
view schedule-16384 '*' fashion-mnist-schedule-published      # all at 16384: its names omit the batch
"$tvlars" report "$runs/schedule-all" --out "$docs/schedule-all"
"$tvlars" report "$runs/schedule-all" --out "$docs/schedule-all/final" --metric final
"$tvlars" plot "$runs/schedule-16384" --out "$docs/schedule-16384/figures" --format png --figures curves --lrs best
