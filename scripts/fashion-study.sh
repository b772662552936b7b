#!/usr/bin/env bash
# Regenerates the Fashion-MNIST study in docs/study/fashion-mnist/: the paper's protocol
# (2 seeds), the authors' protocol (1 seed), the lam sweep at batch 16384, the paper's 100
# epochs at the smallest and largest batch, Barlow Twins, and the schedule without warm-up
# (pilot, 3 seeds, ablation, authors' protocol, CNN), each a resumable sweep (an
# interrupted study, started again, runs only what is missing), then their reports and
# figures. About 16 CPU-hours on one thread per run, two runs at a time; needs
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
       fashion-mnist-schedule-cnn fashion-mnist-schedule-published"
for grid in $grids; do
  "$tvlars" sweep "$grid" --out "$runs/$grid"
done
for grid in $grids; do
  dest="$docs/${grid#fashion-mnist-}"      # docs/study/fashion-mnist/paper, .../barlowtwins, ...
  "$tvlars" report "$runs/$grid" --out "$dest"
  "$tvlars" report "$runs/$grid" --out "$dest/final" --metric final
  "$tvlars" plot "$runs/$grid" --out "$dest/figures" --format png   # the docs show PNGs
done
