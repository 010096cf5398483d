#!/usr/bin/env bash
# Rehearse deploy/README.md on one machine, over loopback, before touching a hospital:
#
#   deploy/rehearse.sh [FOLDER]
#
# It runs the guide's own commands, as its section "Rehearse the whole guide on one machine" shows them
# (tests/test_rehearsal.py checks that each appears there verbatim): certificates, the coordinator, the
# Fleet-only proxy (where nginx is installed), three sites (two train, one holdout) on phantom data,
# enrolment, ledgers, approval, two jobs in a row with an upgrade to a new release between them, a site
# revoked during the second job (which goes on without it), and prints what happened. Everything lives
# in FOLDER (default: a new temporary folder); every process it starts is stopped when it ends. Exit
# status 0 when everything happened as the guide says; otherwise it names what did not, and the logs are
# in FOLDER/logs. Run it from a neurofed checkout with its virtual environment in .venv (make setup), or
# set NEUROFED_VENV to another one.
set -euo pipefail
cd "$(dirname "$0")/.."

# --- plumbing (helpers start with _; everything else below is a command of the guide) -----------------

VENV=${NEUROFED_VENV:-$PWD/.venv}
export PATH="$VENV/bin:$PATH"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
R=$(realpath -m "${1:-$(mktemp -d "${TMPDIR:-/tmp}/neurofed-rehearsal.XXXXXX")}")
mkdir -p "$R/logs" "$R/nginx/tmp"
export FLWR_HOME="$R/flwr-home" # the operator's own Flower settings stay untouched
# Three sites and the coordinator share this machine's cores (each hospital has its own in earnest): one
# thread per process, as in a simulation; more would only make them wait for each other.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
DAEMONS=()

_say() { printf '\n== [%ss] %s\n' "$SECONDS" "$*"; }
_fail() { # what the runs and sites recorded, then what failed (last, where a tail of the output shows it)
    _diagnose >&2
    printf '\nrehearsal FAILED: %s\n(logs in %s/logs)\n' "$*" "$R" >&2
    exit 1
}
_diagnose() { # what the runs and the sites recorded: a failure names its cause even where FOLDER is gone
    local file
    for file in "$R"/coordinator/runs/*/metrics.jsonl; do
        [ -f "$file" ] || continue
        echo "-- sites left out of $(basename "$(dirname "$file")") (its metrics.jsonl):"
        grep -E '"event": "(sites|dropped|rejected|evaluate-refused)"' "$file" | cut -c 1-600 || true
    done
    for file in "$R"/logs/hospital-*.log; do
        [ -f "$file" ] || continue
        echo "-- last lines of $(basename "$file"):"
        grep -vE '^[[:space:]]*$|INFO' "$file" | tail -n 12 | cut -c 1-400
    done
}
_free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
_port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
_started() { DAEMONS+=("$1"); }
_tree() {
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        echo "$child"
        _tree "$child"
    done
}
_stop() { # _stop PID: end a daemon and everything it started
    local pids
    pids="$1 $(_tree "$1")"
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 20); do
        kill -0 "$1" 2>/dev/null || break
        pids="$pids $(_tree "$1")" # a process it started while stopping (a SuperNode's ClientApp) goes too
        sleep 0.5
    done
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
}
_stop_all() {
    local pid
    for pid in "${DAEMONS[@]}"; do _stop "$pid"; done
    if [ -f "$R/nginx/nginx.pid" ]; then nginx -e stderr -p "$R/nginx/" -c nginx.conf -s stop 2>/dev/null || true; fi
}
trap _stop_all EXIT
trap 'exit 143' TERM INT # so that a stopped rehearsal stops its daemons too (nginx detaches itself)
_wait_for() { # _wait_for WHAT SECONDS COMMAND...: until COMMAND succeeds
    local what=$1 deadline=$((SECONDS + $2))
    shift 2
    until "$@"; do
        ((SECONDS < deadline)) || _fail "timed out waiting for $what"
        sleep 0.5
    done
}
_activations() { grep -c 'Activated node_id' "$R/logs/coordinator.log" || true; }
_activated() { (($(_activations) >= $1)); }
_discovered() { grep -q '"event": "sites"' "$R/coordinator/runs/$1/metrics.jsonl" 2>/dev/null; }
_expect() { # _expect WHAT COMMAND...: fail the rehearsal unless COMMAND succeeds
    local what=$1
    shift
    "$@" >/dev/null 2>&1 || _fail "expected $what"
    echo "ok: $what"
}
_proxy_hides_control_api() {
    ! command -v curl >/dev/null ||
        test "$(curl -s -o /dev/null -w '%{http_code}' --cacert "$R/certs/ca.crt" "https://localhost:$FLEET_PORT/v1/control/ListRuns")" = 404
}
_wait_job() { wait "$1" || _fail "the second job failed although a training site remained: $(tail -n 5 "$R/logs/job-2.log")"; }
_show() { cat "$1"; }
_new_release() { # a copy of this source tree with another version: what an upgrade installs
    mkdir -p "$1"
    tar -C . --exclude-vcs --exclude=./.venv --exclude=./runs --exclude='__pycache__' -cf - . | tar -C "$1" -xf -
    sed -i 's/^version = "\(.*\)"$/version = "\1.post1"/' "$1/pyproject.toml"
}

LINK_PORT=$(_free_port)  # the SuperLink, loopback only (NEUROFED_ADDRESS)
FLEET_PORT=$(_free_port) # the sites' port: nginx, Fleet API only (9092 in the guide)
PORT_A=$(_free_port) PORT_B=$(_free_port) PORT_C=$(_free_port)
echo "rehearsal folder: $R"

# --- the guide's commands ------------------------------------------------------------------------------

_say "Set up the coordinator: certificates (loopback names only), then the coordinator"
deploy/make-certs.sh "$R/certs"
neurofed coordinator start --state-dir "$R/coordinator" --address "127.0.0.1:$LINK_PORT" --ca-cert "$R/certs/ca.crt" --cert "$R/certs/server.crt" --key "$R/certs/server.key" >"$R/logs/coordinator.log" 2>&1 &
_started $!
neurofed synth "$R/data" --sites 3 --subjects-per-site 5 --spacing 4
_wait_for "the coordinator's port" 600 _port_open "$LINK_PORT"

_say "The sites' port: nginx with the Fleet-only proxy"
if command -v nginx >/dev/null; then
    sed -e "s#/etc/neurofed/certs/#$R/certs/#" -e "s#listen 9092 #listen 127.0.0.1:$FLEET_PORT #" -e "s#127.0.0.1:9091#127.0.0.1:$LINK_PORT#" deploy/nginx/neurofed-fleet.conf >"$R/nginx/neurofed-fleet.conf"
    cp deploy/nginx/rehearsal.conf "$R/nginx/nginx.conf"
    nginx -e stderr -p "$R/nginx/" -c nginx.conf
    COORDINATOR=localhost:$FLEET_PORT
    _expect "the proxy passes nothing but the Fleet API (anything else gets 404)" _proxy_hides_control_api
else
    echo "nginx is not installed: the sites dial the coordinator directly (install nginx to rehearse the proxy)"
    COORDINATOR=localhost:$LINK_PORT
fi

_say "Enroll three hospitals: keys, enrolment, data check, ledger, approval, start"
neurofed-site keygen --out "$R/hospital-a/keys"
neurofed-site keygen --out "$R/hospital-b/keys"
neurofed-site keygen --out "$R/hospital-c/keys"
neurofed coordinator enroll "$R/hospital-a/keys/site.pub" --name hospital-a --state-dir "$R/coordinator"
neurofed coordinator enroll "$R/hospital-b/keys/site.pub" --name hospital-b --state-dir "$R/coordinator"
neurofed coordinator enroll "$R/hospital-c/keys/site.pub" --name hospital-c --state-dir "$R/coordinator"
neurofed-site check "$R/data/site-01"
neurofed-site budget --init --ledger "$R/hospital-a/state/privacy-ledger.jsonl" --set-budget 10 --delta 1e-5
neurofed-site budget --init --ledger "$R/hospital-b/state/privacy-ledger.jsonl" --set-budget 10 --delta 1e-5
neurofed-site approve --installed --approved-apps "$R/approved-apps.txt"
neurofed-site start --coordinator "$COORDINATOR" --ca "$R/certs/ca.crt" --key "$R/hospital-a/keys/site.key" --data "$R/data/site-01" --site-id hospital-a --budget 10 --delta 1e-5 --state-dir "$R/hospital-a/state" --approved-apps "$R/approved-apps.txt" --runtime-port "$PORT_A" >"$R/logs/hospital-a.log" 2>&1 &
_started $!
neurofed-site start --coordinator "$COORDINATOR" --ca "$R/certs/ca.crt" --key "$R/hospital-b/keys/site.key" --data "$R/data/site-02" --site-id hospital-b --budget 10 --delta 1e-5 --state-dir "$R/hospital-b/state" --approved-apps "$R/approved-apps.txt" --runtime-port "$PORT_B" >"$R/logs/hospital-b.log" 2>&1 &
HOSPITAL_B=$!
_started $HOSPITAL_B
neurofed-site start --coordinator "$COORDINATOR" --ca "$R/certs/ca.crt" --key "$R/hospital-c/keys/site.key" --data "$R/data/site-03" --site-id hospital-c --role holdout --budget 10 --delta 1e-5 --state-dir "$R/hospital-c/state" --approved-apps "$R/approved-apps.txt" --runtime-port "$PORT_C" >"$R/logs/hospital-c.log" 2>&1 &
_started $!
_wait_for "the three sites to connect" 600 _activated 3
neurofed coordinator sites --state-dir "$R/coordinator"

_say "Run a job (deploy/job.toml, made small for the rehearsal): it waits for the connected sites"
neurofed run deploy/job.toml --state-dir "$R/coordinator" --set run-dir=runs/first --set num-server-rounds=1 --set local-steps=2 --set patch-size=16 --set spacing-mm=4.0 --set field-of-view-mm=128,128,128 --set network-preset=tiny --set initial-model=none --no-stream

_say "Upgrading: a new release, built and approved at the sites, then a second job with it"
_new_release "$R/release-2"
(cd "$R" && flwr build --app "$R/release-2")
neurofed-site approve "$R"/neurofed.neurofed.*post1*.fab --replace --approved-apps "$R/approved-apps.txt"

_say "A second job with the new release; hospital-b is revoked while it runs, and the run goes on"
neurofed run deploy/job.toml --app "$R/release-2" --state-dir "$R/coordinator" --set run-dir=runs/second --set num-server-rounds=2 --set local-steps=2 --set patch-size=16 --set spacing-mm=4.0 --set field-of-view-mm=128,128,128 --set network-preset=tiny --set initial-model=none --no-stream >"$R/logs/job-2.log" 2>&1 &
JOB_2=$!
_wait_for "the second job's site discovery" 900 _discovered second
neurofed coordinator revoke hospital-b --state-dir "$R/coordinator"
_wait_job "$JOB_2"
_show "$R/logs/job-2.log"

_say "The revoked site, restarted by its hospital, is refused and says why"
_stop "$HOSPITAL_B"
neurofed-site start --coordinator "$COORDINATOR" --ca "$R/certs/ca.crt" --key "$R/hospital-b/keys/site.key" --data "$R/data/site-02" --site-id hospital-b --budget 10 --delta 1e-5 --state-dir "$R/hospital-b/state" --approved-apps "$R/approved-apps.txt" --runtime-port "$PORT_B" >"$R/logs/hospital-b-again.log" 2>&1 || true
_expect "the revoked site says why it is refused" grep "refused this site's key" "$R/logs/hospital-b-again.log"
_show "$R/logs/hospital-b-again.log"
neurofed coordinator sites --state-dir "$R/coordinator"

_say "What happened: the audit log, each site's ledger, the model's way home"
jq -c 'select(.event == "round-trained") | {run_id, round, contributed, dropped}' "$R/coordinator/audit.jsonl"
jq -c 'select(.event == "run-finished") | {run_id, weights_sha256}' "$R/coordinator/audit.jsonl"
jq -c 'select(.event == "model-received") | {run_id, weights_sha256, model_file}' "$R/hospital-c/state/audit.jsonl"
neurofed-site budget --ledger "$R/hospital-a/state/privacy-ledger.jsonl"

_say "Checks"
_expect "both jobs finished" test "$(jq -s '[.[] | select(.event == "run-finished")] | length' "$R/coordinator/audit.jsonl")" = 2
# Dropped from a round (its reply lost with its connection), or left out at a round's start where the
# revocation came before it: which of the two depends on how fast the revocation is.
_expect "hospital-b was dropped from the second job, not the run" jq -se 'any(.[]; ((.event | test("^round-")) and any(.dropped[]?; .site == "hospital-b")) or (.event == "site-rejected" and .site == "hospital-b"))' "$R/coordinator/audit.jsonl"
_expect "hospital-a trained in both jobs under one lifetime budget" test "$(jq -r '.releases | map(.run_id) | unique | length' "$R/hospital-a/state/privacy-ledger.jsonl")" = 2
_expect "hospital-c holds the final model the coordinator recorded" test "$(jq -r 'select(.event == "run-finished") | .weights_sha256' "$R/coordinator/audit.jsonl" | tail -n 1)" = "$(jq -r 'select(.event == "model-received") | .weights_sha256' "$R/hospital-c/state/audit.jsonl" | tail -n 1)"
_expect "the sites ran the new release in the second job" test "$(jq -r 'select(.event == "app-accepted") | .fab_hash' "$R/hospital-a/state/audit.jsonl" | sort -u | wc -l)" = 2
_expect "the revoked site is kept, marked revoked" jq -e '."hospital-b".revoked_at' "$R/coordinator/sites.json"
echo
echo "rehearsal complete: every step of the guide ran on this machine; files in $R"
