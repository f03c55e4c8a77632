#!/usr/bin/env bash
# Quorum queues with publisher confirms: a 3-node Warren cluster vs a 3-node
# RabbitMQ cluster on this machine (loopback only), and both at one node;
# then the cost of idle quorum queues on the 3-node clusters.
#
#   benches/quorum.sh [--only cluster,single,idle,backlog] [--broker warren|rabbitmq|both]
#                     [--rounds R] [--seconds S]
#   benches/quorum.sh --report RECORDS.jsonl   (only rewrite OUT from saved records)
#
# Load (per run, same generator for both: warren-perf): 1 producer, persistent
# SIZE-byte messages, confirm window 256 (-c 256), 1 consumer with manual acks
# and prefetch 256, for SECONDS_PER_RUN; the quorum queue is declared with
# x-quorum-initial-group-size=3 on node 1 and the generator connects to the
# node that leads it. Every run gets freshly started nodes with fresh data
# dirs; brokers alternate (W R W R ...). Broker CPU is summed over the nodes
# (/proc utime+stime during the load); peak RSS is each node's VmHWM.
# Idle: IDLE_QUEUES quorum queues on a fresh 3-node cluster; CPU and RSS of
# each node over IDLE_SECONDS before and after declaring them.
# Backlog (not in the default parts): BACKLOG_MESSAGES persistent 100 B
# messages published with confirms into a quorum queue on a fresh 3-node
# cluster with no consumer, then drained; publish and drain rates and each
# node's resident memory with the backlog queued (and its peak).
#
# Environment: ROUNDS (3), SECONDS_PER_RUN (15), SIZES ("1024 100"), CONNECT
# (leader: the generator connects to the queue's leader; follower: to the next
# node, so every publish and ack is forwarded to the leader),
# IDLE_QUEUES (1000), IDLE_SECONDS (30), BACKLOG_MESSAGES (1000000), OUT (benches/results/QUORUM.md; "-" =
# do not write), WARREN_BIN / PERF_BIN / WARRENCTL_BIN (prebuilt binaries;
# otherwise release builds, copied so a rebuild during the run does not
# change them), WARREN_LOG_LEVEL (warn), KEEP_WORKDIR=1 keeps the nodes' logs.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROUNDS=${ROUNDS:-3}
SECS=${SECONDS_PER_RUN:-15}
SIZES=${SIZES:-1024 100}
CONNECT=${CONNECT:-leader}
IDLE_QUEUES=${IDLE_QUEUES:-1000}
IDLE_SECONDS=${IDLE_SECONDS:-30}
BACKLOG_MESSAGES=${BACKLOG_MESSAGES:-1000000}
OUT=${OUT:-$ROOT/benches/results/QUORUM.md}
ONLY="cluster,single,idle"
REPORT_ONLY=""
BROKER=both
CMDLINE="benches/quorum.sh${*:+ $*}"

usage() { sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --only) ONLY="$2"; shift 2 ;;
    --only=*) ONLY="${1#*=}"; shift ;;
    --broker) BROKER="$2"; shift 2 ;;
    --broker=*) BROKER="${1#*=}"; shift ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --rounds=*) ROUNDS="${1#*=}"; shift ;;
    --seconds) SECS="$2"; shift 2 ;;
    --report) REPORT_ONLY="$2"; shift 2 ;;
    --seconds=*) SECS="${1#*=}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "quorum.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
case "$BROKER" in
  both) BROKERS=(warren rabbitmq) ;;
  warren|rabbitmq) BROKERS=("$BROKER") ;;
  *) echo "quorum.sh: --broker must be warren, rabbitmq or both" >&2; exit 2 ;;
esac
IFS=',' read -r -a PARTS <<< "$ONLY"
for p in "${PARTS[@]}"; do
  case "$p" in cluster|single|idle|backlog) ;; *) echo "quorum.sh: --only takes cluster, single, idle, backlog; got '$p'" >&2; exit 2 ;; esac
done
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || { echo "quorum.sh: --rounds takes a positive number" >&2; exit 2; }
[[ "$SECS" =~ ^[1-9][0-9]*$ ]] || { echo "quorum.sh: --seconds takes a positive number" >&2; exit 2; }
case "$CONNECT" in leader|follower) ;; *) echo "quorum.sh: CONNECT must be leader or follower" >&2; exit 2 ;; esac
want() { [[ ",$ONLY," == *",$1,"* ]]; }

# ---------------------------------------------------------------- report
report() { # RECORDS.jsonl: write OUT (markdown) and print it
  python3 - "$1" "$OUT" <<'PY'
import json, statistics, sys, os
recs_path, out = sys.argv[1:]
recs = [json.loads(l) for l in open(recs_path) if l.strip()]
meta = next((r for r in recs if r.get("scenario") == "meta"), {})
cmdline, rounds, secs = meta.get("cmdline", "?"), meta.get("rounds", "?"), meta.get("seconds", "?")
sizes, connect = meta.get("sizes", "?"), meta.get("connect", "leader")
nq, idle_secs = meta.get("idle_queues", "?"), meta.get("idle_seconds", "?")
med = lambda v: statistics.median(v) if v else None
def f(v, nd=0):
    if v is None: return "—"
    return f"{v:,.{nd}f}"
def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "—"
lines = []
p = lines.append
def conn_note(r):
    c = r.get("connected_to", r["leader"])
    return "" if c == r["leader"] else f" (client on n{c + 1})"
host = os.uname()
try:
    cpu = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")][0]
except Exception:
    cpu = "?"
p("# Quorum queues: Warren vs RabbitMQ 3.10.8 (3-node and single-node, one machine)")
p("")
p(f"Command: `{cmdline}` (ROUNDS={rounds}, SECONDS_PER_RUN={secs}, SIZES=\"{sizes}\", CONNECT={connect}, "
  f"IDLE_QUEUES={nq}, IDLE_SECONDS={idle_secs}).")
p(f"Warren at `{meta.get('git', '?')}`, run {meta.get('date', '?')}.")
p(f"Machine: {os.cpu_count()} CPUs ({cpu}), kernel {host.release}. Every node of both clusters, and the load")
p("generator, share these CPUs; other work on the machine (e.g. compilers) adds noise.")
p("")
p("Load: 1 producer, persistent messages, publisher confirms with 256 outstanding (`-c 256`), 1 consumer,")
p("manual acks (one per message), prefetch 256; quorum queue declared with `x-quorum-initial-group-size: 3`")
p(f"on node 1; the generator (warren-perf) connects to the node {'leading the queue' if connect == 'leader' else 'after the leader (a follower)'}. Fresh nodes and data")
p("dirs for every run; brokers alternate. Broker CPU = utime+stime of all nodes during the load / confirmed")
p("messages. Peak RSS = VmHWM of each node (leader / followers).")
p("")
for sc, title in (("cluster", "3-node cluster"), ("single", "single node")):
    rs = [r for r in recs if r["scenario"] == sc]
    if not rs: continue
    for size in sorted({r["size"] for r in rs}, reverse=True):
        p(f"## {title}, {size} B messages")
        p("")
        p("| broker | round | confirmed msg/s | consumed msg/s | latency p50 / p99 ms | broker CPU µs/msg | CPU s per node | peak RSS MiB per node | leader | errors |")
        p("|---|---|---|---|---|---|---|---|---|---|")
        agg = {}
        for r in sorted((r for r in rs if r["size"] == size), key=lambda r: (r["round"], r["broker"] != "warren")):
            g = r["gen"]; ok = g.get("ok", False) and g.get("confirmed", 0) > 0
            cpu = sum(r["node_cpu_s"])
            conf = g.get("confirmed", 0)
            cpm = cpu * 1e6 / conf if conf else None
            lat = g.get("latency_us") or {}
            lead = r["leader"]
            hwm = r["node_hwm_kb"]
            hw_l = hwm[lead] / 1024 if hwm else None
            hw_f = max([h for i, h in enumerate(hwm) if i != lead], default=0) / 1024 if len(hwm) > 1 else None
            p(f"| {r['broker']} | {r['round']} | {f(g.get('confirm_rate'))} | {f(g.get('consume_rate'))} | "
              f"{f(lat.get('p50', 0) / 1000, 1) if lat else '—'} / {f(lat.get('p99', 0) / 1000, 1) if lat else '—'} | "
              f"{f(cpm, 1)} | {' / '.join(f'{x:.1f}' for x in r['node_cpu_s'])} | "
              f"{' / '.join(f'{x / 1024:.0f}' for x in hwm)} | n{lead + 1}{conn_note(r)} | {'; '.join(g.get('errors') or [])[:200]} |")
            if ok:
                a = agg.setdefault(r["broker"], {"conf": [], "cons": [], "cpm": [], "hwl": [], "hwf": [], "p50": [], "p99": []})
                a["conf"].append(g["confirm_rate"]); a["cons"].append(g["consume_rate"]); a["cpm"].append(cpm)
                a["hwl"].append(hw_l)
                if hw_f is not None: a["hwf"].append(hw_f)
                if lat: a["p50"].append(lat["p50"] / 1000); a["p99"].append(lat["p99"] / 1000)
        p("")
        p("Medians:")
        p("")
        p("| broker | runs | confirmed msg/s | consumed msg/s | latency p50 / p99 ms | broker CPU µs/msg | peak RSS MiB leader | peak RSS MiB followers (max) |")
        p("|---|---|---|---|---|---|---|---|")
        for b in ("warren", "rabbitmq"):
            a = agg.get(b)
            if not a: continue
            p(f"| {b} | {len(a['conf'])} | {f(med(a['conf']))} | {f(med(a['cons']))} | {f(med(a['p50']), 1)} / {f(med(a['p99']), 1)} | "
              f"{f(med(a['cpm']), 1)} | {f(med(a['hwl']))} | {f(med(a['hwf'])) if a['hwf'] else '—'} |")
        w, rb = agg.get("warren"), agg.get("rabbitmq")
        if w and rb:
            p("")
            p(f"Warren / RabbitMQ: confirmed msg/s **{ratio(med(w['conf']), med(rb['conf']))}**, "
              f"consumed msg/s {ratio(med(w['cons']), med(rb['cons']))}; "
              f"RabbitMQ / Warren CPU per message {ratio(med(rb['cpm']), med(w['cpm']))}; "
              f"RabbitMQ / Warren peak RSS (leader) {ratio(med(rb['hwl']), med(w['hwl']))}.")
        p("")
idle = [r for r in recs if r["scenario"] == "idle"]
if idle:
    p(f"## Idle quorum queues on the 3-node cluster")
    p("")
    p(f"CPU and RSS of each node over {idle_secs} s of idleness without queues, then (after declaring the queues")
    p("through node 1 and waiting until every queue has a leader, plus 10 s) over another "
      f"{idle_secs} s with them. Per queue = (with − without) / queues, summed over the nodes.")
    p("")
    p("| broker | queues | declare time s | leaders per node | CPU % of a core per node, before → after | RSS MiB per node, before → after | CPU µs per queue per second (all nodes) | RSS KiB per queue (all nodes) | errors |")
    p("|---|---|---|---|---|---|---|---|---|")
    for r in idle:
        s = r["seconds"]; n = r["queues"]
        b4, af = r["cpu_before_s"], r["cpu_after_s"]
        cpu_pct = " / ".join(f"{x / s * 100:.1f} → {y / s * 100:.1f}" for x, y in zip(b4, af))
        rss = " / ".join(f"{x / 1024:.0f} → {y / 1024:.0f}" for x, y in zip(r["rss_before_kb"], r["rss_after_kb"]))
        per_q_cpu = (sum(af) - sum(b4)) / s / n * 1e6 if b4 and af else None
        per_q_rss = (sum(r["rss_after_kb"]) - sum(r["rss_before_kb"])) / n if r["rss_after_kb"] else None
        p(f"| {r['broker']} | {n} | {r['declare_s']} | {r['leaders'] or '—'} | {cpu_pct or '—'} | {rss or '—'} | "
          f"{f(per_q_cpu, 1)} | {f(per_q_rss, 1)} | {r['error'][:200]} |")
    p("")
backlog = [r for r in recs if r["scenario"] == "backlog"]
if backlog:
    p("## Backlog on the 3-node cluster")
    p("")
    p(f"{backlog[0]['messages']:,} persistent 100 B messages published with confirms (`-c 256`) into a quorum queue")
    p("with no consumer, then drained by one consumer (prefetch 1000, multi-ack every 100). RSS per node is")
    p("measured with the whole backlog queued; per million = (RSS with backlog − RSS before publishing) of the")
    p("leader, scaled to 10^6 messages.")
    p("")
    p("| broker | publish msg/s | drain msg/s | RSS MiB per node, before → queued | peak RSS MiB per node | leader RSS MiB per million queued | errors |")
    p("|---|---|---|---|---|---|---|")
    for r in backlog:
        n = r["messages"]
        b4, q, hw = r["rss_before_kb"], r["rss_queued_kb"], r["node_hwm_kb"]
        lead = r["leader"]
        per_m = (q[lead] - b4[lead]) / 1024 * 1e6 / n if q and b4 else None
        p(f"| {r['broker']} | {f(r.get('publish_rate'))} | {f(r.get('drain_rate'))} | "
          f"{' / '.join(f'{x / 1024:.0f} → {y / 1024:.0f}' for x, y in zip(b4, q)) or '—'} | "
          f"{' / '.join(f'{x / 1024:.0f}' for x in hw) or '—'} | {f(per_m)} | {r['error'][:200]} |")
    p("")
p("## Notes")
p("")
busy = {}
for r in recs:
    if r.get("scenario") == "cluster" and (r.get("gen") or {}).get("duration_s"):
        busy.setdefault(r["broker"], []).append(sum(r["node_cpu_s"]) / r["gen"]["duration_s"])
loads = [r["loadavg"] for r in recs if "loadavg" in r]
p(f"- Noise: the machine has {os.cpu_count()} CPUs, shared by all three nodes of a cluster and the generator;")
p("  other work (other agents compiling and testing) may run at the same time, so absolute rates move")
p("  between sessions; compare brokers within one run (they alternate W R W R, so both see the same")
p("  background) and prefer CPU per message, the steadier figure."
  + (f" 1-minute load average before the runs: {min(loads):.1f} to {max(loads):.1f}." if loads else ""))
if busy:
    p("  CPUs used by the 3 nodes during a 3-node run (median): "
      + ", ".join(f"{b} {med(v):.2f}" for b, v in sorted(busy.items(), key=lambda kv: kv[0] != "warren"))
      + f" of the {os.cpu_count()}")
    p("  (the generator needs some too): throughput here is bounded by CPU, not disk.")
p("- Durability is the same kind on both: RabbitMQ's Ra WAL fdatasyncs before confirming (`wal_sync_method`")
p("  `datasync`, Ra's default); Warren's Raft WAL writes each batch of appends (all groups together) with one")
p("  write and one fdatasync before openraft hears the entries are durable; a confirm needs a majority of")
p("  nodes to have done so.")
p("- Leader placement: Warren spreads quorum queue leaders over the nodes; RabbitMQ 3.10 puts each")
p("  leader on the node the client declared it on (all on node 1 here), which is why its idle CPU is")
p("  lopsided.")
p("- One run = fresh nodes and data dirs. Peak RSS includes start-up; RabbitMQ's baseline (no queues) is")
p("  about 120 MiB per node, Warren's about 16 MiB.")
p("")
text = "\n".join(lines) + "\n"
if out != "-":
    os.makedirs(os.path.dirname(out), exist_ok=True)
    open(out, "w").write(text)
print(text)
PY
}

if [ -n "$REPORT_ONLY" ]; then report "$REPORT_ONLY"; exit 0; fi

log() { echo "[quorum $(date +%H:%M:%S)] $*" >&2; }
die() { echo "quorum.sh: $*" >&2; exit 1; }

# ---------------------------------------------------------------- prerequisites
need_rabbit=0; need_warren=0
for b in "${BROKERS[@]}"; do [ "$b" = rabbitmq ] && need_rabbit=1; [ "$b" = warren ] && need_warren=1; done
RMQ_SERVER=/usr/lib/rabbitmq/bin/rabbitmq-server
RMQ_CTL=/usr/lib/rabbitmq/bin/rabbitmqctl
if [ $need_rabbit = 1 ] && [ ! -x "$RMQ_SERVER" ]; then
  log "installing rabbitmq-server (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq rabbitmq-server >/dev/null
  [ -x "$RMQ_SERVER" ] || die "rabbitmq-server is not installed and apt-get failed"
fi
if [ $need_rabbit = 1 ] && command -v service >/dev/null && service rabbitmq-server status >/dev/null 2>&1; then
  log "stopping the system rabbitmq-server service (it would compete for CPU)"
  service rabbitmq-server stop >/dev/null 2>&1 || true
fi
command -v python3 >/dev/null || die "python3 is needed"

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
CLK_TCK=$(getconf CLK_TCK)
WORK=$(mktemp -d /tmp/warren-quorum.XXXXXX)
RECORDS="$WORK/records.jsonl"
: > "$RECORDS"
GIT_REV=$(cd "$ROOT" && git describe --always --dirty 2>/dev/null || echo unknown)
python3 -c 'import json, sys; a = sys.argv[1:]; print(json.dumps({"scenario": "meta", "cmdline": a[0], "rounds": int(a[1]),
  "seconds": int(a[2]), "sizes": a[3], "connect": a[4], "idle_queues": int(a[5]), "idle_seconds": int(a[6]),
  "git": a[7], "date": a[8]}))' \
  "$CMDLINE" "$ROUNDS" "$SECS" "$SIZES" "$CONNECT" "$IDLE_QUEUES" "$IDLE_SECONDS" "$GIT_REV" "$(date -u +%Y-%m-%dT%H:%MZ)" >> "$RECORDS"
EPMD_BEFORE=$(pgrep -x epmd || true)

# Every process group this script started (setsid: group id = launcher pid).
GROUPS_STARTED=()
NODE_PIDS=()    # the measured process of each running node (warren / beam.smp)
NODE_PORTS=()   # AMQP port of each running node
NODE_MGMT=()    # Warren: management port of each node
NODE_NAMES=()

stop_nodes() {
  local g i alive
  [ ${#GROUPS_STARTED[@]} -gt 0 ] || return 0
  for g in "${GROUPS_STARTED[@]}"; do kill -TERM -- "-$g" 2>/dev/null || true; done
  for ((i = 0; i < 300; i++)); do
    alive=0
    for g in "${GROUPS_STARTED[@]}"; do kill -0 -- "-$g" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.1
  done
  for g in "${GROUPS_STARTED[@]}"; do kill -KILL -- "-$g" 2>/dev/null || true; done
  for g in "${GROUPS_STARTED[@]}"; do wait "$g" 2>/dev/null || true; done
  GROUPS_STARTED=(); NODE_PIDS=(); NODE_PORTS=(); NODE_MGMT=(); NODE_NAMES=()
}
cleanup() {
  stop_nodes || true
  local now; now=$(pgrep -x epmd || true)
  if [ -z "$EPMD_BEFORE" ] && [ -n "$now" ]; then kill $now 2>/dev/null || true; fi
  if [ "${KEEP_WORKDIR:-0}" = 1 ]; then log "work dir kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Binaries: copied, so another build of the shared target dir during the run
# cannot swap them under us.
if [ -z "${WARREN_BIN:-}" ] || [ -z "${PERF_BIN:-}" ] || [ -z "${WARRENCTL_BIN:-}" ]; then
  log "building release binaries"
  (cd "$ROOT" && cargo build --release --bin warren --bin warren-perf --bin warrenctl 2>&1 | tail -n 3) >&2
fi
mkdir -p "$WORK/bin"
cp "${WARREN_BIN:-$ROOT/target/release/warren}" "$WORK/bin/warren" || die "no warren binary"
cp "${PERF_BIN:-$ROOT/target/release/warren-perf}" "$WORK/bin/warren-perf" || die "no warren-perf binary"
cp "${WARRENCTL_BIN:-$ROOT/target/release/warrenctl}" "$WORK/bin/warrenctl" || die "no warrenctl binary"
WARREN="$WORK/bin/warren"; PERF="$WORK/bin/warren-perf"; WCTL="$WORK/bin/warrenctl"
"$PERF" --help | grep -q -- --quorum-queue || die "warren-perf has no --quorum-queue flag (rebuild it)"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
proc_cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
proc_status_kb() { awk -v k="$2:" '$1==k {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
find_descendant() { # PID NAME: first descendant whose comm is NAME
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
wait_port() { # PORT SECONDS LAUNCHER
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    port_open "$1" && return 0
    kill -0 "$3" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}
cpu_list() { local p out=""; for p in "${NODE_PIDS[@]}"; do out+="$(proc_cpu_ticks "$p") "; done; echo "$out"; }
kb_list() { local p out=""; for p in "${NODE_PIDS[@]}"; do out+="$(proc_status_kb "$p" "$1") "; done; echo "$out"; }

# ---------------------------------------------------------------- Warren nodes
start_warren() { # N (1 = no clustering flags)
  local n=$1 i j dir cport=() seeds
  for ((i = 0; i < n; i++)); do cport+=("$(free_port)"); done
  for ((i = 0; i < n; i++)); do
    dir="$WORK/run$RUN_ID/warren-n$((i + 1))"
    mkdir -p "$dir/data"
    local port mgmt metrics; port=$(free_port); mgmt=$(free_port); metrics=$(free_port)
    local args=(--bind 127.0.0.1 --port "$port" --mgmt-port "$mgmt" --metrics-port "$metrics"
                --data-dir "$dir/data" --log-level "${WARREN_LOG_LEVEL:-warn}")
    if [ "$n" -gt 1 ]; then
      args+=(--node-name "warren@n$((i + 1))" --cluster-port "${cport[$i]}" --cluster-secret "bench-$$-$RUN_ID")
      for ((j = 0; j < n; j++)); do [ $j = $i ] || args+=(--seed "127.0.0.1:${cport[$j]}"); done
    fi
    # From the fresh dir, so a checked-in etc/warren.toml is not picked up.
    (cd "$dir" && exec setsid "$WARREN" "${args[@]}") > "$dir/stdout.log" 2>&1 &
    GROUPS_STARTED+=($!); NODE_PIDS+=($!); NODE_PORTS+=("$port"); NODE_MGMT+=("$mgmt")
    NODE_NAMES+=("warren@n$((i + 1))")
  done
  for ((i = 0; i < n; i++)); do
    wait_port "${NODE_PORTS[$i]}" 60 "${NODE_PIDS[$i]}" || {
      tail -n 20 "$WORK/run$RUN_ID/warren-n$((i + 1))/stdout.log" >&2; log "Warren node $((i + 1)) did not start"; return 1; }
  done
  [ "$n" -gt 1 ] || return 0
  local st
  for ((i = 0; i < 600; i++)); do
    st=$(timeout 20 "$WCTL" --url "http://127.0.0.1:${NODE_MGMT[0]}" cluster_status 2>/dev/null || true)
    if [ "$(grep -c $'\trunning' <<< "$st")" -ge "$n" ] && grep -q "metadata leader" <<< "$st"; then return 0; fi
    sleep 0.1
  done
  log "the Warren cluster did not form within 60 s: $st"; return 1
}

warren_leader() { # QUEUE -> index of the node leading it (or nothing)
  local st l
  st=$(timeout 20 "$WCTL" --url "http://127.0.0.1:${NODE_MGMT[0]}" cluster_status 2>/dev/null || true)
  l=$(awk -F'\t' -v q="$1" '$2 == q { for (i = 3; i <= NF; i++) if ($i ~ /^leader=/) { sub(/^leader=/, "", $i); print $i } }' <<< "$st")
  # A single node is not named warren@n1 (no --node-name): any leader is it.
  if [ ${#NODE_NAMES[@]} = 1 ] && [ -n "$l" ]; then echo 0; return 0; fi
  local i; for i in "${!NODE_NAMES[@]}"; do [ "${NODE_NAMES[$i]}" = "$l" ] && { echo "$i"; return 0; }; done
  return 0
}

warren_leader_counts() { # -> "n1=X n2=Y n3=Z" quorum queues led per node
  timeout 20 "$WCTL" --url "http://127.0.0.1:${NODE_MGMT[0]}" cluster_status 2>/dev/null |
    awk -F'\t' '{ for (i = 3; i <= NF; i++) if ($i ~ /^leader=warren@/) { sub(/^leader=warren@/, "", $i); c[$i]++ } }
                END { for (k in c) printf "%s=%d ", k, c[k] }'
}

# ---------------------------------------------------------------- RabbitMQ nodes
RMQ_HOME="$WORK/rabbitmq-home"
mkdir -p "$RMQ_HOME"
printf '%s' "WARRENQUORUMBENCH$$$(date +%s)" > "$RMQ_HOME/.erlang.cookie"
chmod 400 "$RMQ_HOME/.erlang.cookie"
rmqctl() { # NODE ARGS...: rabbitmqctl against a node of ours, bounded, loopback only
  local node=$1; shift
  env HOME="$RMQ_HOME" ERL_EPMD_ADDRESS=127.0.0.1 \
      RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
      timeout 120 "$RMQ_CTL" -n "$node" "$@"
}

start_rabbitmq() { # N
  local n=$1 i dir node port dist launch
  local launches=()
  for ((i = 0; i < n; i++)); do
    dir="$WORK/run$RUN_ID/rabbit$((i + 1))"
    mkdir -p "$dir"
    port=$(free_port); dist=$(free_port); node="wq$$r${RUN_ID}n$((i + 1))@localhost"
    env HOME="$RMQ_HOME" RABBITMQ_NODENAME="$node" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT="$port" RABBITMQ_DIST_PORT="$dist" ERL_EPMD_ADDRESS=127.0.0.1 \
        RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" RABBITMQ_PLUGINS_EXPAND_DIR="$dir/plugins" \
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
        setsid "$RMQ_SERVER" > "$dir/stdout.log" 2>&1 &
    launch=$!
    GROUPS_STARTED+=("$launch"); launches+=("$launch"); NODE_PORTS+=("$port"); NODE_NAMES+=("$node")
  done
  for ((i = 0; i < n; i++)); do
    wait_port "${NODE_PORTS[$i]}" 120 "${launches[$i]}" || {
      tail -n 20 "$WORK/run$RUN_ID/rabbit$((i + 1))/stdout.log" >&2; log "RabbitMQ node $((i + 1)) did not start"; return 1; }
    local beam; beam=$(find_descendant "${launches[$i]}" beam.smp) || { log "no beam.smp under ${launches[$i]}"; return 1; }
    NODE_PIDS+=("$beam")
  done
  for ((i = 1; i < n; i++)); do
    { rmqctl "${NODE_NAMES[$i]}" stop_app && rmqctl "${NODE_NAMES[$i]}" join_cluster "${NODE_NAMES[0]}" &&
      rmqctl "${NODE_NAMES[$i]}" start_app; } > "$WORK/run$RUN_ID/rabbit$((i + 1))/join.log" 2>&1 || {
      cat "$WORK/run$RUN_ID/rabbit$((i + 1))/join.log" >&2; log "RabbitMQ node $((i + 1)) could not join"; return 1; }
    wait_port "${NODE_PORTS[$i]}" 120 "${launches[$i]}" || { log "RabbitMQ node $((i + 1)) did not come back"; return 1; }
  done
}

rabbitmq_leader() { # QUEUE -> index of the node leading it
  local l i
  l=$(rmqctl "${NODE_NAMES[0]}" -q --no-table-headers list_queues name leader 2>/dev/null | awk -v q="$1" '$1 == q {print $2}')
  for i in "${!NODE_NAMES[@]}"; do [ "${NODE_NAMES[$i]}" = "$l" ] && { echo "$i"; return 0; }; done
  return 0
}

rabbitmq_leader_counts() {
  rmqctl "${NODE_NAMES[0]}" -q --no-table-headers list_queues name leader 2>/dev/null |
    awk '$2 ~ /@/ { sub(/@.*/, "", $2); sub(/^wq[0-9]+r[0-9]+/, "", $2); c[$2]++ } END { for (k in c) printf "%s=%d ", k, c[k] }'
}

start_nodes() { "start_$1" "$2"; }
leader_of() { "$1_leader" "$2"; }

# ---------------------------------------------------------------- one load run
uri() { echo "amqp://guest:guest@127.0.0.1:$1/%2f"; }

run_load() { # SCENARIO(cluster|single) BROKER ROUND SIZE
  local sc=$1 b=$2 r=$3 size=$4 n=1 q="qq-bench" out leader=0 i
  [ "$sc" = cluster ] && n=3
  RUN_ID=$((RUN_ID + 1)); out="$WORK/run$RUN_ID.json"
  local fail=""
  if ! start_nodes "$b" "$n"; then
    fail="$b did not start"
  elif ! timeout 120 "$PERF" --uri "$(uri "${NODE_PORTS[0]}")" --json --quiet --quorum-queue \
        --queue-args x-quorum-initial-group-size=3 -x 0 -y 0 -z 1 -u "$q" > "$out.declare" 2>&1; then
    fail="declaring the quorum queue failed: $(tail -c 300 "$out.declare")"
  else
    leader=""
    for ((i = 0; i < 60; i++)); do
      leader=$(leader_of "$b" "$q")
      [ -n "$leader" ] && break
      sleep 0.5
    done
    [ -n "$leader" ] || { fail="no leader for $q within 30 s"; leader=0; }
  fi
  local cpu0="" cpu1="" hwm="" rss="" target=$leader load
  load=$(cut -d' ' -f1 /proc/loadavg)
  [ "$CONNECT" = follower ] && target=$(( (leader + 1) % n ))
  if [ -z "$fail" ]; then
    sleep 1
    cpu0=$(cpu_list)
    timeout $((SECS + 120)) "$PERF" --uri "$(uri "${NODE_PORTS[$target]}")" --json --quiet --predeclared -u "$q" \
      -x 1 -y 1 -s "$size" -f -c 256 -q 256 -z "$SECS" > "$out" 2> "$out.err" ||
      log "warren-perf failed: $(tail -n 3 "$out.err" | tr '\n' ' ')"
    cpu1=$(cpu_list); hwm=$(kb_list VmHWM); rss=$(kb_list VmRSS)
    tail -n 1 "$out" > "$out.tmp" && mv "$out.tmp" "$out"
  fi
  stop_nodes
  python3 - "$out" "$sc" "$b" "$r" "$size" "$n" "$leader" "$CLK_TCK" "$cpu0" "$cpu1" "$hwm" "$rss" "$fail" "$target" "$load" >> "$RECORDS" <<'PY'
import json, sys
path, sc, b, r, size, n, leader, tck, cpu0, cpu1, hwm, rss, fail, target, load = sys.argv[1:]
try:
    g = json.loads(open(path).read() or "{}")
except Exception:
    g = {}
if fail:
    g = {"ok": False, "errors": [fail]}
ints = lambda s: [int(x) for x in s.split()]
c0, c1 = ints(cpu0), ints(cpu1)
print(json.dumps({"scenario": sc, "broker": b, "round": int(r), "size": int(size), "nodes": int(n),
                  "leader": int(leader), "connected_to": int(target), "loadavg": float(load),
                  "node_cpu_s": [(y - x) / int(tck) for x, y in zip(c0, c1)],
                  "node_hwm_kb": ints(hwm), "node_rss_kb": ints(rss), "gen": g}))
PY
  log "$sc $b ${size}B round $r: $(tail -n 1 "$RECORDS" | python3 -c '
import json,sys; d=json.loads(sys.stdin.read()); g=d["gen"]
print("confirmed %s/s consumed %s/s, node CPU %s s, leader n%d, %s" % (g.get("confirm_rate"), g.get("consume_rate"),
      [round(x,2) for x in d["node_cpu_s"]], d["leader"]+1, "; ".join(g.get("errors") or []) or "ok"))')"
}

# ---------------------------------------------------------------- idle queues
run_idle() { # BROKER
  local b=$1 i out
  RUN_ID=$((RUN_ID + 1)); out="$WORK/run$RUN_ID-idle"
  local fail="" cpu0="" cpu1="" rss0="" cpu2="" cpu3="" rss1="" hwm="" decl_s=0 settle_s=0 leaders=""
  if ! start_nodes "$b" 3; then
    fail="$b did not start"
  else
    sleep 5
    cpu0=$(cpu_list); sleep "$IDLE_SECONDS"; cpu1=$(cpu_list); rss0=$(kb_list VmRSS)
    log "idle $b: declaring $IDLE_QUEUES quorum queues"
    local t0 t1; t0=$(date +%s.%N)
    timeout 1200 "$PERF" --uri "$(uri "${NODE_PORTS[0]}")" --json --quiet --quorum-queue \
      --queue-args x-quorum-initial-group-size=3 --queues "$IDLE_QUEUES" -x 0 -y 0 -z 1 -u idle-qq \
      > "$out.declare" 2>&1 || fail="declaring $IDLE_QUEUES quorum queues failed: $(tail -c 300 "$out.declare")"
    t1=$(date +%s.%N); decl_s=$(python3 -c "print(round($t1 - $t0, 1))")
    # Let every group elect its leader and go quiet.
    for ((i = 0; i < 120; i++)); do
      leaders=$("${b}_leader_counts" || true)
      [ "$(awk '{ s = 0; for (i = 1; i <= NF; i++) { split($i, a, "="); s += a[2] } print s }' <<< "$leaders")" -ge "$IDLE_QUEUES" ] && break
      sleep 1
    done
    settle_s=$i
    sleep 10
    cpu2=$(cpu_list); sleep "$IDLE_SECONDS"; cpu3=$(cpu_list); rss1=$(kb_list VmRSS); hwm=$(kb_list VmHWM)
  fi
  stop_nodes
  python3 - "$b" "$IDLE_QUEUES" "$IDLE_SECONDS" "$CLK_TCK" "$cpu0" "$cpu1" "$rss0" "$cpu2" "$cpu3" "$rss1" "$hwm" \
    "$decl_s" "$leaders" "$fail" >> "$RECORDS" <<'PY'
import json, sys
b, nq, secs, tck, cpu0, cpu1, rss0, cpu2, cpu3, rss1, hwm, decl_s, leaders, fail = sys.argv[1:]
ints = lambda s: [int(x) for x in s.split()]
d = lambda a, z: [(y - x) / int(tck) for x, y in zip(ints(a), ints(z))]
print(json.dumps({"scenario": "idle", "broker": b, "queues": int(nq), "seconds": int(secs),
                  "cpu_before_s": d(cpu0, cpu1), "cpu_after_s": d(cpu2, cpu3),
                  "rss_before_kb": ints(rss0), "rss_after_kb": ints(rss1), "node_hwm_kb": ints(hwm),
                  "declare_s": float(decl_s), "leaders": leaders.strip(), "error": fail}))
PY
  log "idle $b: $(tail -n 1 "$RECORDS" | cut -c1-400)"
}

# ---------------------------------------------------------------- backlog
run_backlog() { # BROKER
  local b=$1 q="qq-backlog" out leader=0 i fail="" rss0="" rss1="" hwm="" prate="" drate=""
  RUN_ID=$((RUN_ID + 1)); out="$WORK/run$RUN_ID-backlog"
  if ! start_nodes "$b" 3; then
    fail="$b did not start"
  elif ! timeout 120 "$PERF" --uri "$(uri "${NODE_PORTS[0]}")" --json --quiet --quorum-queue \
        --queue-args x-quorum-initial-group-size=3 -x 0 -y 0 -z 1 -u "$q" > "$out.declare" 2>&1; then
    fail="declaring the quorum queue failed: $(tail -c 300 "$out.declare")"
  else
    leader=""
    for ((i = 0; i < 60; i++)); do leader=$(leader_of "$b" "$q"); [ -n "$leader" ] && break; sleep 0.5; done
    [ -n "$leader" ] || { fail="no leader for $q"; leader=0; }
  fi
  if [ -z "$fail" ]; then
    sleep 2
    rss0=$(kb_list VmRSS)
    timeout 1800 "$PERF" --uri "$(uri "${NODE_PORTS[$leader]}")" --json --quiet --predeclared -u "$q" \
      -x 1 -y 0 -s 100 -f -c 256 -C "$BACKLOG_MESSAGES" -z 1700 > "$out.pub" 2> "$out.pub.err" ||
      fail="publishing failed: $(tail -n 2 "$out.pub.err" | tr '\n' ' ')"
    sleep 5
    rss1=$(kb_list VmRSS)
    timeout 1800 "$PERF" --uri "$(uri "${NODE_PORTS[$leader]}")" --json --quiet --predeclared -u "$q" \
      -x 0 -y 1 -s 100 -q 1000 -A 100 -D "$BACKLOG_MESSAGES" -z 1700 > "$out.drain" 2> "$out.drain.err" ||
      fail="${fail:+$fail; }draining failed: $(tail -n 2 "$out.drain.err" | tr '\n' ' ')"
    hwm=$(kb_list VmHWM)
    prate=$(tail -n 1 "$out.pub" | python3 -c 'import json,sys; print(json.loads(sys.stdin.read()).get("confirm_rate") or "")' 2>/dev/null || true)
    drate=$(tail -n 1 "$out.drain" | python3 -c 'import json,sys; print(json.loads(sys.stdin.read()).get("consume_rate") or "")' 2>/dev/null || true)
  fi
  stop_nodes
  python3 - "$b" "$BACKLOG_MESSAGES" "$leader" "$rss0" "$rss1" "$hwm" "$prate" "$drate" "$fail" >> "$RECORDS" <<'PY'
import json, sys
b, n, leader, rss0, rss1, hwm, prate, drate, fail = sys.argv[1:]
ints = lambda s: [int(x) for x in s.split()]
num = lambda s: float(s) if s else None
print(json.dumps({"scenario": "backlog", "broker": b, "messages": int(n), "leader": int(leader),
                  "rss_before_kb": ints(rss0), "rss_queued_kb": ints(rss1), "node_hwm_kb": ints(hwm),
                  "publish_rate": num(prate), "drain_rate": num(drate), "error": fail}))
PY
  log "backlog $b: $(tail -n 1 "$RECORDS" | cut -c1-400)"
}

# ---------------------------------------------------------------- main
RUN_ID=0
log "work dir $WORK; parts $ONLY; brokers ${BROKERS[*]}; $ROUNDS rounds x ${SECS}s; sizes $SIZES"
for sc in cluster single; do
  want "$sc" || continue
  for size in $SIZES; do
    for ((r = 1; r <= ROUNDS; r++)); do
      for b in "${BROKERS[@]}"; do run_load "$sc" "$b" "$r" "$size"; done
    done
  done
done
if want idle; then
  for b in "${BROKERS[@]}"; do run_idle "$b"; done
fi
if want backlog; then
  for b in "${BROKERS[@]}"; do run_backlog "$b"; done
fi

[ "$OUT" = "-" ] || cp "$RECORDS" "${OUT%.md}.jsonl"
report "$RECORDS"
