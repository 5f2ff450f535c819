#!/usr/bin/env bash
# Compares Plexus with its peers (Node ws, FastAPI + uvicorn, axum + broadcast default/tuned)
# and the kernel floor, measures every target of issue 6, then writes docs/benchmarks.md.
#
# Usage: bench/run.sh [options]
#   --peers LIST      comma-separated, from plexus,node-ws,fastapi,axum-default,axum-tuned
#                     (default: all five)
#   --tests LIST      comma-separated (default: all):
#                       conns          idle raw connections: RSS per connection (--conns)
#                       conns-native   the same, native protocol + 1 subscription (Plexus)
#                       fanout         1,000 subscribers x 50 msg/s (raw rooms)
#                       fanout-wide    10,000 x 5 msg/s (raw rooms)
#                       fanout-load    1,000 x 500 msg/s (raw rooms)
#                       fanout-native  1,000 x 50 msg/s, native protocol (Plexus)
#                       echo           round trips on /echo
#                       idle           10,000 idle connections held 60 s: % of a core
#                       publish        acked publishes/s, memory vs durable engine,
#                                      native protocol and HTTP API (Plexus)
#                       overload       slow subscribers (1/3 of the rate) + probes
#                       floor          the kernel's cost of one write() (bench/floor)
#   --rounds N        interleaved rounds; each cell is the median over rounds (default 1:
#                     all tests once take ~20 min; 3 rounds take about an hour)
#   --conns N         idle connections for the memory tests (default 19000)
#   --quick           a smoke run, ~10 min: --conns 5000, idle 5,000 for 30 s, fan-out wide
#                     5,000 subscribers, 5 s loads, overload 50 subscribers for 15 s
#   --duration S      seconds of the fan-out, echo, publish and floor loads (default 10)
#   --hold S          seconds the idle connections of the memory tests are held (default 10)
#   --idle-hold S     seconds the idle test holds its connections (default 60: 2+ heartbeats)
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
tests="conns,conns-native,fanout,fanout-wide,fanout-load,fanout-native,echo,idle,publish,overload,floor"
rounds=1 conns=19000 duration=10 hold=10 build=1 report_only=""
idle_conns=10000 idle_hold=60 wide=10000 overload_subscribers=100 overload_duration=20

while [ $# -gt 0 ]; do
  case "$1" in
    --peers) peers="$2"; shift 2 ;;
    --tests) tests="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --conns) conns="$2"; shift 2 ;;
    --quick) conns=5000; rounds=1; duration=5; idle_conns=5000; idle_hold=30; wide=5000
             overload_subscribers=50; overload_duration=15; shift ;;
    --duration) duration="$2"; shift 2 ;;
    --hold) hold="$2"; shift 2 ;;
    --idle-hold) idle_hold="$2"; shift 2 ;;
    --no-build) build=0; shift ;;
    --report-only) report_only="$2"; shift 2 ;;
    -h|--help) sed -n '2,34p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
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
most=$conns
for n in "$idle_conns" "$wide"; do [ "$n" -gt "$most" ] && most=$n; done
if [ "$(ulimit -n)" -lt $((most + 200)) ]; then
  echo "run.sh: open-files limit $(ulimit -n) is too low for $most connections" >&2; exit 2
fi

has() { [[ ",$peers," == *",$1,"* ]]; }
step() { printf '== %s\n' "$*" >&2; }

if [ "$build" = 1 ]; then
  step "building plexus (release)"
  cargo build --release -p plexus --manifest-path "$ROOT/Cargo.toml"
  if has axum-default || has axum-tuned; then
    step "building the axum baseline"
    cargo build --release --manifest-path "$BENCH/peers/axum-baseline/Cargo.toml" \
      --target-dir "$BENCH/peers/axum-baseline/target"
  fi
  if [[ ",$tests," == *",floor,"* ]]; then
    step "building the kernel floor"
    cargo build --release --manifest-path "$BENCH/floor/Cargo.toml" --target-dir "$BENCH/floor/target"
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
cp "${CARGO_TARGET_DIR:-$ROOT/target}/release/plexus" "$BENCH/.bin/plexus"
export PLEXUS_BIN="$BENCH/.bin/plexus"

stamp="$(date -u +%Y%m%dT%H%M%SZ)"
out="$BENCH/results/$stamp.json"
step "measuring: peers=$peers tests=$tests rounds=$rounds conns=$conns"
export BENCH_COMMAND="$COMMAND"
BENCH_REV="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
export BENCH_REV
python3 "$BENCH/harness.py" --peers "$peers" --tests "$tests" --rounds "$rounds" \
  --conns "$conns" --hold "$hold" --duration "$duration" --out "$out" \
  --idle-conns "$idle_conns" --idle-hold "$idle_hold" --wide-subscribers "$wide" \
  --overload-subscribers "$overload_subscribers" --overload-duration "$overload_duration"
cp "$out" "$BENCH/results/latest.json"

python3 "$BENCH/report.py" "$out" "$ROOT/docs/benchmarks.md"
step "wrote docs/benchmarks.md (raw: ${out#$ROOT/})"
