#!/usr/bin/env bash
# Stream queues, Warren vs RabbitMQ: append MESSAGES x SIZE-byte messages
# with publisher confirms to a fresh stream (x-queue-type=stream over AMQP
# 0-9-1), then replay the whole stream from x-stream-offset=first with one
# consumer (prefetch PREFETCH, manual acks with multiple=true every
# ACK_EVERY). Same load generator (warren-perf, raw sockets) against both;
# every run gets a freshly started broker with a fresh data dir, and the
# brokers alternate (W R W R ...) so machine noise hits both.
#
#   benches/stream.sh [--broker warren|rabbitmq|both] [--rounds R]
#
# Environment: MESSAGES (10000000), SIZE (100), CONFIRM_WINDOW (1000),
# PREFETCH (1000), ACK_EVERY (100), ROUNDS (1), TIME_LIMIT (1800 s per
# load run), WARREN_BIN / PERF_BIN (prebuilt binaries; otherwise release
# builds), OUT (benches/results/STREAM.md; "-" = do not write), KEEP_WORKDIR=1.
# Prints msgs/s for append and replay, disk bytes per message (du of the
# stream data directory / MESSAGES), broker CPU seconds, and writes the
# per-round figures, medians and Warren/RabbitMQ ratios to OUT.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MESSAGES=${MESSAGES:-10000000}
SIZE=${SIZE:-100}
WINDOW=${CONFIRM_WINDOW:-1000}
PREFETCH=${PREFETCH:-1000}
ACK_EVERY=${ACK_EVERY:-100}
ROUNDS=${ROUNDS:-1}
TIME_LIMIT=${TIME_LIMIT:-1800}
OUT=${OUT:-$ROOT/benches/results/STREAM.md}
BROKER=both
ARGS="$*"
while [ $# -gt 0 ]; do
  case "$1" in
    --broker) BROKER="$2"; shift 2 ;;
    --broker=*) BROKER="${1#*=}"; shift ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --rounds=*) ROUNDS="${1#*=}"; shift ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "stream.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$BROKER" in
  both) BROKERS=(warren rabbitmq) ;;
  warren|rabbitmq) BROKERS=("$BROKER") ;;
  *) echo "stream.sh: --broker must be warren, rabbitmq or both" >&2; exit 2 ;;
esac
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || { echo "stream.sh: --rounds takes a positive number" >&2; exit 2; }

log() { echo "[stream $(date +%H:%M:%S)] $*" >&2; }
die() { echo "stream.sh: $*" >&2; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
proc_cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
proc_status_kb() { awk -v k="$2:" '$1==k {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
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
  if [ "$b" = rabbitmq ]; then
    if [ ! -x "$RMQ_SERVER" ]; then
      log "installing rabbitmq-server (apt)"
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq && apt-get install -y -qq rabbitmq-server >/dev/null
      [ -x "$RMQ_SERVER" ] || die "rabbitmq-server is not installed and apt-get failed"
    fi
    # The Debian package may auto-start a system node; it would compete for CPU.
    if command -v service >/dev/null && service rabbitmq-server status >/dev/null 2>&1; then
      log "stopping the system rabbitmq-server service"
      service rabbitmq-server stop >/dev/null 2>&1 || true
    fi
  fi
done
command -v python3 >/dev/null || die "python3 is needed"
if [ -z "${WARREN_BIN:-}" ] || [ -z "${PERF_BIN:-}" ]; then
  log "building release binaries"
  (cd "$ROOT" && cargo build --release --bin warren --bin warren-perf 2>&1 | tail -n 3) >&2
fi
WARREN=$(realpath "${WARREN_BIN:-$ROOT/target/release/warren}")
PERF=$(realpath "${PERF_BIN:-$ROOT/target/release/warren-perf}")
[ -x "$PERF" ] || die "missing $PERF"
CLK_TCK=$(getconf CLK_TCK)

WORK=$(mktemp -d /tmp/warren-stream.XXXXXX)
RECORDS="$WORK/records.jsonl"; : > "$RECORDS"
EPMD_BEFORE=$(pgrep -x epmd || true)
BROKER_PID=""; LAUNCH_PID=""; PORT=""; STREAM_DIR=""; RUN_DIR=""
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
  RUN_DIR="$WORK/warren-$1"; local data="$RUN_DIR/data"
  mkdir -p "$data"
  PORT=$(free_port)
  # Run from the fresh dir so a checked-in etc/warren.toml is not picked up.
  (cd "$RUN_DIR" && exec "$WARREN" --bind 127.0.0.1 --port "$PORT" --data-dir "$data" \
      --mgmt-port 0 --metrics-port 0 --log-level warn) > "$RUN_DIR/stdout.log" 2>&1 &
  LAUNCH_PID=$!; BROKER_PID=$LAUNCH_PID
  wait_port "$PORT" 30 || { tail -n 20 "$RUN_DIR/stdout.log" >&2; die "Warren did not start"; }
  STREAM_DIR="$data/streams"
}
start_rabbitmq() {
  RUN_DIR="$WORK/rabbitmq-$1"; local dist node
  mkdir -p "$RUN_DIR"
  PORT=$(free_port); dist=$(free_port); node="wstream${$}r$1@localhost"
  env HOME="$RUN_DIR" RABBITMQ_NODENAME="$node" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
      RABBITMQ_NODE_PORT="$PORT" RABBITMQ_DIST_PORT="$dist" ERL_EPMD_ADDRESS=127.0.0.1 \
      RABBITMQ_MNESIA_BASE="$RUN_DIR/mnesia" RABBITMQ_LOG_BASE="$RUN_DIR/log" \
      RABBITMQ_ENABLED_PLUGINS_FILE="$RUN_DIR/enabled_plugins" RABBITMQ_PLUGINS_EXPAND_DIR="$RUN_DIR/plugins" \
      RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
      setsid "$RMQ_SERVER" > "$RUN_DIR/stdout.log" 2>&1 &
  LAUNCH_PID=$!
  wait_port "$PORT" 90 || { tail -n 20 "$RUN_DIR/stdout.log" >&2; die "RabbitMQ did not start"; }
  BROKER_PID=$(find_descendant "$LAUNCH_PID" beam.smp) || die "cannot find beam.smp"
  STREAM_DIR=""   # osiris puts segments in <mnesia>/<node>/stream, found after the append
}

field() { python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]).get(sys.argv[2], 0))' "$1" "$2"; }

run() { # run BROKER ROUND
  local b=$1 r=$2 uri q=bench-stream c0 c1 c2
  log "$b round $r: starting"
  "start_$b" "$r"
  uri="amqp://guest:guest@127.0.0.1:$PORT/%2f"
  log "$b round $r: appending $MESSAGES x $SIZE B with confirms (window $WINDOW)"
  c0=$(proc_cpu_ticks "$BROKER_PID")
  timeout "$TIME_LIMIT" "$PERF" --uri "$uri" --stream -u "$q" -x 1 -y 0 -s "$SIZE" -c "$WINDOW" -C "$MESSAGES" \
      --json --quiet > "$WORK/$b-$r-append.json" 2> "$WORK/$b-$r-append.err" \
    || die "$b append failed or exceeded ${TIME_LIMIT}s: $(tail -n 3 "$WORK/$b-$r-append.err")"
  c1=$(proc_cpu_ticks "$BROKER_PID")
  if [ -z "$STREAM_DIR" ]; then
    STREAM_DIR=$(find "$RUN_DIR/mnesia" -maxdepth 3 -type d -name stream | head -n 1)
    [ -n "$STREAM_DIR" ] || { log "no stream dir found; measuring the whole node dir"; STREAM_DIR="$RUN_DIR/mnesia"; }
  fi
  local bytes; bytes=$(du -sb "$STREAM_DIR" | cut -f1)
  log "$b round $r: replaying from first (prefetch $PREFETCH, ack multiple every $ACK_EVERY)"
  timeout "$TIME_LIMIT" "$PERF" --uri "$uri" --predeclared -u "$q" -x 0 -y 1 -q "$PREFETCH" -A "$ACK_EVERY" \
      --stream-offset first -D "$MESSAGES" --json --quiet > "$WORK/$b-$r-replay.json" 2> "$WORK/$b-$r-replay.err" \
    || die "$b replay failed or exceeded ${TIME_LIMIT}s: $(tail -n 3 "$WORK/$b-$r-replay.err")"
  c2=$(proc_cpu_ticks "$BROKER_PID")
  local hwm; hwm=$(proc_status_kb "$BROKER_PID" VmHWM)
  stop_broker
  local a rp ac rc
  a=$(field "$WORK/$b-$r-append.json" confirm_rate); rp=$(field "$WORK/$b-$r-replay.json" consume_rate)
  ac=$(field "$WORK/$b-$r-append.json" confirmed); rc=$(field "$WORK/$b-$r-replay.json" consumed)
  [ "$ac" = "$MESSAGES" ] || die "$b: only $ac of $MESSAGES appends confirmed"
  [ "$rc" = "$MESSAGES" ] || die "$b: only $rc of $MESSAGES replayed"
  python3 - "$b" "$r" "$a" "$rp" "$bytes" "$MESSAGES" "$((c1 - c0))" "$((c2 - c1))" "$CLK_TCK" "${hwm:-0}" >> "$RECORDS" <<'PY'
import json, sys
b, r, a, rp, by, n, ca, cr, tck, hwm = sys.argv[1:]
print(json.dumps({"broker": b, "round": int(r), "append": float(a), "replay": float(rp),
                  "bytes_per_msg": int(by) / int(n), "cpu_append_s": int(ca) / int(tck),
                  "cpu_replay_s": int(cr) / int(tck), "peak_rss_mb": int(hwm) / 1024}))
PY
  log "$b round $r: append $a msg/s, replay $rp msg/s, $(python3 -c "print(round($bytes / $MESSAGES, 1))") disk bytes/message"
}

for ((r = 1; r <= ROUNDS; r++)); do
  for b in "${BROKERS[@]}"; do run "$b" "$r"; done
done

RMQ_VERSION=$(dpkg-query -W -f '${Version}' rabbitmq-server 2>/dev/null || echo unknown)
python3 - "$RECORDS" "$OUT" "$MESSAGES" "$SIZE" "$WINDOW" "$PREFETCH" "$ACK_EVERY" "$ROUNDS" "$RMQ_VERSION" "$ARGS" <<'PY'
import json, os, statistics, subprocess, sys, time
recs_path, out, n, size, window, prefetch, ack_every, rounds, rmq, args = sys.argv[1:]
recs = [json.loads(l) for l in open(recs_path) if l.strip()]
brokers = [b for b in ("warren", "rabbitmq") if any(r["broker"] == b for r in recs)]
med = {b: {k: statistics.median(r[k] for r in recs if r["broker"] == b)
           for k in ("append", "replay", "bytes_per_msg", "cpu_append_s", "cpu_replay_s", "peak_rss_mb")}
       for b in brokers}
try:
    cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
except Exception:
    cpu = "unknown"
env = " ".join(f"{k}={v}" for k, v in (("MESSAGES", n), ("SIZE", size), ("CONFIRM_WINDOW", window),
                                       ("PREFETCH", prefetch), ("ACK_EVERY", ack_every), ("ROUNDS", rounds)))
L = []
L.append("# Stream benchmark: Warren vs RabbitMQ\n")
L.append(f"`{env} benches/stream.sh {args}`".replace("  ", " ").rstrip() + "\n")
L.append(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} cores ({cpu}); "
         f"RabbitMQ {rmq} (Debian package, stream queue over AMQP 0-9-1, no plugins); "
         f"load generator warren-perf for both.\n")
L.append(f"- append: 1 producer, {int(n):,} x {size} B messages, publisher confirms with at most {window} outstanding, "
         "into a fresh stream (`x-queue-type: stream`); msgs/s = confirmed messages / time until the last confirm.")
L.append(f"- replay: 1 consumer from `x-stream-offset: first`, prefetch {prefetch}, manual acks (multiple=true every {ack_every}); "
         "msgs/s = messages / time until the last one arrived.")
L.append("- disk: `du -sb` of the stream data directory after the append (Warren `<data>/streams`, RabbitMQ `<mnesia>/<node>/stream`) / messages.")
L.append("- Each run starts a fresh broker with a fresh data directory; brokers alternate W R W R. The machine is shared "
         "(other jobs use the same 2 cores), so single runs are noisy; medians are over the rounds.")
L.append("- Durability differs: Warren confirms after fdatasync of the chunk (group commit); RabbitMQ 3.10 streams "
         "confirm once the chunk is written on the replicas (here one node) without waiting for fsync.\n")
L.append("## Medians\n")
L.append("| broker | append msg/s | replay msg/s | disk bytes/msg | broker CPU s (append / replay) | broker peak RSS MB |")
L.append("|---|---:|---:|---:|---:|---:|")
for b in brokers:
    m = med[b]
    L.append(f"| {b} | {m['append']:,.0f} | {m['replay']:,.0f} | {m['bytes_per_msg']:.1f} | "
             f"{m['cpu_append_s']:.1f} / {m['cpu_replay_s']:.1f} | {m['peak_rss_mb']:.0f} |")
if len(brokers) == 2:
    w, r = med["warren"], med["rabbitmq"]
    L.append("")
    L.append(f"Warren / RabbitMQ: append **{w['append'] / r['append']:.1f}x**, replay **{w['replay'] / r['replay']:.1f}x**, "
             f"disk {w['bytes_per_msg'] / r['bytes_per_msg']:.2f}x the bytes per message "
             f"(target: at least 3x on append and on replay).")
L.append("\n## Every run\n")
L.append("| round | broker | append msg/s | replay msg/s | disk bytes/msg | CPU s append / replay |")
L.append("|---:|---|---:|---:|---:|---:|")
for x in recs:
    L.append(f"| {x['round']} | {x['broker']} | {x['append']:,.0f} | {x['replay']:,.0f} | {x['bytes_per_msg']:.1f} | "
             f"{x['cpu_append_s']:.1f} / {x['cpu_replay_s']:.1f} |")
text = "\n".join(L) + "\n"
print(text)
if out != "-":
    os.makedirs(os.path.dirname(out), exist_ok=True)
    open(out, "w").write(text)
    print(f"(written to {out})")
PY
