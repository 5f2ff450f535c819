#!/usr/bin/env bash
# Runs the SDK end-to-end suites against a prebuilt Plexus binary; builds nothing.
#
#   PLEXUS_BIN=path/to/plexus tests/sdk/run.sh      (default: target/debug/plexus of this repo)
#
# js/: the official centrifuge-js SDK (npm ci && npm test). python/: the official
# centrifuge-python SDK (a virtualenv in python/.venv, then pytest). Frames and server output
# of each test go to tests/sdk/.logs/. Exits non-zero if either suite fails.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
PLEXUS_BIN="${PLEXUS_BIN:-$repo/target/debug/plexus}"
case "$PLEXUS_BIN" in
  /*) ;;
  *) PLEXUS_BIN="$(pwd)/$PLEXUS_BIN" ;;
esac
export PLEXUS_BIN
if [[ ! -x "$PLEXUS_BIN" ]]; then
  echo "run.sh: no plexus binary at $PLEXUS_BIN (build it first: cargo build -p plexus)" >&2
  exit 2
fi
echo "run.sh: plexus binary $PLEXUS_BIN"

status=0
js_summary="js: not run"
py_summary="python: not run"

# --- JavaScript ---------------------------------------------------------------------------
js_log="$(mktemp)"
(
  cd "$here/js" &&
  npm ci --no-audit --no-fund --loglevel=error &&
  npm test
) 2>&1 | tee "$js_log"
js_status=${PIPESTATUS[0]}
js_summary="js: $(grep -E '^# (tests|pass|fail|skipped|cancelled) ' "$js_log" | sed 's/^# //' | tr '\n' ' ')(exit $js_status)"
[[ $js_status -eq 0 ]] || status=1
rm -f "$js_log"

# --- Python -------------------------------------------------------------------------------
py_log="$(mktemp)"
(
  cd "$here/python" &&
  { [[ -x .venv/bin/python ]] || python3 -m venv .venv; } &&
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt &&
  .venv/bin/python -m pytest -v
) 2>&1 | tee "$py_log"
py_status=${PIPESTATUS[0]}
py_summary="python: $(grep -E '^=+ .*(passed|failed|error|skipped|no tests ran).* =+$' "$py_log" | tail -1 | sed -E 's/^=+ //; s/ =+$//') (exit $py_status)"
[[ $py_status -eq 0 ]] || status=1
rm -f "$py_log"

echo
echo "== SDK suites =="
echo "$js_summary"
echo "$py_summary"
exit $status
