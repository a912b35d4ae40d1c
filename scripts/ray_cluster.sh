#!/usr/bin/env bash
# A real Ray cluster of two nodes on this machine, for `--distributed-executor-backend ray`:
# a head and a worker node, each its own raylet (Ray's `ray start --head` and
# `ray start --address=HEAD`), with distinct ports and `--num-cpus 1` each, so vLLM's placement
# group (one CPU per rank) puts one pipeline stage on each node. On real machines the same two
# commands run once per machine; this only puts both nodes on one.
#
#   scripts/ray_cluster.sh start [DIR]    prints `export RAY_ADDRESS=...` once both nodes are up
#   scripts/ray_cluster.sh stop [DIR]     ends the nodes this script started (by their pids)
#   scripts/ray_cluster.sh status [DIR]   Ray's own `ray status`
#
# DIR (default $YAYI_RAY_DIR or /tmp/yayi-ray; short, since Ray's socket paths live under it) holds
# the pids, the logs and Ray's session files. RAY_HEAD_PORT (default 6379) is the head's port; the
# nodes' other ports follow it. RAY (default .venv/bin/ray) is the Ray command, whose Python the
# nodes' workers run: it must be the one yayi-serve and vLLM are installed in.
set -euo pipefail
ACTION=${1:?usage: ray_cluster.sh start|stop|status [DIR]}
DIR=${2:-${YAYI_RAY_DIR:-/tmp/yayi-ray}}
RAY=${RAY:-.venv/bin/ray}
PORT=${RAY_HEAD_PORT:-6379}
ADDRESS="127.0.0.1:$PORT"
NODES=(head worker1)
export RAY_USAGE_STATS_ENABLED=0

# Every port a node opens, from a base: two nodes on one machine must not share any.
ports() {
  local base=$1 workers=$2
  echo "--node-manager-port $((base + 1)) --object-manager-port $((base + 2))" \
    "--dashboard-agent-listen-port $((base + 3)) --dashboard-agent-grpc-port $((base + 4))" \
    "--runtime-env-agent-port $((base + 5)) --metrics-export-port $((base + 6))" \
    "--min-worker-port $workers --max-worker-port $((workers + 49))"
}

alive() { [ -f "$DIR/$1.pid" ] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

stop() {
  for node in "${NODES[@]}"; do
    if alive "$node"; then
      # `ray start --block` ends its raylet and the node's other processes on SIGTERM.
      kill "$(cat "$DIR/$node.pid")"
    fi
  done
  for node in "${NODES[@]}"; do
    for _ in $(seq 60); do alive "$node" || break; sleep 0.5; done
    if alive "$node"; then kill -9 "$(cat "$DIR/$node.pid")"; fi
    rm -f "$DIR/$node.pid"
  done
}

case "$ACTION" in
  start)
    if alive head; then echo "export RAY_ADDRESS=$(cat "$DIR/address")"; exit 0; fi
    mkdir -p "$DIR"
    # Each node: one CPU, a small object store (the stages pass activations, not objects).
    common=(--block --num-cpus 1 --object-store-memory 100000000 --disable-usage-stats)
    # shellcheck disable=SC2046
    setsid "$RAY" start --head --port "$PORT" --include-dashboard false --temp-dir "$DIR/session" \
      --ray-client-server-port $((PORT + 7)) --dashboard-port $((PORT + 8)) $(ports "$PORT" $((PORT + 100))) "${common[@]}" \
      >"$DIR/head.log" 2>&1 </dev/null &
    echo $! >"$DIR/head.pid"
    for _ in $(seq 120); do grep -q "Ray runtime started" "$DIR/head.log" && break; alive head || break; sleep 0.5; done
    # shellcheck disable=SC2046
    setsid "$RAY" start --address "$ADDRESS" $(ports $((PORT + 10)) $((PORT + 150))) "${common[@]}" \
      >"$DIR/worker1.log" 2>&1 </dev/null &
    echo $! >"$DIR/worker1.pid"
    echo "$ADDRESS" >"$DIR/address"
    for _ in $(seq 120); do
      up=$("$RAY" status --address "$ADDRESS" 2>/dev/null | grep -c '^ 1 node_' || true)
      if [ "$up" -ge "${#NODES[@]}" ]; then
        echo "ray cluster: ${#NODES[@]} nodes, 1 CPU each, head at $ADDRESS (logs in $DIR); stop it with: $0 stop $DIR" >&2
        echo "export RAY_ADDRESS=$ADDRESS"
        exit 0
      fi
      sleep 1
    done
    echo "ray cluster did not come up with ${#NODES[@]} nodes; the nodes' logs:" >&2
    tail -n 20 "$DIR/head.log" "$DIR/worker1.log" >&2 || true
    stop
    exit 1
    ;;
  stop)
    # Say what was stopped: a silent stop cannot be told from one that found nothing to stop.
    running=()
    for node in "${NODES[@]}"; do if alive "$node"; then running+=("$node"); fi; done
    stop
    if [ "${#running[@]}" -gt 0 ]; then
      echo "ray cluster: stopped ${running[*]} (logs in $DIR)" >&2
    else
      echo "ray cluster: no node of this script was running (pids in $DIR)" >&2
    fi
    ;;
  status) "$RAY" status --address "$(cat "$DIR/address" 2>/dev/null || echo "$ADDRESS")" ;;
  *) echo "usage: ray_cluster.sh start|stop|status [DIR]" >&2; exit 2 ;;
esac
