#!/usr/bin/env bash
# Regenerates the side-by-side comparison in bench/RESULTS.md: sets up the reference environment
# (LAVIS 1.0.2 + albef, offline) when missing, then runs bench/compare.py with its defaults
# (albef-base res 224 batch 4 and albef-small res 128 batch 16 pretraining steps, retrieval
# evaluation, VQA ranking; 2 threads). Extra arguments go to compare.py. ~15-20 min on 2 cores (the comparison itself: 11-12 min).
set -euo pipefail
cd "$(dirname "$0")/.."
bash bench/setup_reference.sh
PYTHONWARNINGS=ignore bench/.venv-ref/bin/python bench/compare.py --write bench/RESULTS.md "$@"
