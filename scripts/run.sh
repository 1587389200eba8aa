#!/usr/bin/env bash
# Sets up (if needed) and runs the main job: albef main (real data, report in runs/main/report.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/albef main "$@"
