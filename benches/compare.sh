#!/usr/bin/env bash
# Warren vs RabbitMQ, same load generator (warren-perf), same machine.
#
#   benches/compare.sh [--only N[,M...]] [--broker warren|rabbitmq|both] [--rounds R]
#
# Environment: WARREN_BIN + PERF_BIN (prebuilt binaries instead of a release
# build of this tree), ROUNDS (3), SECONDS_PER_RUN (10), BACKLOG_MESSAGES (1000000),
# IDLE_CONNECTIONS (1000), KEEP_WORKDIR=1 to keep logs of the brokers.
# Each run gets a freshly started broker (fresh data dir), so per-run broker CPU
# and peak RSS (VmHWM) belong to that run alone. Runs alternate A B A B.
# Results: benches/results/LATEST.md (+ LATEST.png, LATEST.jsonl).
# Scenario 9 (stream append + replay) has its own script with the same
# generator and alternation, benches/stream.sh (10M messages by default),
# and quorum queues on 1- and 3-node clusters benches/quorum.sh.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROUNDS=${ROUNDS:-3}
SECS=${SECONDS_PER_RUN:-10}
BACKLOG_MESSAGES=${BACKLOG_MESSAGES:-1000000}
IDLE_CONNECTIONS=${IDLE_CONNECTIONS:-1000}
ONLY="1,2,3,4,5,6,7,8"
BROKER=both

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --only) ONLY="$2"; shift 2 ;;
    --only=*) ONLY="${1#*=}"; shift ;;
    --broker) BROKER="$2"; shift 2 ;;
    --broker=*) BROKER="${1#*=}"; shift ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "compare.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
case "$BROKER" in
  both) BROKERS=(warren rabbitmq) ;;
  warren|rabbitmq) BROKERS=("$BROKER") ;;
  *) echo "compare.sh: --broker must be warren, rabbitmq or both" >&2; exit 2 ;;
esac
IFS=',' read -r -a SCENARIOS <<< "$ONLY"
for s in "${SCENARIOS[@]}"; do
  [[ "$s" =~ ^[1-8]$ ]] || { echo "compare.sh: --only takes scenario numbers 1-8, got '$s'" >&2; exit 2; }
done

log() { echo "[compare $(date +%H:%M:%S)] $*" >&2; }
die() { echo "compare.sh: $*" >&2; exit 1; }

# ---------------------------------------------------------------- prerequisites
need_rabbit=0; need_warren=0
for b in "${BROKERS[@]}"; do [ "$b" = rabbitmq ] && need_rabbit=1; [ "$b" = warren ] && need_warren=1; done
RMQ_SERVER=/usr/lib/rabbitmq/bin/rabbitmq-server
if [ $need_rabbit = 1 ] && [ ! -x "$RMQ_SERVER" ]; then
  log "installing rabbitmq-server (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq rabbitmq-server >/dev/null
  [ -x "$RMQ_SERVER" ] || die "rabbitmq-server is not installed and apt-get failed"
fi
if [ $need_rabbit = 1 ]; then
  # The Debian package may auto-start a system node on 5672; it would compete for CPU.
  if command -v service >/dev/null && service rabbitmq-server status >/dev/null 2>&1; then
    log "stopping the system rabbitmq-server service"
    service rabbitmq-server stop >/dev/null 2>&1 || true
  fi
fi
command -v python3 >/dev/null || die "python3 is needed for the report"

if [ -n "${WARREN_BIN:-}" ] && [ -n "${PERF_BIN:-}" ]; then
  # Prebuilt binaries (copied, so a rebuild during the run cannot swap them).
  mkdir -p "${TMPDIR:-/tmp}/warren-compare-bin.$$"
  cp "$WARREN_BIN" "$PERF_BIN" "${TMPDIR:-/tmp}/warren-compare-bin.$$/"
  WARREN="${TMPDIR:-/tmp}/warren-compare-bin.$$/$(basename "$WARREN_BIN")"
  PERF="${TMPDIR:-/tmp}/warren-compare-bin.$$/$(basename "$PERF_BIN")"
else
  log "building release binaries"
  bins=(--bin warren-perf)
  [ $need_warren = 1 ] && bins+=(--bin warren)
  (cd "$ROOT" && cargo build --release "${bins[@]}" 2>&1 | tail -n 3) >&2
  PERF="$ROOT/target/release/warren-perf"
  WARREN="$ROOT/target/release/warren"
fi
[ -x "$PERF" ] || die "build failed: $PERF missing"
[ $need_warren = 0 ] || [ -x "$WARREN" ] || die "build failed: $WARREN missing"

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
CLK_TCK=$(getconf CLK_TCK)
WORK=$(mktemp -d /tmp/warren-compare.XXXXXX)
RESULTS="$ROOT/benches/results"
mkdir -p "$RESULTS"
RECORDS="$WORK/records.jsonl"
: > "$RECORDS"
EPMD_BEFORE=$(pgrep -x epmd || true)

BROKER_PID=""; LAUNCH_PID=""; PORT=""
cleanup() {
  stop_broker || true
  local now; now=$(pgrep -x epmd || true)
  if [ -z "$EPMD_BEFORE" ] && [ -n "$now" ]; then kill $now 2>/dev/null || true; fi
  if [ "${KEEP_WORKDIR:-0}" = 1 ]; then log "work dir kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
proc_cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
proc_status_kb() { awk -v k="$2:" '$1==k {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

find_descendant() { # find_descendant PID NAME: first descendant process whose comm is NAME
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

wait_port() { # wait_port PORT SECONDS
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    port_open "$1" && return 0
    [ -n "$LAUNCH_PID" ] && ! kill -0 "$LAUNCH_PID" 2>/dev/null && return 1
    sleep 0.1
  done
  return 1
}

start_rabbitmq() {
  local dir="$WORK/rabbitmq-$RUN_ID" dist node
  mkdir -p "$dir"
  PORT=$(free_port); dist=$(free_port); node="wcmp${$}r${RUN_ID}@localhost"
  env HOME="$dir" RABBITMQ_NODENAME="$node" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
      RABBITMQ_NODE_PORT="$PORT" RABBITMQ_DIST_PORT="$dist" ERL_EPMD_ADDRESS=127.0.0.1 \
      RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log" \
      RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" RABBITMQ_PLUGINS_EXPAND_DIR="$dir/plugins" \
      RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
      setsid "$RMQ_SERVER" > "$dir/stdout.log" 2>&1 &
  LAUNCH_PID=$!
  wait_port "$PORT" 90 || { tail -n 20 "$dir/stdout.log" >&2; log "RabbitMQ did not start on port $PORT"; return 1; }
  BROKER_PID=$(find_descendant "$LAUNCH_PID" beam.smp) || { log "cannot find RabbitMQ's beam.smp process"; return 1; }
}

start_warren() {
  local dir="$WORK/warren-$RUN_ID"
  mkdir -p "$dir/data"
  PORT=$(free_port)
  # Run from the fresh dir so a checked-in etc/warren.toml is not picked up implicitly;
  # WARREN_CONFIG=path passes an explicit --config.
  local cfg=()
  [ -n "${WARREN_CONFIG:-}" ] && cfg=(--config "$(realpath "$WARREN_CONFIG")")
  (cd "$dir" && exec "$WARREN" "${cfg[@]}" --bind 127.0.0.1 --port "$PORT" --data-dir "$dir/data" --log-level warn) \
    > "$dir/stdout.log" 2>&1 &
  LAUNCH_PID=$!
  BROKER_PID=$LAUNCH_PID
  wait_port "$PORT" 30 || { tail -n 20 "$dir/stdout.log" >&2; log "Warren did not start on port $PORT"; return 1; }
}

stop_broker() {
  [ -n "$LAUNCH_PID" ] || return 0
  local pids="$BROKER_PID $LAUNCH_PID" i
  kill -TERM $pids 2>/dev/null || true
  for ((i = 0; i < 300; i++)); do
    kill -0 "$BROKER_PID" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL $pids 2>/dev/null || true
  # erl_child_setup / inet_gethost helpers exit with beam; reap the launcher.
  wait "$LAUNCH_PID" 2>/dev/null || true
  BROKER_PID=""; LAUNCH_PID=""
}

uri() { echo "amqp://guest:guest@127.0.0.1:$PORT/%2f"; }

run_gen() { # perf OUTFILE ARGS... : run warren-perf, JSON summary to OUTFILE
  local out=$1; shift
  if ! "$PERF" --uri "$(uri)" --json --quiet "$@" > "$out" 2> "$out.err"; then
    log "warren-perf failed ($*): $(tail -n 3 "$out.err" | tr '\n' ' ')"
  fi
  tail -n 1 "$out" > "$out.tmp" && mv "$out.tmp" "$out"
}

SCEN_NAME=(
  ""
  "1 transient 16 B, 1 producer / 1 consumer, auto-ack"
  "2 transient 1 KB, 1/1, auto-ack"
  "3 persistent 1 KB, confirms (window 256), manual ack (prefetch 256), durable queue"
  "4 fanout to 10 queues, 10 consumers, 64 B"
  "5 RPC round trips, one outstanding, 64 B"
  "6 100 producers + 100 consumers on 100 queues, 256 B"
  "7 backlog: $BACKLOG_MESSAGES x 100 B persistent with confirms, then drain"
  "8 $IDLE_CONNECTIONS idle connections: memory per connection"
)

run_scenario() { # run_scenario N BROKER ROUND
  local n=$1 b=$2 r=$3 out="$WORK/s$1-$2-$3" cpu0 cpu1 extra="{}"
  RUN_ID=$((RUN_ID + 1))
  if ! "start_$b"; then
    stop_broker
    echo "{\"scenario\": $n, \"broker\": \"$b\", \"round\": $r, \"broker_cpu_s\": 0, \"broker_peak_rss_kb\": 0, \"gen\": {\"ok\": false, \"errors\": [\"$b did not start\"]}, \"extra\": {}}" >> "$RECORDS"
    return 0
  fi
  local rss_base; rss_base=$(proc_status_kb "$BROKER_PID" VmRSS)
  cpu0=$(proc_cpu_ticks "$BROKER_PID")
  case $n in
    1) run_gen "$out.json" -x 1 -y 1 -s 16 -a -z "$SECS" -u s1 ;;
    2) run_gen "$out.json" -x 1 -y 1 -s 1024 -a -z "$SECS" -u s2 ;;
    3) run_gen "$out.json" -x 1 -y 1 -s 1024 -f -c 256 -q 256 -z "$SECS" -u s3 ;;
    4) run_gen "$out.json" --fanout 10 -x 1 -y 10 -s 64 -a -z "$SECS" -u s4 ;;
    5) run_gen "$out.json" --rpc -x 1 -y 1 -s 64 -z "$SECS" -u s5 ;;
    6) run_gen "$out.json" --queues 100 -x 100 -y 100 -s 256 -a -z "$SECS" -u s6 ;;
    7) run_gen "$out.json" -x 1 -y 0 -s 100 -f -c 256 -C "$BACKLOG_MESSAGES" -z 900 -u s7
       local rss_full; rss_full=$(proc_status_kb "$BROKER_PID" VmRSS)
       run_gen "$out.drain.json" -x 0 -y 1 -s 100 -q 1000 -A 100 -D "$BACKLOG_MESSAGES" -z 900 -u s7 --no-declare
       extra=$(python3 - "$out.drain.json" "$rss_full" <<'PY'
import json, sys
try: d = json.loads(open(sys.argv[1]).read() or "{}")
except Exception: d = {}
print(json.dumps({"drain": d, "rss_after_publish_kb": int(sys.argv[2] or 0)}))
PY
) ;;
    8) "$PERF" --uri "$(uri)" --json --idle-connections "$IDLE_CONNECTIONS" -z "$(( SECS > 5 ? SECS : 5 ))" \
           > "$out.json" 2> "$out.json.err" &
       local gp=$! i held=0
       for ((i = 0; i < 1200; i++)); do
         grep -q "holding" "$out.json.err" 2>/dev/null && { held=1; break; }
         kill -0 $gp 2>/dev/null || break
         sleep 0.1
       done
       sleep 2
       local rss_held; rss_held=$(proc_status_kb "$BROKER_PID" VmRSS)
       wait $gp || log "idle-connections run failed: $(tail -n 2 "$out.json.err" | tr '\n' ' ')"
       extra="{\"rss_base_kb\": ${rss_base:-0}, \"rss_held_kb\": ${rss_held:-0}, \"held\": $held}" ;;
  esac
  cpu1=$(proc_cpu_ticks "$BROKER_PID")
  local hwm; hwm=$(proc_status_kb "$BROKER_PID" VmHWM)
  stop_broker
  python3 - "$out.json" "$n" "$b" "$r" "$(( cpu1 - cpu0 ))" "$CLK_TCK" "${hwm:-0}" "$extra" >> "$RECORDS" <<'PY'
import json, sys
path, n, b, r, ticks, tck, hwm, extra = sys.argv[1:]
try:
    g = json.loads(open(path).read() or "{}")
except Exception:
    g = {}
print(json.dumps({"scenario": int(n), "broker": b, "round": int(r),
                  "broker_cpu_s": int(ticks) / int(tck), "broker_peak_rss_kb": int(hwm),
                  "gen": g, "extra": json.loads(extra)}))
PY
  log "scenario $n $b round $r done: $(tail -n 1 "$RECORDS" | cut -c1-160)…"
}

RUN_ID=0
log "work dir $WORK; scenarios ${ONLY}; brokers ${BROKERS[*]}; $ROUNDS rounds x ${SECS}s"
for n in "${SCENARIOS[@]}"; do
  log "== scenario ${SCEN_NAME[$n]}"
  for ((r = 1; r <= ROUNDS; r++)); do
    for b in "${BROKERS[@]}"; do
      run_scenario "$n" "$b" "$r"
    done
  done
done

cp "$RECORDS" "$RESULTS/LATEST.jsonl"
python3 "$ROOT/benches/report.py" "$RECORDS" "$RESULTS/LATEST.md" "$RESULTS/LATEST.png" \
  "rounds=$ROUNDS seconds_per_run=$SECS backlog=$BACKLOG_MESSAGES idle=$IDLE_CONNECTIONS"
cat "$RESULTS/LATEST.md"
