#!/usr/bin/env bash
# Start wanserve: prepare .venv if needed, then torchrun one process per rank.
#
#   ./launch.sh                                  # tiny model, 1 rank, http://127.0.0.1:8000
#   ./launch.sh --nproc 4 --ulysses 2 --cfg 2    # 4 ranks: Ulysses 2 x CFG 2
#   ./launch.sh --config configs/wan2.2-i2v-a14b-480p.yaml --model /models/Wan2.2-I2V-A14B-Diffusers
#   ./launch.sh --max-restarts 3                 # torchrun restarts every rank when one dies
#
# Several nodes, one job (run on each node, the same flags; README "Several nodes"):
#   ./launch.sh --nnodes 2 --nproc 8 --rdzv-endpoint node0:29400 [--rdzv-id JOB] ...   # c10d
#   ./launch.sh --nnodes 2 --nproc 8 --node-rank I --master-addr node0 --master-port 29500 ...
#
# --nproc, --nnodes, --node-rank, --master-addr, --master-port, --rdzv-endpoint, --rdzv-id and
# --max-restarts go to torchrun; every other flag goes to the server (`./launch.sh --help`).
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -f .venv/.installed ]; then
  echo "wanserve: preparing the environment (first run)..." >&2
  make install >&2
fi

nproc="" nnodes="1" node_rank="" master_addr="" master_port="" rdzv_endpoint="" rdzv_id=""
restarts="0"
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nproc|--nnodes|--node-rank|--master-addr|--master-port|--rdzv-endpoint|--rdzv-id|--max-restarts)
      [ $# -ge 2 ] || { echo "launch.sh: $1 needs a value" >&2; exit 2; }
      flag="$1" value="$2"; shift 2 ;;
    --nproc=*|--nnodes=*|--node-rank=*|--master-addr=*|--master-port=*|--rdzv-endpoint=*|--rdzv-id=*|--max-restarts=*)
      flag="${1%%=*}" value="${1#*=}"; shift ;;
    -h|--help) exec .venv/bin/python -m wanserve.api.main --help ;;
    *) args+=("$1"); shift; continue ;;
  esac
  case "$flag" in
    --nproc) nproc="$value" ;;
    --nnodes) nnodes="$value" ;;
    --node-rank) node_rank="$value" ;;
    --master-addr) master_addr="$value" ;;
    --master-port) master_port="$value" ;;
    --rdzv-endpoint) rdzv_endpoint="$value" ;;
    --rdzv-id) rdzv_id="$value" ;;
    --max-restarts) restarts="$value" ;;
  esac
done
if [ -z "$nproc" ]; then
  # the layout's world size, on one node; with several, say --nproc (ranks per node)
  [ "$nnodes" = 1 ] || { echo "launch.sh: with --nnodes, give --nproc (ranks per node)" >&2; exit 2; }
  nproc=$(.venv/bin/python -m wanserve.engine.config "${args[@]+"${args[@]}"}")
fi

# How the ranks find each other. One node: a rendezvous of its own. Several: torchrun's c10d
# rendezvous at --rdzv-endpoint (elastic: a node that restarts joins again; torchrun numbers
# the nodes, so the one serving HTTP is the one whose log says "serving"), or with --node-rank
# torchrun's static rendezvous at --master-addr:--master-port (node 0 holds rank 0 and serves).
if [ -n "$rdzv_endpoint" ]; then
  rendezvous=(--nnodes "$nnodes" --rdzv-backend c10d --rdzv-endpoint "$rdzv_endpoint"
              --rdzv-id "${rdzv_id:-wanserve}")
elif [ -n "$node_rank" ] || [ -n "$master_addr" ]; then
  [ -n "$node_rank" ] && [ -n "$master_addr" ] || {
    echo "launch.sh: --node-rank and --master-addr go together (or use --rdzv-endpoint)" >&2; exit 2; }
  rendezvous=(--nnodes "$nnodes" --node-rank "$node_rank" --master-addr "$master_addr"
              --master-port "${master_port:-29500}")
elif [ "$nnodes" != 1 ]; then
  echo "launch.sh: --nnodes $nnodes needs --rdzv-endpoint HOST:PORT, or --node-rank with --master-addr" >&2
  exit 2
else
  rendezvous=(--standalone)
fi

# One thread per rank unless the caller says otherwise: ranks share the machine's cores.
if [ "$nproc" -gt 1 ]; then export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"; fi
export PYTHONUNBUFFERED=1
# torch 2.13 keeps one rendezvous store across restarts, holding the last attempt's addresses: a
# restarted rank could read its peer's old one and fail to connect. A store per attempt instead.
if [ "$restarts" != 0 ]; then
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
fi
.venv/bin/torchrun "${rendezvous[@]}" --nproc-per-node "$nproc" --max-restarts "$restarts" \
  --no-python .venv/bin/python -m wanserve.api.main "${args[@]+"${args[@]}"}" &
launcher=$!

# SIGTERM/SIGINT go to the ranks, not to torchrun: rank 0 drains and tells the others to
# stop, every rank exits 0, and torchrun with them. torchrun escalates on its own if not.
# Once: the first signal makes launch.sh ignore the rest. A second one would reach a rank while
# Python tears it down (its handlers gone) and kill it mid-exit.
signalled=""
stop_ranks() {
  trap '' TERM INT
  signalled=$(pgrep -P "$launcher" | sort || true)
  local pid sent=""
  # each on its own: one child already gone must not make the live ranks count as unsignalled
  for pid in $signalled; do kill -TERM "$pid" 2>/dev/null && sent=1; done
  [ -z "$sent" ] || return 0
  signalled=torchrun  # no ranks (yet): torchrun stops whatever it started
  kill -TERM "$launcher" 2>/dev/null || true
}
trap stop_ranks TERM INT
# still our child and not a zombie (a reaped pid may be reused by another process)
running() { ps -o ppid=,stat= -p "$launcher" 2>/dev/null | awk -v me=$$ '$1 == me && $2 !~ /^Z/ {alive=1} END {exit !alive}'; }
# With --max-restarts, a rank that exits non-zero while stopping would have torchrun start the
# group again: a rank we did not signal is such a new one, and torchrun itself is stopped then
# (it stops its ranks and does not restart them).
started_again() {
  [ "$restarts" != 0 ] && [ -n "$signalled" ] && [ "$signalled" != torchrun ] &&
    pgrep -P "$launcher" | sort | comm -13 <(echo "$signalled") - | grep -q .
}
# `wait` also ends when the trap runs: until torchrun has ended, then its own status (bash keeps
# it), never the signal's
while running; do
  if [ "$restarts" != 0 ] && [ -n "$signalled" ]; then
    if started_again; then kill -TERM "$launcher" 2>/dev/null || true; signalled=torchrun; fi
    sleep 0.2
  else
    wait "$launcher" || true
  fi
done
wait "$launcher" && status=0 || status=$?
exit "$status"
