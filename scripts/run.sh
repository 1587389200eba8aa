#!/usr/bin/env bash
# Sets up (if needed) and runs the main job: albef's built-in demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/albef demo "$@"
