#!/usr/bin/env bash
# Start wanserve through the repository's ./launch.sh, from any directory. Extra arguments go
# to launch.sh; with none it serves the tiny model on http://127.0.0.1:8000.
#
#   ./run_server.sh
#   ./run_server.sh --port 8001 --nproc 2 --ulysses 2
#   ./run_server.sh --config configs/wan2.2-i2v-a14b-480p.yaml --model /path/to/Wan2.2-I2V-A14B-Diffusers \
#                   --nproc 8 --ulysses 4 --cfg 2
#
# --config paths are relative to the repository root, where launch.sh runs.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
# exec: a SIGTERM or Ctrl-C sent to this script reaches launch.sh, which stops every rank
exec "$repo/launch.sh" "$@"
