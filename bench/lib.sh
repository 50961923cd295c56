# Helpers for bench/run.sh (sourced). Loopback only; every process started here is
# remembered by PID and stopped by PID (TERM, then KILL), never by name.

BENCH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$BENCH")"

# --- knobs (environment) --------------------------------------------------------------
RUNS="${RUNS:-3}"
export N_PAR="${N_PAR:-10000}" N_SEQ="${N_SEQ:-3000}"
LAT_N="${LAT_N:-1000}"
LAT_MODES="${LAT_MODES:-keep}"
WORKLOADS="${WORKLOADS:-par50_conn,par50_keep,seq1_conn,seq1_keep}"
ALL_SYSTEMS="direct,floor,haraka,gate-empty,gate-real-sqlite,gate-real-redis"
SYSTEMS="${SYSTEMS:-$ALL_SYSTEMS}"
HARAKA_VARIANTS="${HARAKA_VARIANTS:-realistic-2n-nd}"
HARAKA_LOG="${HARAKA_LOG:-warn}"
NPM="${NPM:-npm}"
REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/13}"
SINK_PORT="${SINK_PORT:-20025}"
HARAKA_PORT="${HARAKA_PORT:-20027}"
GATE_PORT="${GATE_PORT:-20030}"
FLOOR_PORT="${FLOOR_PORT:-20040}"
# Where installs, logs and per-run state go (git-ignored); the tables go to RESULTS.
BENCH_HOME="$(mkdir -p "${BENCH_HOME:-$BENCH/.home}" && cd "${BENCH_HOME:-$BENCH/.home}" && pwd)"
RESULTS="$(mkdir -p "${RESULTS:-$BENCH/results}" && cd "${RESULTS:-$BENCH/results}" && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
SMTPGATE="$VENV/bin/smtpgate"

STARTED_PIDS=()
CLEANUPS=()
FAILED=0

say() { printf '\n=== %s\n' "$*"; }
warn() { printf '!!! %s\n' "$*" >&2; }

port_open() {  # port_open PORT: is something listening on 127.0.0.1:PORT?
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

wait_port() {  # wait_port PORT PID [timeout_s]: until the port opens, the PID dies, or time is up
  local port=$1 pid=$2 t=${3:-30} i=0
  until port_open "$port"; do
    kill -0 "$pid" 2>/dev/null || { warn "the process for port $port exited"; return 1; }
    i=$((i + 1))
    [ "$i" -le $((t * 10)) ] || { warn "port $port did not open within ${t}s"; return 1; }
    sleep 0.1
  done
}

wait_port_closed() {  # wait_port_closed PORT [timeout_s]
  local port=$1 t=${2:-15} i=0
  while port_open "$port"; do
    i=$((i + 1))
    [ "$i" -le $((t * 10)) ] || { warn "port $port is still open after ${t}s"; return 1; }
    sleep 0.1
  done
}

need_free_port() {  # need_free_port PORT KNOB
  if port_open "$1"; then
    warn "127.0.0.1:$1 is already in use by another process; stop it or set $2 to another port"
    return 1
  fi
}

stop_pid() {  # stop one PID we started: TERM, up to 10 s, then KILL
  local p=$1
  [ -n "$p" ] || return 0
  if kill -0 "$p" 2>/dev/null; then
    kill -TERM "$p" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$p" 2>/dev/null; then
      warn "PID $p did not stop on TERM within 10 s; killing it and its child processes"
      local kids
      kids=$(pgrep -P "$p" || true)  # by parent PID: its workers, which TERM should have ended
      kill -KILL "$p" $kids 2>/dev/null || true
    fi
  fi
  wait "$p" 2>/dev/null || true
  # forget it: once reaped, its PID may be given to someone else's process
  local kept=() q
  for q in "${STARTED_PIDS[@]}"; do [ "$q" = "$p" ] || kept+=("$q"); done
  STARTED_PIDS=("${kept[@]}")
}

cleanup() {
  local p c
  for p in "${STARTED_PIDS[@]}"; do stop_pid "$p"; done
  for c in "${CLEANUPS[@]}"; do eval "$c" || true; done
  CLEANUPS=()
}

# start_bg LOG CMD...: start a system in the background, its PID in BG_PID.
start_bg() {
  local log=$1; shift
  "$@" > "$log" 2>&1 &
  BG_PID=$!
  STARTED_PIDS+=("$BG_PID")
}

# skip LABEL REASON: the system is not measured; the report says why.
skip() {
  warn "$1 not measured: $2"
  printf '%s\t%s\n' "$1" "$2" >> "$RUN_DIR/skipped.tsv"
}

# absent LABEL REASON: a tool or service the system needs is not there: skipped, with the
# reason in the report (a failure with CI=true, where nothing may be skipped silently).
absent() {
  skip "$1" "$2"
  if [ "${CI:-}" = true ]; then FAILED=1; fi
}

# measure LABEL PORT [--cpu name=PID ...]: throughput workloads, then latency.
measure() {
  local label=$1 port=$2; shift 2
  "$PY" "$BENCH/drive.py" --port "$port" --label "$label" --runs "$RUNS" \
      --workloads "$WORKLOADS" --cpu "sink=$SINK_PID" --out "$RUN_DIR/results.tsv" "$@" || FAILED=1
  local mode
  if [ "$LAT_N" -gt 0 ]; then
    for mode in ${LAT_MODES//,/ }; do
      "$PY" "$BENCH/lat.py" --port "$port" --label "$label" --n "$LAT_N" --mode "$mode" \
          --out "$RUN_DIR/latency.tsv" || { FAILED=1; warn "$label: latency ($mode) failed"; }
    done
  fi
}
