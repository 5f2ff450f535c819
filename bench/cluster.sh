#!/usr/bin/env bash
# Multi-node fan-out benchmark: Plexus on the redis and nats engines, 1 node vs 3 nodes.
#
#   bench/cluster.sh [--subscribers N] [--rate R] [--duration SECONDS]
#                    [--engines "redis redis-cluster redis-cluster-sharded nats"]
#                    [--topologies "1 1x3 3"]
#                    [--no-build] [--no-doc]
#
# Needs Redis at 127.0.0.1:6379 and NATS with JetStream at 127.0.0.1:4222 (override with
# REDIS_URL / NATS_URL, loopback only). `redis-cluster` is the redis engine on a Redis Cluster
# of three masters that the script starts itself (redis-server, redis-cli) on loopback ports;
# `redis-cluster-sharded` the same with sharded pub/sub. Every load targets 127.0.0.1 and every run is bounded
# (`--time-limit` on the load generator plus `timeout`). Writes docs/benchmarks-cluster.md unless
# --no-doc.
#
# How a run works (read crates/plexus-bench/src/fanout.rs for the measurement itself):
#   * nodes listen on 127.0.0.1:PORT (TCP echo/chat off), same --api-key/--token-hmac-secret, a
#     private --data-dir, and a per-run unique --redis-prefix/--nats-prefix;
#   * the publisher always posts to node A's HTTP API (/api/publish), subscribers use the native
#     protocol (/connection/websocket);
#   * 1 node: one `plexus bench fanout` with N subscribers on channel `fanout0`;
#   * 3 nodes: one `plexus bench fanout` per node, in parallel, with N/3 subscribers on that node.
#     `plexus bench fanout` cannot run subscribers without its own publisher (no subscribers-only
#     mode) and its order/loss check assumes one publisher per channel, and its latency clock is
#     per process, so each process gets its OWN channel (`fanout1`..`fanout3`), published at R/s
#     through node A's API. Subscribers on nodes B and C therefore only receive what crossed the
#     engine (Redis pub/sub or NATS) from node A. Every subscriber sees R msg/s as in the 1-node
#     run, so total deliveries/s are comparable; the engine carries 3×R publications/s.
#   * 1x3: the control for that split: 1 node, three load generators and three channels exactly as
#     in the 3-node run, all on node A. It separates "more nodes" from "three channels and three
#     load-generator processes".
set -euo pipefail

SUBSCRIBERS=1000
RATE=100
DURATION=10
ENGINES="redis redis-cluster nats"
TOPOLOGIES="1 1x3 3"
BUILD=1
WRITE_DOC=1
ARGS="$*"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --subscribers) SUBSCRIBERS="$2"; shift 2 ;;
    --rate) RATE="$2"; shift 2 ;;
    --duration) DURATION="${2%s}"; shift 2 ;;
    --engines) ENGINES="$2"; shift 2 ;;
    --topologies) TOPOLOGIES="$2"; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --no-doc) WRITE_DOC=0; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
BIN="$ROOT/target/release/plexus"
REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
NATS_URL="${NATS_URL:-nats://127.0.0.1:4222}"
API_KEY="bench-cluster-key-$$"
SECRET="bench-cluster-secret-$$-$RANDOM"
BASE_PORT="${BASE_PORT:-$((18700 + ($$ % 200) * 3))}"
WORK="$(mktemp -d /tmp/plexus-cluster-bench.XXXXXX)"
CLK_TCK="$(getconf CLK_TCK)"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

log() { printf 'cluster.sh: %s\n' "$*" >&2; }

NODE_PIDS=()
BENCH_PIDS=()
# The Redis Cluster of the redis-cluster runs: its node ports once started.
CLUSTER_PORTS=()
CUR_ENGINE=""
CUR_PREFIX=""

# Deletes the run's keys (Redis) or streams and bucket (NATS) under PREFIX.
cleanup_engine() {
  local engine="$1" prefix="$2"
  [[ -z "$prefix" ]] && return 0
  if [[ "$engine" == redis-cluster* ]]; then
    local port left=0
    for port in "${CLUSTER_PORTS[@]}"; do
      redis-cli -p "$port" --scan --pattern "$prefix:*" | xargs -r -n 100 redis-cli -p "$port" del >/dev/null || true
      left=$((left + $(redis-cli -p "$port" --scan --pattern "$prefix:*" | wc -l)))
    done
    log "redis cluster: keys left under $prefix:* = $left"
  elif [[ "$engine" == redis ]]; then
    redis-cli -u "$REDIS_URL" --scan --pattern "$prefix:*" | xargs -r redis-cli -u "$REDIS_URL" del >/dev/null || true
    local left; left="$(redis-cli -u "$REDIS_URL" --scan --pattern "$prefix:*" | wc -l)"
    log "redis: keys left under $prefix:* = $left"
  else
    # No `nats` CLI here: speak the NATS text protocol to the JetStream API directly.
    python3 - "$NATS_URL" "$prefix" <<'PY' >&2 || log "nats: could not delete the streams of $prefix (they are small; delete ${prefix}_history, ${prefix}_presence, KV_${prefix}_meta by hand)"
import socket, sys, json, re
from urllib.parse import urlparse
u = urlparse(sys.argv[1].split(",")[0]); prefix = sys.argv[2]
s = socket.create_connection((u.hostname or "127.0.0.1", u.port or 4222), timeout=5)
f = s.makefile("rb")
f.readline()  # INFO
s.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":false}\r\nSUB _INBOX.cleanup 1\r\n')
for name in (f"{prefix}_history", f"{prefix}_presence", f"KV_{prefix}_meta"):
    s.sendall(f"PUB $JS.API.STREAM.DELETE.{name} _INBOX.cleanup 0\r\n\r\n".encode())
    while True:
        line = f.readline()
        if not line:
            raise SystemExit("connection closed")
        if line.startswith(b"PING"):
            s.sendall(b"PONG\r\n"); continue
        if line.startswith(b"-ERR"):
            raise SystemExit(line.decode().strip())
        m = re.match(rb"MSG \S+ \S+ (\d+)", line)
        if m:
            body = f.read(int(m.group(1)) + 2)[:-2]
            reply = json.loads(body)
            ok = reply.get("success") or reply.get("error", {}).get("err_code") == 10059
            print(f"cluster.sh: nats: delete stream {name}: {'ok' if ok else reply}")
            break
PY
  fi
}

stop_all() {
  local pid
  for pid in "${BENCH_PIDS[@]}" "${NODE_PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${BENCH_PIDS[@]}" "${NODE_PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  BENCH_PIDS=(); NODE_PIDS=()
}

# Starts a Redis Cluster of three masters (no replicas) on free loopback ports, once.
start_redis_cluster() {
  [[ ${#CLUSTER_PORTS[@]} -gt 0 ]] && return 0
  local i port bus
  for ((i = 0; i < 3; i++)); do
    port=$((BASE_PORT + 50 + i)); bus=$((BASE_PORT + 60 + i))
    if ss -ltn "sport = :$port or sport = :$bus" | grep -q LISTEN; then
      log "port $port or $bus is busy; set BASE_PORT"; exit 1
    fi
    redis-server --port "$port" --bind 127.0.0.1 --cluster-enabled yes --cluster-port "$bus" \
      --cluster-config-file "$WORK/nodes-$port.conf" --save "" --appendonly no --dir "$WORK" \
      --daemonize yes --pidfile "$WORK/redis-$port.pid" --logfile "$WORK/redis-$port.log"
    CLUSTER_PORTS+=("$port")
  done
  for port in "${CLUSTER_PORTS[@]}"; do
    for ((i = 0; i < 50; i++)); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
  done
  redis-cli --cluster create "${CLUSTER_PORTS[@]/#/127.0.0.1:}" --cluster-replicas 0 --cluster-yes >/dev/null
  for port in "${CLUSTER_PORTS[@]}"; do
    for ((i = 0; i < 100; i++)); do
      redis-cli -p "$port" cluster info | grep -q cluster_state:ok && break; sleep 0.1
    done
  done
  log "redis cluster on ports ${CLUSTER_PORTS[*]}"
}

stop_redis_cluster() {
  local port
  for port in "${CLUSTER_PORTS[@]}"; do
    [[ -f "$WORK/redis-$port.pid" ]] && kill "$(cat "$WORK/redis-$port.pid")" 2>/dev/null || true
  done
  CLUSTER_PORTS=()
}

on_exit() {
  stop_all
  if [[ -n "$CUR_PREFIX" ]]; then cleanup_engine "$CUR_ENGINE" "$CUR_PREFIX"; fi
  stop_redis_cluster
  rm -rf "$WORK"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

# CPU seconds (user+system) a live process has used.
cpu_s() {
  local stat; stat="$(cat "/proc/$1/stat" 2>/dev/null)" || { echo 0; return; }
  stat="${stat##*) }"
  awk -v t="$CLK_TCK" '{ printf "%.1f", ($12 + $13) / t }' <<<"$stat"
}

for tool in jq redis-cli python3 curl; do
  command -v "$tool" >/dev/null || { log "missing tool: $tool"; exit 1; }
done

if [[ "$BUILD" == 1 ]]; then
  log "building: cargo build --release -p plexus"
  cargo build --release -p plexus >&2
fi
[[ -x "$BIN" ]] || { log "no $BIN (build it or drop --no-build)"; exit 1; }

ROWS=()
NOTES=()

run_one() {
  local engine="$1" nodes="$2" procs="$3" label="$4"
  local prefix="benchcl_${engine//-/_}_${nodes}n${procs}p_$$_${RANDOM}"
  [[ "$engine" == redis-cluster* ]] && start_redis_cluster
  CUR_ENGINE="$engine"; CUR_PREFIX="$prefix"
  local i port data
  local -a ports=()
  for ((i = 0; i < nodes; i++)); do
    port=$((BASE_PORT + i))
    if ss -ltn "sport = :$port" | grep -q LISTEN; then
      log "port $port is busy; set BASE_PORT"; exit 1
    fi
    ports+=("$port")
    data="$WORK/$prefix-node$i"; mkdir -p "$data"
    local -a engine_args=(--engine "${engine%%-*}")
    if [[ "$engine" == redis-cluster* ]]; then
      # Each node starts its pub/sub connection on another cluster node.
      local seeds=("${CLUSTER_PORTS[@]:i}" "${CLUSTER_PORTS[@]:0:i}")
      local joined; joined="$(IFS=,; echo "${seeds[*]/#/127.0.0.1:}")"
      engine_args+=(--redis-url redis://127.0.0.1 --redis-cluster "$joined" --redis-prefix "$prefix")
      [[ "$engine" == redis-cluster-sharded ]] && engine_args+=(--redis-cluster-sharded-pubsub true)
    elif [[ "$engine" == redis ]]; then
      engine_args+=(--redis-url "$REDIS_URL" --redis-prefix "$prefix")
    else
      engine_args+=(--nats-url "$NATS_URL" --nats-prefix "$prefix")
    fi
    "$BIN" serve --listen "127.0.0.1:$port" --tcp-echo off --tcp-chat off "${engine_args[@]}" \
      --api-key "$API_KEY" --token-hmac-secret "$SECRET" --data-dir "$data" \
      --log-level warn >"$data/log" 2>&1 &
    NODE_PIDS+=("$!")
  done
  for port in "${ports[@]}"; do
    local ok=0
    for ((i = 0; i < 100; i++)); do
      if curl -fsS "http://127.0.0.1:$port/ready" >/dev/null 2>&1; then ok=1; break; fi
      sleep 0.2
    done
    [[ "$ok" == 1 ]] || { log "node on $port not ready; log:"; cat "$WORK/$prefix"-node*/log >&2; exit 1; }
  done
  local token
  token="$("$BIN" token --user bench --token-hmac-secret "$SECRET" --data-dir "$WORK/$prefix-node0")"

  local cpu_before=0 pid
  for pid in "${NODE_PIDS[@]}"; do cpu_before="$(awk -v a="$cpu_before" -v b="$(cpu_s "$pid")" 'BEGIN{print a+b}')"; done

  log "run: engine=$engine nodes=$nodes load-generators=$procs subscribers=$SUBSCRIBERS rate=$RATE/s duration=${DURATION}s prefix=$prefix"
  local -a outs=()
  local share rest=$((SUBSCRIBERS % procs)) out
  for ((i = 0; i < procs; i++)); do
    share=$((SUBSCRIBERS / procs + (i < rest ? 1 : 0)))
    out="$WORK/$prefix-bench$i.json"; outs+=("$out")
    local channel="fanout$((procs == 1 ? 0 : i + 1))"
    timeout --kill-after=5 $((DURATION + 90)) \
      /usr/bin/time -f '%U %S' -o "$out.time" \
      "$BIN" bench fanout "ws://127.0.0.1:${ports[$((i % nodes))]}/connection/websocket" \
        --protocol native --token "$token" --channel "$channel" \
        --subscribers "$share" --rate "$RATE" --duration "${DURATION}s" \
        --publish-api "http://127.0.0.1:${ports[0]}/api/publish" --api-key "$API_KEY" \
        --time-limit "$((DURATION + 60))s" --json -q >"$out" 2>"$out.err" &
    BENCH_PIDS+=("$!")
  done
  local failed=0
  for pid in "${BENCH_PIDS[@]}"; do wait "$pid" || failed=1; done
  BENCH_PIDS=()
  local cpu_after=0
  for pid in "${NODE_PIDS[@]}"; do cpu_after="$(awk -v a="$cpu_after" -v b="$(cpu_s "$pid")" 'BEGIN{print a+b}')"; done
  local node_cpu; node_cpu="$(awk -v a="$cpu_after" -v b="$cpu_before" 'BEGIN{printf "%.1f", a-b}')"
  local bench_cpu; bench_cpu="$(cat "${outs[@]/%/.time}" 2>/dev/null | awk '{u+=$1; s+=$2} END{printf "%.1f", u+s}')"
  stop_all
  cleanup_engine "$engine" "$prefix"
  CUR_PREFIX=""

  for out in "${outs[@]}"; do
    if ! jq -e . "$out" >/dev/null 2>&1; then
      log "bench output $out unreadable: $(cat "$out.err")"
      ROWS+=("| $engine | $label | run failed: $(tr '\n|' ' /' <"$out.err" | cut -c1-120) |||||||||||")
      return 0
    fi
  done
  [[ "$failed" == 1 ]] && NOTES+=("$engine/$label: a load generator exited non-zero (see its failures).")

  # Sum counts over the per-node bench processes; latencies: the worst process's percentile
  # (percentiles of different processes cannot be merged exactly).
  local row
  row="$(jq -rs --arg e "$engine" --arg n "$label" --arg nc "$node_cpu" --arg bc "$bench_cpu" '
    def f1: (. * 10 | round) / 10;
    def ms: (. / 100 | round) / 10 | tostring | if test("[.]") then . else . + ".0" end;
    (map(.ready) | add) as $ready |
    (map(.subscribers) | add) as $subs |
    (map(.sent) | add) as $sent |
    (map(.planned) | add) as $planned |
    (map(.deliveries) | add) as $del |
    (map(.expected_deliveries) | add) as $exp |
    (map(.deliveries_per_s) | add) as $dps |
    (map(.lost) | add) as $lost |
    (map(.out_of_order) | add) as $ooo |
    (map(.publish_errors + .failed + .dropped) | add) as $errs |
    (map(.failures | to_entries | map("\(.key)×\(.value)")) | add | unique | join(", ")) as $why |
    "| \($e) | \($n) | \($ready)/\($subs) | \($sent)/\($planned) | \($del)/\($exp) | \($dps | round) | \($lost) | \($ooo) | \(map(.latency_us.p50_us) | max | ms) | \(map(.latency_us.p99_us) | max | ms) | \(map(.latency_us.p999_us) | max | ms) | \(map(.latency_us.max_us) | max | ms) | \($nc) / \($bc) | \($errs)\(if $why == "" then "" else " (" + $why + ")" end) |"
  ' "${outs[@]}")"
  ROWS+=("$row")
  echo "$row" >&2
  for out in "${outs[@]}"; do cat "$out" >>"${RAW_JSON:-/dev/null}"; echo >>"${RAW_JSON:-/dev/null}"; done
}

START="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
for engine in $ENGINES; do
  for topo in $TOPOLOGIES; do
    case "$topo" in
      1) run_one "$engine" 1 1 "1" ;;
      1x3) run_one "$engine" 1 3 "1 (3 channels, 3 gens)" ;;
      3) run_one "$engine" 3 3 "3" ;;
      *) log "unknown topology $topo (1, 1x3, 3)"; exit 2 ;;
    esac
  done
done

HEADER="| engine | nodes | subscribers ready | sent/planned | deliveries/expected | deliveries/s | lost | out of order | p50 ms | p99 ms | p99.9 ms | max ms | CPU s: nodes / load gen | errors |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
TABLE="$HEADER"
for row in "${ROWS[@]}"; do TABLE+=$'\n'"$row"; done

echo
echo "$TABLE"
for note in "${NOTES[@]}"; do echo "- $note"; done

if [[ "$WRITE_DOC" == 1 ]]; then
  CPU_MODEL="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  DIRTY="$(git status --porcelain 2>/dev/null | grep -qv '^??' && echo ' (with uncommitted changes)' || true)"
  {
    cat <<EOF
# Multi-node fan-out (Redis, Redis Cluster and NATS engines)

Measured $START on $(nproc) CPUs ($CPU_MODEL), Linux $(uname -r), commit $COMMIT$DIRTY,
Redis $(redis-cli -u "$REDIS_URL" info server 2>/dev/null | sed -n 's/^redis_version:\(.*\)\r$/\1/p') (the \`redis-cluster\` rows: a Redis Cluster of three masters on this machine, started by the script; \`redis-cluster-sharded\`: the same with sharded pub/sub), NATS at $NATS_URL (JetStream).

\`\`\`sh
bench/cluster.sh${ARGS:+ $ARGS}
\`\`\`

$SUBSCRIBERS subscribers (native protocol, \`/connection/websocket\`), $RATE messages/s of 64 bytes
per channel for ${DURATION} s, published through node A's HTTP API (\`POST /api/publish\`). With 3
nodes the subscribers are split evenly over the nodes, one \`plexus bench fanout\` per node, run in
parallel. \`plexus bench fanout\` always runs its own publisher and checks order against one
publisher per channel, with a per-process latency clock, so each of the three processes uses its
own channel, published at $RATE/s through node A: every subscriber receives $RATE msg/s as in the
1-node run, subscribers on nodes B and C only get what crossed the engine, and the engine carries
3 × $RATE publications/s instead of $RATE. The "1 (3 channels, 3 gens)" row is the control for
that split: one node, the same three channels and three load generators as the 3-node run. Counts
are summed over the processes; latencies
(publish call on node A → arrival at the subscriber) are the worst process's percentile. "CPU s"
is the CPU time the Plexus nodes used during the load and the CPU time of the load generators.

$TABLE

EOF
    for note in "${NOTES[@]}"; do echo "- $note"; done
    cat <<'EOF'
## Reading

- **One machine does everything.** All nodes, Redis or NATS, and the load generators (a thousand
  WebSocket clients and the HTTP publisher) share the same CPUs. Three nodes do not get more CPU
  than one; they split the same cores and add work (each publication crosses the broker, each node
  decodes it and fans it out). These numbers say whether cross-node delivery is complete and in
  order, and roughly what it costs in latency; they do not say how a real cluster scales, where
  each node brings its own cores.
- **Deliveries/s is set by the load** (subscribers × rate = the expected column / duration), not
  by a server limit. A row below that figure finished its deliveries late (a backlog drained after
  the publisher stopped), which shows up in the same row's tail latency. Loss and out-of-order are
  counted per subscriber against a gapless sequence, so 0 there means every subscriber on every
  node saw every publication once and in order.
- **Redis Cluster** (`redis-cluster` rows): three masters on this same machine, started by the
  script. Each Plexus node reads a channel from the master that holds it; when it read them
  through one cluster node instead (the bus forwarding every publication, its links with
  Nagle's algorithm on), the 3-node row had p50 17.7 ms and p99 49.3 ms against 3.5 and 14.9
  ms on a single Redis in the same run.
- **Sharded pub/sub** (`redis-cluster-sharded` rows): the same cluster with
  `redis_cluster_sharded_pubsub`. At a few hundred publications a second the cluster bus is far
  from its limit, so these rows match the classic ones within the noise; what sharding buys (a
  publication rate that grows with the masters, since no publication crosses the bus) needs
  more publications than one machine can generate and deliver.
- **Latency** is publish call on node A (HTTP) → arrival at the subscriber, and includes the
  broker round trip and the load generators competing with the nodes for the same cores. The
  1-node row uses one channel and one load-generator process; the 3-node row three channels and
  three processes, so compare 3 nodes with the "1 (3 channels, 3 gens)" control, not with the
  plain 1-node row. Tails (p99 and up) on a 2-CPU machine mostly measure scheduling and move by
  several times between runs, more when anything else runs on the machine: re-run before reading a
  difference in them.
EOF
  } >"$ROOT/docs/benchmarks-cluster.md"
  log "wrote docs/benchmarks-cluster.md"
fi
