#!/usr/bin/env bash
# The GPU figures for bench/RESULTS.md in one command on a lent GPU machine (CUDA image with torch;
# no package index). The reference's pinned pure-Python packages travel as wheels in .whl/ (made
# here by `bash bench/gpu.sh --download`). Its transformers 4.26.1 pins tokenizers < 0.14, which
# has no wheel for the machine's Python 3.12; the reference's BertTokenizer is the pure-Python one,
# so the pin is relaxed to let transformers import beside the image's tokenizers (ours uses it).
# Writes $OUT/RESULTS.md (bench/RESULTS.md with the CUDA blocks replaced) and the smoke runs' logs.
# Usage: here `bash bench/gpu.sh --download` once (.whl/ is git-ignored: carry it to the
# machine); there `bash bench/gpu.sh` (~9 min, inside one command's 10-minute limit); copy the
# blocks of $OUT/RESULTS.md into bench/RESULTS.md. `bash bench/gpu.sh --bf16-only` runs the bf16
# blocks alone (~5 min).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--download" ]; then
  mkdir -p .whl && python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    salesforce-lavis==1.0.2 timm==0.4.12 transformers==4.26.1 huggingface-hub==0.36.2 omegaconf==2.4.0 numpy==1.26.4
  python3 -m pip wheel -q --no-deps -w .whl iopath==0.1.10 antlr4-python3-runtime==4.9.3 fairscale==0.4.4
  exit
fi
OUT=${OUT:-/tmp/albef-gpu}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
sed -i 's/"tokenizers>=0.11.1,!=0.11.3,<0.14"/"tokenizers>=0.11.1"/' /tmp/site/transformers/dependency_versions_table.py
export USE_FLAX=0 USE_TF=0 USE_TORCH=1 PYTHONPATH=/tmp/site:$PWD PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
cp bench/RESULTS.md "$OUT/RESULTS.md"
# --in-process: one process per command, as measured before: CUDA's caching allocator keeps what a
# run frees, so no step maps fresh memory either way, and a process per benchmark would cost the
# lease a CUDA start-up each
C="python3 bench/compare.py --device cuda --threads 16 --in-process --write $OUT/RESULTS.md"
fail=0
# a tiny run first: a CUDA-only failure shows in seconds, not after the long runs
# (without --ref-bf16 too when the reference fails under autocast: then its rows stay float32)
S="--preset albef-tiny --res 64 --batch 8 --small-preset= --reps 2 --reps-eval 1 --gallery 8 --k 8 --questions 4 --answers 50 --vqa-k 8"
REF=--ref-bf16 BF=1
if ! timeout 90 $C $S --bf16 --ref-bf16 --tf32 --write /tmp/smoke.md > "$OUT/smoke.log" 2>&1; then
  echo "SMOKE WITH THE REFERENCE IN BF16 FAILED"; REF=
  timeout 90 $C $S --bf16 --tf32 --write /tmp/smoke.md > "$OUT/smoke2.log" 2>&1 || { echo "BF16 SMOKE FAILED"; BF=0; fail=1; }
fi
# equal precision on both sides, albef-base res 256 batch 64, TF32 matrix multiplies on (PyTorch
# 1.8's default on Ampere and later, under which the authors trained):
# 1. both in bf16 autocast (the reference through LAVIS's own mixed-precision path: its model under
#    torch.autocast); 2. both in float32 (TF32). Each as its own block of RESULTS.md.
A="--preset albef-base --res 256 --batch 64 --small-preset= --tf32"
[ $BF = 1 ] && timeout 170 $C --what pretrain --bf16 $REF $A --reps 20 --marker compare-cuda 2>&1 | grep -v "^Ignored unknown" || fail=1
[ "${1:-}" != --bf16-only ] && timeout 130 $C --what pretrain $A --reps 10 --marker compare-cuda-fp32 2>&1 | grep -v "^Ignored unknown" || fail=1
# evaluation: ours in bf16 against the reference in bf16 (VQA) or float32 (retrieval: LAVIS's
# compute_sim_matrix stops under autocast), then both in float32 (TF32)
E="--what retrieval vqa --gallery 128 --k 128 --questions 64 --answers 3128 --vqa-k 128"
[ $BF = 1 ] && timeout 110 $C $E --bf16 $REF $A --reps-eval 2 --marker compare-cuda-eval 2>&1 | grep -v "^Ignored unknown" || fail=1
[ "${1:-}" != --bf16-only ] && timeout 100 $C $E $A --reps-eval 1 --marker compare-cuda-fp32-eval 2>&1 | grep -v "^Ignored unknown" || fail=1
# the training loop itself on CUDA: fp32, bf16, fp16 + GradScaler, resume
timeout 60 python3 bench/gpu_smoke.py /tmp/albef-smoke 2>&1 | grep '^{' | tee "$OUT/smoke.jsonl" || fail=1
exit $fail
