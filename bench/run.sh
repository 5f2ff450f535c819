#!/usr/bin/env bash
# Compares Plexus with its peers (Node ws, FastAPI + uvicorn, axum + broadcast default/tuned)
# and the kernel floor on the same two raw endpoints, then writes docs/benchmarks.md.
#
# Usage: bench/run.sh [options]
#   --peers LIST      comma-separated, from plexus,node-ws,fastapi,axum-default,axum-tuned
#                     (default: all five)
#   --tests LIST      comma-separated, from conns,fanout,echo,floor (default: all four)
#   --rounds N        interleaved rounds; each cell is the median over rounds (default 3)
#   --conns N         idle connections for the memory test (default 19000)
#   --quick           --conns 5000 --rounds 1 (a smoke run; numbers are rougher)
#   --duration S      seconds of the fan-out, echo and floor loads (default 10)
#   --hold S          seconds the idle connections are held (default 10)
#   --no-build        use what is built (target/release/plexus, bench/*/target) as it is
#   --report-only F   only rewrite docs/benchmarks.md from results file F
#
# Every load targets 127.0.0.1 and is bounded in count and time. The server runs pinned to
# core 0 (taskset -c 0), the load generator (target/release/plexus bench) to core 1.
# Needs: cargo, node + npm, python3 (with venv), taskset. Raw results: bench/results/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH="$ROOT/bench"
COMMAND="bench/run.sh $*"
peers="plexus,node-ws,fastapi,axum-default,axum-tuned"
tests="conns,fanout,echo,floor"
rounds=3 conns=19000 duration=10 hold=10 build=1 report_only=""

while [ $# -gt 0 ]; do
  case "$1" in
    --peers) peers="$2"; shift 2 ;;
    --tests) tests="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --conns) conns="$2"; shift 2 ;;
    --quick) conns=5000; rounds=1; shift ;;
    --duration) duration="$2"; shift 2 ;;
    --hold) hold="$2"; shift 2 ;;
    --no-build) build=0; shift ;;
    --report-only) report_only="$2"; shift 2 ;;
    -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ -n "$report_only" ]; then
  exec python3 "$BENCH/report.py" "$report_only" "$ROOT/docs/benchmarks.md"
fi

if [ "$(nproc)" -lt 2 ]; then
  echo "run.sh: needs 2 cores (server on core 0, load on core 1)" >&2; exit 2
fi
# 19,000 connections need 19,000+ descriptors in the server and in the load generator.
ulimit -n 20000 2>/dev/null || true
if [ "$(ulimit -n)" -lt $((conns + 200)) ]; then
  echo "run.sh: open-files limit $(ulimit -n) is too low for --conns $conns" >&2; exit 2
fi

has() { [[ ",$peers," == *",$1,"* ]]; }
step() { printf '== %s\n' "$*" >&2; }

if [ "$build" = 1 ]; then
  step "building plexus (release)"
  cargo build --release -p plexus --manifest-path "$ROOT/Cargo.toml"
  if has axum-default || has axum-tuned; then
    step "building the axum baseline"
    cargo build --release --manifest-path "$BENCH/peers/axum-baseline/Cargo.toml"
  fi
  if [[ ",$tests," == *",floor,"* ]]; then
    step "building the kernel floor"
    cargo build --release --manifest-path "$BENCH/floor/Cargo.toml"
  fi
  if has node-ws; then
    step "npm ci (node ws)"
    (cd "$BENCH/peers/node-ws" && npm ci --no-audit --no-fund --loglevel=error)
  fi
  if has fastapi; then
    step "venv + pip (fastapi, uvicorn)"
    [ -x "$BENCH/.venv/bin/python" ] || python3 -m venv "$BENCH/.venv"
    "$BENCH/.venv/bin/pip" install -q -r "$BENCH/peers/fastapi/requirements.txt"
  fi
fi

# A private copy, so another build of target/release/plexus during the run cannot swap it.
mkdir -p "$BENCH/.bin" "$BENCH/results"
cp "$ROOT/target/release/plexus" "$BENCH/.bin/plexus"
export PLEXUS_BIN="$BENCH/.bin/plexus"

stamp="$(date -u +%Y%m%dT%H%M%SZ)"
out="$BENCH/results/$stamp.json"
step "measuring: peers=$peers tests=$tests rounds=$rounds conns=$conns"
python3 "$BENCH/harness.py" --peers "$peers" --tests "$tests" --rounds "$rounds" \
  --conns "$conns" --hold "$hold" --duration "$duration" --out "$out"
cp "$out" "$BENCH/results/latest.json"

BENCH_COMMAND="$COMMAND" BENCH_REV="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  python3 "$BENCH/report.py" "$out" "$ROOT/docs/benchmarks.md"
step "wrote docs/benchmarks.md (raw: ${out#$ROOT/})"
