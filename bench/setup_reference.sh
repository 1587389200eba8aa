#!/usr/bin/env bash
# Sets up the reference peer for bench/compare.py in its own virtual environment, offline from
# any model hub: LAVIS 1.0.2 (the maintained release of the authors' ALBEF) beside albef, one
# torch for both so the comparison is the same kernels. Idempotent. Usage: bash bench/setup_reference.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${REF_VENV:-bench/.venv-ref}
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
PIP="$VENV/bin/pip install --quiet --disable-pip-version-check"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# the same torch pair as the project (on this project's machines pip finds it on local disk)
"$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null || $PIP "torch==2.14.1" "torchvision==0.29.1"
# LAVIS without its dependency list (it pins decord, opencv, spacy, ... for video/NLP models we
# do not run), then what its ALBEF modules import, at the versions it was released with
if ! "$VENV/bin/python" -c "import lavis" 2>/dev/null; then
  $PIP --no-deps "salesforce-lavis==1.0.2"
fi
$PIP "timm==0.4.12" "transformers==4.26.1" "numpy<2" "pandas<2.3" omegaconf iopath "fairscale==0.4.4" \
  "pillow>=10" safetensors pyyaml tqdm "opencv-python-headless>=4.8,<4.11"  # albef's RandomAugment; <4.11 runs on numpy 1
# albef itself, without its pins (tokenizers comes at the version transformers 4.26 accepts)
$PIP --no-deps -e .
"$VENV/bin/python" -c "import albef, transformers, timm; print('reference venv ready:', '$VENV')"
