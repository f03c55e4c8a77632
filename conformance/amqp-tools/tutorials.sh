#!/usr/bin/env bash
# The RabbitMQ tutorials that the rabbitmq-c command line tools (Debian
# amqp-tools: amqp-declare-queue, amqp-publish, amqp-consume, amqp-get,
# amqp-delete-queue) can express.
#
# Usage: AMQP_URL=amqp://... bash tutorials.sh hello_world|work_queues|publish_subscribe|routing|topics
#
# The tools cannot declare exchanges, so pub/sub, routing and topics use the
# pre-declared amq.fanout, amq.direct and amq.topic exchanges, with routing
# keys prefixed by a per-run id.  They cannot set or read correlation ids, so
# there is no RPC scenario here.  Exits 0 on success; the last line printed is
# the reason of a failure.
set -u -o pipefail

U="${AMQP_URL:?AMQP_URL must be set}"
RUN="$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')"
T="$(mktemp -d "${TMPDIR:-/tmp}/conf-amqp-tools.XXXXXX")"
BG=()
cleanup() {
    local p
    for p in "${BG[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null; done
    wait 2>/dev/null
    rm -rf "$T"
}
trap cleanup EXIT

fail() { echo "$*"; exit 1; }
run() { # run CMD... : run a tool, fail with its stderr on error
    local out
    out="$("$@" 2>&1)" || fail "$1 failed: $(echo "$out" | tail -n 1)"
    printf '%s' "$out"
}
lines() { if [ -f "$1" ]; then grep -c '' "$1"; else echo 0; fi; }
real_lines() { if [ -f "$1" ]; then grep -v '^sync ' "$1" | grep -c '' || true; else echo 0; fi; }
wait_until() { # wait_until SECONDS CMD... : poll CMD every 0.1 s
    local deadline=$((SECONDS + $1)); shift
    while ! "$@"; do
        [ "$SECONDS" -ge "$deadline" ] && return 1
        sleep 0.1
    done
}
has_lines() { [ "$(lines "$1")" -ge "$2" ]; }
has_real_lines() { [ "$(real_lines "$1")" -ge "$2" ]; }
expect_file() { # expect_file WHAT FILE EXPECTED-TEXT (sync markers stripped)
    local got
    got="$(grep -v '^sync ' "$2" || true)"
    if [ "$got" != "$3" ]; then
        fail "$1: expected [$(echo "$3" | paste -sd '|')] got [$(echo "$got" | paste -sd '|')]"
    fi
}

# Start `amqp-consume -q QUEUE -e EXCHANGE -r KEYS` in the background, writing
# one line per message to FILE, and return once its bindings are in place:
# amqp-consume declares+binds before consuming, so the first "sync" message
# sent straight to QUEUE (default exchange) that comes out proves it.
bound_consumer() { # bound_consumer QUEUE EXCHANGE KEYS FILE
    local q="$1" ex="$2" keys="$3" file="$4" i
    amqp-consume -u "$U" -q "$q" -e "$ex" -r "$keys" -- sh -c 'cat; echo' >"$file" 2>"$file.err" &
    BG+=($!)
    for i in $(seq 1 100); do
        amqp-publish -u "$U" -r "$q" -b "sync $i" 2>/dev/null
        if wait_until 1 grep -q '^sync ' "$file"; then return 0; fi
        kill -0 "${BG[-1]}" 2>/dev/null || fail "amqp-consume on $q died: $(tail -n 1 "$file.err")"
    done
    fail "consumer on $q never became ready"
}

hello_world() {
    local q="conf.hello.$RUN" want i
    local declared
    declared="$(run amqp-declare-queue -u "$U" -q "$q")"
    [ "$declared" = "$q" ] || fail "amqp-declare-queue printed '$declared', expected '$q'"
    want=""
    for i in 0 1 2 3 4; do
        run amqp-publish -u "$U" -r "$q" -b "Hello World! #$i" >/dev/null
        want+="Hello World! #$i"$'\n'
    done
    # line mode: one message per line of stdin, over one connection
    printf 'line message #%s\n' 5 6 7 | amqp-publish -u "$U" -r "$q" -l 2>"$T/pub.err" \
        || fail "amqp-publish -l failed: $(tail -n 1 "$T/pub.err")"
    # amqp-publish -l keeps each line's newline in the body, and the consumer
    # command adds one more: hence the empty lines
    want+=$'line message #5\n\nline message #6\n\nline message #7'
    timeout 20 amqp-consume -u "$U" -q "$q" -c 8 -- sh -c 'cat; echo' >"$T/hello.out" 2>"$T/hello.err" \
        || fail "amqp-consume -c 8 did not finish: $(tail -n 1 "$T/hello.err")"
    expect_file "consumed messages" "$T/hello.out" "$want"

    # amqp-get: one message per call, exit status 2 once the queue is empty
    run amqp-publish -u "$U" -r "$q" -b "get #1" >/dev/null
    run amqp-publish -u "$U" -r "$q" -b "get #2" >/dev/null
    for i in 1 2; do
        local body
        body="$(amqp-get -u "$U" -q "$q" 2>"$T/get.err")" || fail "amqp-get #$i failed: $(tail -n 1 "$T/get.err")"
        [ "$body" = "get #$i" ] || fail "amqp-get #$i returned '$body'"
    done
    amqp-get -u "$U" -q "$q" >/dev/null 2>&1
    local rc=$?
    [ "$rc" = 2 ] || fail "amqp-get on an empty queue exited $rc, expected 2 (empty)"
    run amqp-delete-queue -u "$U" -q "$q" >/dev/null
    echo "ok: 8 consumed in order, 2 fetched, then empty"
}

work_queues() {
    local q="conf.task_queue.$RUN" n=12 i want=""
    run amqp-declare-queue -u "$U" -d -q "$q" >/dev/null
    for i in $(seq 1 $n); do
        run amqp-publish -u "$U" -p -r "$q" -b "task $i" >/dev/null
        want+="task $i"$'\n'
    done
    # slow worker first: with prefetch 1 it may hold only one task at a time
    amqp-consume -u "$U" -q "$q" -p 1 \
        -- sh -c "touch '$T/slow.started'; sleep 1; cat >>'$T/slow.out'; echo >>'$T/slow.out'" 2>"$T/slow.err" &
    BG+=($!)
    wait_until 15 test -f "$T/slow.started" || fail "slow worker got no task: $(tail -n 1 "$T/slow.err")"
    amqp-consume -u "$U" -q "$q" -p 1 -- sh -c "cat >>'$T/fast.out'; echo >>'$T/fast.out'" 2>"$T/fast.err" &
    BG+=($!)
    touch "$T/slow.out" "$T/fast.out"
    all_done() { [ $(( $(lines "$T/slow.out") + $(lines "$T/fast.out") )) -ge $n ]; }
    wait_until 30 all_done || fail "only $(lines "$T/fast.out") fast + $(lines "$T/slow.out") slow of $n tasks processed"
    sleep 1.5   # let any bogus extra delivery show up, and the last ack go out
    local slow fast
    slow=$(lines "$T/slow.out"); fast=$(lines "$T/fast.out")
    local got
    got="$(cat "$T/slow.out" "$T/fast.out" | sort)"
    [ "$got" = "$(printf '%s' "$want" | sort)" ] \
        || fail "tasks processed (sorted): [$(echo "$got" | paste -sd '|')], expected each of task 1..$n exactly once"
    [ "$slow" -ge 1 ] && [ "$fast" -ge 1 ] || fail "not both workers got work: fast=$fast slow=$slow"
    [ "$slow" -le 3 ] || fail "prefetch=1 fair dispatch not honoured: slow worker got $slow of $n"
    for p in "${BG[@]}"; do kill "$p" 2>/dev/null; done
    wait 2>/dev/null
    BG=()
    amqp-get -u "$U" -q "$q" >/dev/null 2>&1
    local rc=$?
    [ "$rc" = 2 ] || fail "queue not empty after all tasks were acked (amqp-get exit $rc)"
    run amqp-delete-queue -u "$U" -q "$q" >/dev/null
    echo "ok: fast=$fast slow=$slow"
}

publish_subscribe() {
    local q1="conf.logs1.$RUN" q2="conf.logs2.$RUN" n=8 i want=""
    bound_consumer "$q1" amq.fanout "any" "$T/q1.out"
    bound_consumer "$q2" amq.fanout "any" "$T/q2.out"
    for i in $(seq 1 $n); do
        run amqp-publish -u "$U" -e amq.fanout -r "ignored.$i" -b "log $RUN #$i" >/dev/null
        want+="log $RUN #$i"$'\n'
    done
    want="${want%$'\n'}"
    wait_until 15 has_real_lines "$T/q1.out" $n || fail "subscriber 1 got $(real_lines "$T/q1.out") of $n"
    wait_until 15 has_real_lines "$T/q2.out" $n || fail "subscriber 2 got $(real_lines "$T/q2.out") of $n"
    sleep 0.5
    expect_file "subscriber 1" "$T/q1.out" "$want"
    expect_file "subscriber 2" "$T/q2.out" "$want"
    echo "ok: 2 subscribers x $n messages"
}

routing() {
    local qa="conf.err.$RUN" qb="conf.iwe.$RUN" i sev wa="" wb="" na=0 nb=0
    bound_consumer "$qa" amq.direct "$RUN.error" "$T/a.out"
    bound_consumer "$qb" amq.direct "$RUN.info,$RUN.warning,$RUN.error" "$T/b.out"
    i=0
    for sev in info warning error debug error info critical warning error; do
        i=$((i + 1))
        run amqp-publish -u "$U" -e amq.direct -r "$RUN.$sev" -b "$sev: message $i" >/dev/null
        case "$sev" in error) wa+="$sev: message $i"$'\n'; na=$((na + 1)) ;; esac
        case "$sev" in info|warning|error) wb+="$sev: message $i"$'\n'; nb=$((nb + 1)) ;; esac
    done
    wait_until 15 has_real_lines "$T/a.out" $na || fail "error consumer got $(real_lines "$T/a.out") of $na"
    wait_until 15 has_real_lines "$T/b.out" $nb || fail "info/warning/error consumer got $(real_lines "$T/b.out") of $nb"
    sleep 0.5
    expect_file "error-only consumer" "$T/a.out" "${wa%$'\n'}"
    expect_file "info+warning+error consumer" "$T/b.out" "${wb%$'\n'}"
    echo "ok: exact severities per consumer"
}

topics() {
    # queue -> comma-separated binding keys (prefixed with the run id)
    local -A bind=(
        [q1]="$RUN.*.orange.*"
        [q2]="$RUN.*.*.rabbit,$RUN.lazy.#"
        [all]="$RUN.#"
        [kern]="$RUN.kern.*"
        [crit]="$RUN.*.critical"
    )
    # routing key -> queues that must get it
    local table=(
        "quick.orange.rabbit:q1 q2 all"
        "lazy.orange.elephant:q1 q2 all"
        "quick.orange.fox:q1 all"
        "lazy.brown.fox:q2 all"
        "lazy.pink.rabbit:q2 all"
        "quick.brown.fox:all"
        "quick.orange.new.rabbit:all"
        "lazy.orange.new.rabbit:q2 all"
        "lazy:q2 all"
        "kern.critical:all kern crit"
        "kern.disk.critical:all"
        "kern:all"
    )
    local qn row key targets i=0
    local -A want=() count=()
    for qn in "${!bind[@]}"; do
        bound_consumer "conf.topic.$qn.$RUN" amq.topic "${bind[$qn]}" "$T/$qn.out"
        want[$qn]=""; count[$qn]=0
    done
    for row in "${table[@]}"; do
        key="${row%%:*}"; targets="${row#*:}"; i=$((i + 1))
        run amqp-publish -u "$U" -e amq.topic -r "$RUN.$key" -b "$key #$i" >/dev/null
        for qn in $targets; do
            want[$qn]+="$key #$i"$'\n'; count[$qn]=$((count[$qn] + 1))
        done
    done
    for qn in "${!bind[@]}"; do
        wait_until 15 has_real_lines "$T/$qn.out" "${count[$qn]}" \
            || fail "queue $qn (${bind[$qn]//$RUN./}) got $(real_lines "$T/$qn.out") of ${count[$qn]}"
    done
    sleep 0.5
    for qn in "${!bind[@]}"; do
        expect_file "queue $qn bound to ${bind[$qn]//$RUN./}" "$T/$qn.out" "${want[$qn]%$'\n'}"
    done
    echo "ok: ${#table[@]} routing keys x ${#bind[@]} queues match the table"
}

case "${1:-}" in
    hello_world|work_queues|publish_subscribe|routing|topics) "$1" ;;
    *) echo "usage: $0 hello_world|work_queues|publish_subscribe|routing|topics"; exit 2 ;;
esac
