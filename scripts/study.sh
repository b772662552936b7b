#!/usr/bin/env bash
# Regenerates the reproduction study in docs/study/: the digits grid (270 runs, ~20-30 min
# on 2 CPU cores; an interrupted study, started again, runs only what is missing), its
# report and its figures. Run folders stay in runs/digits (not committed: checkpoints).
set -euo pipefail
cd "$(dirname "$0")/.."
tvlars=${TVLARS:-.venv/bin/tvlars}
"$tvlars" sweep digits --out runs/digits
"$tvlars" report runs/digits --out docs/study
"$tvlars" report runs/digits --out docs/study/final --metric final
"$tvlars" plot runs/digits --out docs/study/figures --format png   # the docs show PNGs
