#!/usr/bin/env bash
# The whole check, as CI and people run it: formatting, lints, every Rust test (unit,
# integration against the real server, CLI), then the browser tests in headless Chromium.
# Installs what it needs (Debian's chromium, npm packages) when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

# Services the tests talk to for real: started when they are not running (a fresh machine).
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
ensure_redis() {
  # The tests also start redis-servers of their own (TLS, Sentinel, Cluster via redis-cli).
  if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null
  fi
  if port_open 6379; then return; fi
  echo "starting redis-server"
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 50); do port_open 6379 && return; sleep 0.1; done
  echo "redis did not start" >&2; exit 1
}

ensure_nats() {
  if port_open 4222; then return; fi
  if ! command -v nats-server >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null
  fi
  echo "starting nats-server (JetStream)"
  mkdir -p /var/lib/nats-server 2>/dev/null || true
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
  for _ in $(seq 50); do port_open 4222 && return; sleep 0.1; done
  echo "nats-server did not start" >&2; exit 1
}

step "services (Redis, NATS)"
ensure_redis
ensure_nats

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo build"
cargo build --workspace --locked

step "benchmarks build (not run): the axum baseline and the kernel-floor probe"
cargo build --locked --release --manifest-path bench/floor/Cargo.toml -q
cargo check --locked --manifest-path bench/peers/axum-baseline/Cargo.toml -q

step "Rust tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
  cargo test --workspace --locked --doc
else
  cargo test --workspace --locked --no-fail-fast
fi

# The binary the JavaScript and SDK suites run (cargo puts it under CARGO_TARGET_DIR if set).
PLEXUS_DEBUG_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/plexus"
case "$PLEXUS_DEBUG_BIN" in /*) ;; *) PLEXUS_DEBUG_BIN="$PWD/$PLEXUS_DEBUG_BIN" ;; esac

step "browser tests (headless Chromium)"
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  fi
fi
(
  cd tests/browser
  npm ci --no-audit --no-fund --loglevel=error
  PLEXUS_BIN="$PLEXUS_DEBUG_BIN" npm test
)

step "plexus.js (unit tests with a fake clock, integration with the real binary)"
(
  cd tests/plexusjs
  npm ci --no-audit --no-fund --loglevel=error
  PLEXUS_BIN="$PLEXUS_DEBUG_BIN" npm test
)

step "official SDKs (centrifuge-js, centrifuge-python) against the real binary"
PLEXUS_BIN="$PLEXUS_DEBUG_BIN" tests/sdk/run.sh
