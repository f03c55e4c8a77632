#!/usr/bin/env bash
# rabbitmqadmin v2 (RabbitMQ's own CLI for the HTTP API) against a broker's
# management API. Env: MGMT_PORT, RABBITMQADMIN (path to the v2 binary).
# Usage: scenarios.sh basics|definitions|users|policies
set -u -o pipefail
RUN="${RANDOM}${RANDOM}"
A=("${RABBITMQADMIN:-rabbitmqadmin}" --host 127.0.0.1 --port "${MGMT_PORT:?MGMT_PORT not set}" --non-interactive)
fail() { echo "$*"; exit 1; }
run() { out=$("${A[@]}" "$@" 2>&1) || fail "rabbitmqadmin $* failed: $(echo "$out" | tail -1)"; echo "$out"; }
expect_line() { # expect_line "$output" regex what
    echo "$1" | grep -Eq "$2" || fail "expected $3; got: $(echo "$1" | head -5 | tr '\n' '|')"
}
Q="adm-q-$RUN"; X="adm-x-$RUN"; U="adm-u-$RUN"; P="adm-p-$RUN"
case "${1:-}" in
basics)
    run declare queue --name "$Q" --durable true >/dev/null
    run declare exchange --name "$X" --type direct >/dev/null
    run declare binding --source "$X" --destination-type queue --destination "$Q" --routing-key k >/dev/null
    expect_line "$(run list queues)" "^$Q[[:space:]]" "queue $Q listed"
    expect_line "$(run list exchanges)" "^$X[[:space:]]+/[[:space:]]+direct" "exchange $X listed as direct"
    expect_line "$(run list bindings)" "$X[[:space:]]+$Q[[:space:]]+queue[[:space:]]+k" "binding $X -> $Q with key k"
    run publish message --exchange "$X" --routing-key k --payload "hello-$RUN" >/dev/null
    got=$(run get messages --queue "$Q" --count 1)
    expect_line "$got" "hello-$RUN" "the published payload back from get"
    run delete binding --source "$X" --destination-type queue --destination "$Q" --routing-key k >/dev/null
    run delete exchange --name "$X" >/dev/null
    run delete queue --name "$Q" >/dev/null
    out=$(run list queues); echo "$out" | grep -Eq "^$Q[[:space:]]" && fail "queue $Q still listed after delete"
    echo "ok"
    ;;
definitions)
    run declare queue --name "$Q" --durable true >/dev/null
    f=$(mktemp); run definitions export --file "$f" >/dev/null
    grep -q "\"$Q\"" "$f" || fail "export does not contain queue $Q"
    run delete queue --name "$Q" >/dev/null
    run definitions import --file "$f" >/dev/null
    expect_line "$(run list queues)" "^$Q[[:space:]]" "queue $Q back after import"
    run delete queue --name "$Q" >/dev/null
    rm -f "$f"; echo "ok"
    ;;
users)
    run declare user --name "$U" --password "s3cret-$RUN" --tags monitoring >/dev/null
    expect_line "$(run list users)" "^$U[[:space:]]" "user $U listed"
    run declare permissions --user "$U" --configure '^adm-' --write '.*' --read '.*' >/dev/null
    expect_line "$(run list permissions)" "$U[[:space:]]+/[[:space:]]+\^adm-" "permissions of $U"
    run delete user --name "$U" >/dev/null
    out=$(run list users); echo "$out" | grep -Eq "^$U[[:space:]]" && fail "user $U still listed after delete"
    echo "ok"
    ;;
policies)
    run declare policy --name "$P" --pattern "^adm-" --apply-to queues --priority 1 --definition '{"max-length": 10}' >/dev/null
    expect_line "$(run list policies)" "$P" "policy $P listed"
    run delete policy --name "$P" >/dev/null
    echo "ok"
    ;;
*) echo "usage: $0 basics|definitions|users|policies"; exit 2 ;;
esac
