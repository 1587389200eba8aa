#!/usr/bin/env bash
# Regenerates the side-by-side comparison in bench/RESULTS.md: sets up the reference environment
# (LAVIS 1.0.2 + albef, offline) when missing, then runs bench/compare.py with its defaults
# (albef-base res 224 batch 4 and albef-small res 128 batch 16 pretraining steps, on the CPU again
# with ours in bf16 autocast; retrieval evaluation, VQA ranking; 2 threads; the CPU model and the
# float32 and bfloat16 matrix-multiply rates in the header). Extra arguments go to compare.py
# (--no-bf16-rows: float32 only). ~36 min on 2 cores (AMD EPYC), half of it the bf16 rows.
set -euo pipefail
cd "$(dirname "$0")/.."
bash bench/setup_reference.sh
PYTHONWARNINGS=ignore bench/.venv-ref/bin/python bench/compare.py --write bench/RESULTS.md "$@"
