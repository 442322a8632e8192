#!/usr/bin/env bash
# Start wanserve: prepare .venv if needed, then torchrun one process per rank.
#
#   ./launch.sh                                  # tiny model, 1 rank, http://127.0.0.1:8000
#   ./launch.sh --nproc 4 --ulysses 2 --cfg 2    # 4 ranks: Ulysses 2 x CFG 2
#   ./launch.sh --config configs/wan2.2-i2v-a14b-480p.yaml --model /models/Wan2.2-I2V-A14B-Diffusers
#
# Every flag but --nproc goes to the server (see `./launch.sh --help`).
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -f .venv/.installed ]; then
  echo "wanserve: preparing the environment (first run)..." >&2
  make install >&2
fi

nproc=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nproc) nproc="$2"; shift 2 ;;
    --nproc=*) nproc="${1#*=}"; shift ;;
    -h|--help) exec .venv/bin/python -m api.main --help ;;
    *) args+=("$1"); shift ;;
  esac
done
if [ -z "$nproc" ]; then
  nproc=$(.venv/bin/python -m engine.config "${args[@]+"${args[@]}"}")
fi

# One thread per rank unless the caller says otherwise: ranks share the machine's cores.
if [ "$nproc" -gt 1 ]; then export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"; fi
export PYTHONUNBUFFERED=1
.venv/bin/torchrun --standalone --nproc-per-node "$nproc" --no-python \
  .venv/bin/python -m api.main "${args[@]+"${args[@]}"}" &
launcher=$!

# SIGTERM/SIGINT go to the ranks, not to torchrun: rank 0 drains and tells the others to
# stop, every rank exits 0, and torchrun with them. torchrun escalates on its own if not.
stop_ranks() { pkill -TERM -P "$launcher" 2>/dev/null || kill -TERM "$launcher" 2>/dev/null; }
trap stop_ranks TERM INT
status=0
while kill -0 "$launcher" 2>/dev/null; do
  wait "$launcher" && status=0 || status=$?
done
exit "$status"
