#!/usr/bin/env bash
# Stream queues, Warren vs RabbitMQ: append MESSAGES x SIZE-byte messages
# with publisher confirms to a fresh stream, then replay the whole stream
# from x-stream-offset=first with one consumer (prefetch 1000, manual acks).
# Same load generator (warren-perf, raw sockets) against both.
#
#   benches/stream.sh [--broker warren|rabbitmq|both]
#
# Environment: MESSAGES (10000000), SIZE (100), CONFIRM_WINDOW (1000),
# PREFETCH (1000), WARREN_BIN / PERF_BIN (prebuilt binaries; otherwise
# release builds), KEEP_WORKDIR=1.
# Prints msgs/s for append and replay and disk bytes per message, and
# appends a row to benches/results/STREAM.md.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MESSAGES=${MESSAGES:-10000000}
SIZE=${SIZE:-100}
WINDOW=${CONFIRM_WINDOW:-1000}
PREFETCH=${PREFETCH:-1000}
BROKER=both
while [ $# -gt 0 ]; do
  case "$1" in
    --broker) BROKER="$2"; shift 2 ;;
    --broker=*) BROKER="${1#*=}"; shift ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "stream.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$BROKER" in
  both) BROKERS=(warren rabbitmq) ;;
  warren|rabbitmq) BROKERS=("$BROKER") ;;
  *) echo "stream.sh: --broker must be warren, rabbitmq or both" >&2; exit 2 ;;
esac

log() { echo "[stream $(date +%H:%M:%S)] $*" >&2; }
die() { echo "stream.sh: $*" >&2; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
find_descendant() {
  local queue=("$1") p c
  while [ ${#queue[@]} -gt 0 ]; do
    p=${queue[0]}; queue=("${queue[@]:1}")
    for c in $(pgrep -P "$p" || true); do
      if [ "$(cat /proc/$c/comm 2>/dev/null)" = "$2" ]; then echo "$c"; return 0; fi
      queue+=("$c")
    done
  done
  return 1
}
wait_port() {
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    port_open "$1" && return 0
    [ -n "$LAUNCH_PID" ] && ! kill -0 "$LAUNCH_PID" 2>/dev/null && return 1
    sleep 0.1
  done
  return 1
}

RMQ_SERVER=/usr/lib/rabbitmq/bin/rabbitmq-server
for b in "${BROKERS[@]}"; do
  if [ "$b" = rabbitmq ] && [ ! -x "$RMQ_SERVER" ]; then
    log "installing rabbitmq-server (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq rabbitmq-server >/dev/null
    [ -x "$RMQ_SERVER" ] || die "rabbitmq-server is not installed and apt-get failed"
  fi
done
if [ -z "${WARREN_BIN:-}" ] || [ -z "${PERF_BIN:-}" ]; then
  log "building release binaries"
  (cd "$ROOT" && cargo build --release --bin warren --bin warren-perf 2>&1 | tail -n 3) >&2
fi
WARREN=${WARREN_BIN:-$ROOT/target/release/warren}
PERF=${PERF_BIN:-$ROOT/target/release/warren-perf}
[ -x "$PERF" ] || die "missing $PERF"

WORK=$(mktemp -d /tmp/warren-stream.XXXXXX)
EPMD_BEFORE=$(pgrep -x epmd || true)
BROKER_PID=""; LAUNCH_PID=""; PORT=""; DATA=""
stop_broker() {
  [ -n "$LAUNCH_PID" ] || return 0
  kill -TERM $BROKER_PID $LAUNCH_PID 2>/dev/null || true
  for ((i = 0; i < 300; i++)); do kill -0 "$BROKER_PID" 2>/dev/null || break; sleep 0.1; done
  kill -KILL $BROKER_PID $LAUNCH_PID 2>/dev/null || true
  wait "$LAUNCH_PID" 2>/dev/null || true
  BROKER_PID=""; LAUNCH_PID=""
}
cleanup() {
  stop_broker || true
  local now; now=$(pgrep -x epmd || true)
  if [ -z "$EPMD_BEFORE" ] && [ -n "$now" ]; then kill $now 2>/dev/null || true; fi
  if [ "${KEEP_WORKDIR:-0}" = 1 ]; then log "work dir kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_warren() {
  DATA="$WORK/warren/data"; mkdir -p "$DATA"
  PORT=$(free_port)
  (cd "$WORK/warren" && exec "$WARREN" --bind 127.0.0.1 --port "$PORT" --data-dir "$DATA" --log-level warn) > "$WORK/warren/stdout.log" 2>&1 &
  LAUNCH_PID=$!; BROKER_PID=$LAUNCH_PID
  wait_port "$PORT" 30 || die "Warren did not start"
  STREAM_DIR="$DATA/streams"
}
start_rabbitmq() {
  local dir="$WORK/rabbitmq" dist node
  mkdir -p "$dir"
  PORT=$(free_port); dist=$(free_port); node="wstream${$}@localhost"
  env HOME="$dir" RABBITMQ_NODENAME="$node" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
      RABBITMQ_NODE_PORT="$PORT" RABBITMQ_DIST_PORT="$dist" ERL_EPMD_ADDRESS=127.0.0.1 \
      RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log" \
      RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" RABBITMQ_PLUGINS_EXPAND_DIR="$dir/plugins" \
      RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
      setsid "$RMQ_SERVER" > "$dir/stdout.log" 2>&1 &
  LAUNCH_PID=$!
  wait_port "$PORT" 90 || die "RabbitMQ did not start"
  BROKER_PID=$(find_descendant "$LAUNCH_PID" beam.smp) || die "cannot find beam.smp"
  STREAM_DIR="$dir/mnesia"   # osiris segments live under the node's data dir
}

field() { python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]).get(sys.argv[2], 0))' "$1" "$2"; }

ROWS=()
for b in "${BROKERS[@]}"; do
  log "$b: starting"
  "start_$b"
  uri="amqp://guest:guest@127.0.0.1:$PORT/%2f"
  q="bench-stream"
  log "$b: appending $MESSAGES x $SIZE B with confirms (window $WINDOW)"
  "$PERF" --uri "$uri" --stream -u "$q" -x 1 -y 0 -s "$SIZE" -c "$WINDOW" -C "$MESSAGES" --json --quiet > "$WORK/$b-append.json" 2> "$WORK/$b-append.err" \
    || die "$b append failed: $(tail -n 3 "$WORK/$b-append.err")"
  sleep 2
  bytes=$(du -sb "$STREAM_DIR" | cut -f1)
  log "$b: replaying from first (prefetch $PREFETCH)"
  "$PERF" --uri "$uri" --predeclared -u "$q" -x 0 -y 1 -q "$PREFETCH" -A 100 --stream-offset first -D "$MESSAGES" --json --quiet > "$WORK/$b-replay.json" 2> "$WORK/$b-replay.err" \
    || die "$b replay failed: $(tail -n 3 "$WORK/$b-replay.err")"
  stop_broker
  a=$(field "$WORK/$b-append.json" confirm_rate); r=$(field "$WORK/$b-replay.json" consume_rate)
  per=$(python3 -c "print(round($bytes / $MESSAGES, 1))")
  log "$b: append $a msg/s, replay $r msg/s, $per disk bytes/message"
  ROWS+=("| $b | $MESSAGES x $SIZE B | $a | $r | $per |")
done
out="$ROOT/benches/results/STREAM.md"
mkdir -p "$(dirname "$out")"
[ -f "$out" ] || printf '# Stream benchmark (benches/stream.sh)\n\n| broker | messages | append msg/s (confirms) | replay msg/s (from first) | disk bytes/message |\n|---|---|---|---|---|\n' > "$out"
for r in "${ROWS[@]}"; do echo "$r" >> "$out"; echo "$r"; done
echo "(appended to $out, $(date -u +%F\ %H:%MZ), $(nproc) cores)"
