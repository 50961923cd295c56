#!/usr/bin/env bash
# The side-by-side relay benchmark (`make bench`): smtp-source drives each system on
# loopback, each relays to one smtp-sink; then a table of figures and ratios is printed and
# written to bench/results/. See bench/README.md for the knobs and how to read the table.
#
#   direct            smtp-source -> smtp-sink, no relay: the limit of this machine
#   floor             bench/floor_relay.py: bare aiosmtpd -> aiosmtplib, uvloop, 2 processes
#   haraka            Haraka from npm (under BENCH_HOME), 2 nodes, TCP_NODELAY, realistic plugins
#   gate-empty        smtpgate, bench/policies (no rules)
#   gate-real-sqlite  smtpgate, bench/policies-real, state in SQLite
#   gate-real-redis   smtpgate, bench/policies-real, state in Redis (REDIS_URL, own key prefix)
#   gate-rule-NAME    smtpgate, bench/policies-rules/NAME: one rule of `real` alone, SQLite (not by default)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# --- what we need -----------------------------------------------------------------------
for t in /usr/sbin/smtp-source /usr/sbin/smtp-sink; do
  [ -x "$t" ] || { warn "$t is missing: run \`make tools\` (or simply \`make bench\`)"; exit 2; }
done
[ -x "$SMTPGATE" ] || { warn "no virtualenv with smtpgate at $VENV: run \`make bench\`"; exit 2; }
for s in ${SYSTEMS//,/ }; do
  case ",$ALL_SYSTEMS," in *",$s,"*) continue;; esac
  # gate-rule-NAME: one rule of the `real` policy alone (bench/policies-rules/NAME)
  case "$s" in gate-rule-*) [ -d "$BENCH/policies-rules/${s#gate-rule-}" ] && continue;; esac
  warn "unknown system '$s' in SYSTEMS; known: $ALL_SYSTEMS, gate-rule-{$(ls "$BENCH/policies-rules" | paste -sd, -)}"
  exit 2
done
for w in ${WORKLOADS//,/ }; do
  case ",par50_conn,par50_keep,seq1_conn,seq1_keep," in *",$w,"*) ;;
    *) warn "unknown workload '$w' in WORKLOADS"; exit 2;; esac
done

RUN_ID="$(date -u +%Y%m%dT%H%M%SZ)"
RUN_DIR="$BENCH_HOME/runs/$RUN_ID"
mkdir -p "$RUN_DIR" "$RESULTS"
: > "$RUN_DIR/skipped.tsv"
cut -d' ' -f1-3 /proc/loadavg > "$RUN_DIR/load-start"
export BENCH_HOME
for knob in SYSTEMS WORKLOADS RUNS N_PAR N_SEQ LAT_N LAT_MODES HARAKA_VARIANTS; do
  printf '%s\t%s\n' "$knob" "${!knob}"
done > "$RUN_DIR/knobs.tsv"  # for the report, which can be run again on this folder
trap cleanup EXIT
trap 'exit 130' INT TERM
echo "bench run $RUN_ID: SYSTEMS=$SYSTEMS WORKLOADS=$WORKLOADS RUNS=$RUNS N_PAR=$N_PAR N_SEQ=$N_SEQ" \
     "LAT_N=$LAT_N LAT_MODES=$LAT_MODES; load $(cat "$RUN_DIR/load-start"); logs in $RUN_DIR"

# --- the sink: one for the whole run ------------------------------------------------------
need_free_port "$SINK_PORT" SINK_PORT
sink_user=(); [ "$(id -u)" = 0 ] && sink_user=(-u nobody)  # smtp-sink drops root itself
# -c counters, -m 4096 concurrent sessions, backlog 1024
start_bg "$RUN_DIR/sink.log" /usr/sbin/smtp-sink "${sink_user[@]}" -c -m 4096 "127.0.0.1:$SINK_PORT" 1024
SINK_PID=$BG_PID
wait_port "$SINK_PORT" "$SINK_PID" 10

# run_system LABEL PORT LOG -- CMD...: start it, check it relays, measure it, stop it.
run_system() {
  local label=$1 port=$2 log=$3; shift 4
  need_free_port "$port" "the port knob of $label" || { skip "$label" "port $port in use"; FAILED=1; return; }
  start_bg "$log" "$@"
  local pid=$BG_PID
  if wait_port "$port" "$pid" 60 && "$PY" "$BENCH/probe.py" "$port" --timeout 30; then
    echo "$label" >> "$RUN_DIR/probes"  # one more message the sink must have received
    measure "$label" "$port" --cpu "$label=$pid"
  else
    skip "$label" "did not start or does not relay (see $log)"; FAILED=1
    tail -5 "$log" >&2 || true
  fi
  stop_pid "$pid"
  wait_port_closed "$port" || FAILED=1
}

bench_direct() {
  say "direct: smtp-source -> smtp-sink"
  measure direct "$SINK_PORT"
}

bench_floor() {
  say "floor: bare aiosmtpd -> aiosmtplib relay, uvloop, 2 processes"
  run_system floor "$FLOOR_PORT" "$RUN_DIR/floor.log" -- \
      "$PY" "$BENCH/floor_relay.py" --listen "$FLOOR_PORT" --down "$SINK_PORT" --uvloop --workers 2
}

# Haraka from npm, under BENCH_HOME/haraka (bench/haraka/package.json pins the version).
haraka_install() {
  HDIR="$BENCH_HOME/haraka"
  if ! command -v "$NPM" >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
    absent haraka "npm or node not found: install Node.js and npm to compare with Haraka"; return 1
  fi
  if [ ! -x "$HDIR/node_modules/.bin/haraka" ] || ! cmp -s "$BENCH/haraka/package.json" "$HDIR/package.json"; then
    echo "installing Haraka from npm into $HDIR (once)"
    rm -rf "$HDIR/node_modules" "$HDIR/package-lock.json" "$HDIR/inst"
    mkdir -p "$HDIR"
    cp "$BENCH/haraka/package.json" "$HDIR/package.json"
    if ! (cd "$HDIR" && "$NPM" install --no-audit --no-fund --loglevel=error) > "$RUN_DIR/npm-install.log" 2>&1; then
      rm -f "$HDIR/package.json"  # try again next time
      skip haraka "npm install failed (see $RUN_DIR/npm-install.log)"; return 1
    fi
  fi
}

# haraka_configure SET NODES NODELAY: write the instance's config for one variant.
haraka_configure() {
  local set=$1 nodes=$2 nd=$3 c="$INST/config"
  cat > "$c/smtp.ini" <<EOF
listen=127.0.0.1:$HARAKA_PORT
nodes=$nodes
inactivity_timeout=60
force_shutdown_timeout=5
EOF
  printf '[main]\nlevel=%s\ntimestamps=false\nformat=default\n' "$HARAKA_LOG" > "$c/log.ini"
  echo "bench.test" > "$c/host_list"
  echo "gate.bench.test" > "$c/me"
  printf 'host=127.0.0.1\nport=%s\nenable_outbound=false\n' "$SINK_PORT" > "$c/smtp_forward.ini"
  mkdir -p "$INST/plugins"
  cp "$BENCH/haraka/nodelay.js" "$INST/plugins/nodelay.js"
  : > "$c/plugins"
  [ "$nd" = 1 ] && echo nodelay >> "$c/plugins"
  if [ "$set" = basic ]; then
    printf 'rcpt_to.in_host_list\nqueue/smtp_forward\n' >> "$c/plugins"
  else
    printf 'access\nrcpt_to.in_host_list\nheaders\nattachment\ndata.signatures\nqueue/smtp_forward\n' >> "$c/plugins"
    printf 'ThisStringNeverAppears-1\nThisStringNeverAppears-2\n' > "$c/data.signatures"
  fi
}

bench_haraka() {
  say "haraka: $HARAKA_VARIANTS"
  haraka_install || return 0
  INST="$RUN_DIR/haraka-inst"
  (cd "$HDIR" && node_modules/.bin/haraka -i "$INST") > "$RUN_DIR/haraka-init.log" 2>&1 \
    || { skip haraka "haraka -i failed (see $RUN_DIR/haraka-init.log)"; FAILED=1; return 0; }
  local v set_ n nd
  for v in ${HARAKA_VARIANTS//,/ }; do
    # SET-Nn[-nd]: realistic|basic, 1n|2n cluster nodes, -nd = TCP_NODELAY plugin
    IFS=- read -r set_ n nd <<< "$v"
    case "$set_" in basic|realistic) ;; *) skip "haraka-$v" "unknown variant (SET-Nn[-nd])"; continue;; esac
    haraka_configure "$set_" "${n%n}" "$([ "${nd:-}" = nd ] && echo 1 || echo 0)"
    run_system "haraka-$v" "$HARAKA_PORT" "$RUN_DIR/haraka-$v.log" -- \
        "$HDIR/node_modules/.bin/haraka" -c "$INST"
  done
}

# bench_gate LABEL POLICIES [STATE-URL]
bench_gate() {
  local label=$1 policies=$2 state=${3:-} dir="$RUN_DIR/$1"
  say "$label: smtpgate, $(basename "$policies")${state:+, $state}"
  "$PY" "$BENCH/gateconf.py" "$BENCH/gate.yaml" "$dir/gate.yaml" --listen "$GATE_PORT" \
      --sink "$SINK_PORT" --policies "$policies" ${state:+--state "$state"}
  if grep -qs '^ *- greylist:' "$policies"/*.yaml; then
    # the benchmark's one triplet, as issue 13 measures it: allowed, so every message passes
    "$SMTPGATE" greylist allow -c "$dir/gate.yaml" --triplet 127.0.0.1 sender@bench.test \
        rcpt@bench.test --note "bench/run.sh" > "$dir/greylist-allow.log" 2>&1 \
      || { skip "$label" "smtpgate greylist allow failed (see $dir/greylist-allow.log)"; FAILED=1; return 0; }
  fi
  run_system "$label" "$GATE_PORT" "$dir/gate.log" -- "$SMTPGATE" serve -c "$dir/gate.yaml"
  if grep -qs '^ *- \(senders\|greylist\):' "$policies"/*.yaml; then
    # evidence that the rules ran: the sender's state and the greylist's counts
    { "$SMTPGATE" senders show -c "$dir/gate.yaml" sender@bench.test
      "$SMTPGATE" greylist stats -c "$dir/gate.yaml"; } > "$dir/state-after.txt" 2>&1 || true
  fi
}

bench_gate_redis() {
  local version prefix="smtpgate-bench-$RUN_ID:" url
  if ! version=$("$PY" "$BENCH/redisctl.py" ping "$REDIS_URL" 2>&1); then
    absent gate-real-redis "no Redis at $REDIS_URL ($version); start redis-server or set REDIS_URL"
    return 0
  fi
  echo "$version" > "$RUN_DIR/redis-version"
  case "$REDIS_URL" in *\?*) url="$REDIS_URL&prefix=$prefix";; *) url="$REDIS_URL?prefix=$prefix";; esac
  CLEANUPS+=("\"$PY\" \"$BENCH/redisctl.py\" clean \"$REDIS_URL\" \"$prefix\"")
  bench_gate gate-real-redis "$BENCH/policies-real" "$url"
}

for s in ${SYSTEMS//,/ }; do
  case "$s" in
    direct) bench_direct ;;
    floor) bench_floor ;;
    haraka) bench_haraka ;;
    gate-empty) bench_gate gate-empty "$BENCH/policies" ;;
    gate-real-sqlite) bench_gate gate-real-sqlite "$BENCH/policies-real" ;;
    gate-real-redis) bench_gate_redis ;;
    gate-rule-*) bench_gate "$s" "$BENCH/policies-rules/${s#gate-rule-}" ;;
  esac
done

cleanup
cut -d' ' -f1-3 /proc/loadavg > "$RUN_DIR/load-end"
# smtp-sink's -c counters; the last one is complete only now that it has exited
{ grep -ao 'mesg=[0-9]*' "$RUN_DIR/sink.log" || echo mesg=0; } | tail -1 | cut -d= -f2 > "$RUN_DIR/sink-count"
say "results"
"$PY" "$BENCH/report.py" "$RUN_DIR" "$RESULTS" || FAILED=1
if [ "$FAILED" != 0 ]; then
  warn "some systems or runs failed (see above and the logs in $RUN_DIR): their figures are missing"
  exit 1
fi
