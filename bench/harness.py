#!/usr/bin/env python3
"""Measurement driver behind bench/run.sh (run.sh builds and installs; this runs and reports).

For each test, every server runs in rotation (Plexus, then each peer), in interleaved rounds;
each measurement starts a fresh server pinned to core 0 and the load generator
(`target/release/plexus bench ...`) pinned to core 1. Server CPU is utime+stime from
/proc/PID/stat, sampled every 50 ms and read over the measured window only (see `windowed`);
RSS comes from the bench's own `--server-pid` report (/proc/PID/status VmRSS).
Raw results go to bench/results/*.json; docs/benchmarks.md is written by `report`.

Tests (see TESTS and the section of report.py for each target):
  conns          idle raw /chat/idle connections: server RSS per connection
  conns-native   the same on the native protocol, one subscription each (Plexus only)
  fanout         1,000 raw subscribers x 50 msg/s: server CPU per delivery, p99, loss
  fanout-wide    10,000 x 5 msg/s (raw)
  fanout-load    1,000 x 500 msg/s (raw)
  fanout-native  1,000 x 50 msg/s on the native protocol (Plexus only)
  echo           round trips on /echo: server CPU per round trip
  idle           10,000 idle raw connections held 60 s: server CPU as % of one core
  publish        acknowledged publishes/s, memory engine vs durable embedded engine, through
                 the native protocol and the HTTP API (Plexus only)
  overload       slow subscribers (a third of the publisher's rate) + probes: 3008 cuts,
                 server RSS, probe latency
  floor          the kernel's cost of one write() to a loopback socket (bench/floor)
  fanout-filtered  (only when named) 1,000 x 50 native subscribers in a namespace with tags
                 filters, without a filter and with one every publication passes: what a
                 filtered subscription costs (the hub matches it while fanning out)
  fanout-protobuf  (only when named) fanout-native with JSON subscribers, then Protobuf ones
  fanout-delta     (only when named) 1,000 x 50 native subscribers in a namespace with delta
                 compression, with whole publications, then with Fossil deltas
"""

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
# run.sh copies target/release/plexus here, so a rebuild during the run cannot swap it.
PLEXUS = Path(os.environ.get("PLEXUS_BIN", ROOT / "target/release/plexus"))
CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVER_CORE, LOAD_CORE = "0", "1"
# Fixed secrets, so tokens can be minted and the API called without reading secrets.toml.
API_KEY = "bench-api-key"
TOKEN_SECRET = "bench-token-secret"


def server_command(name, port, data_dir, engine="memory"):
    listen = f"127.0.0.1:{port}"
    if name == "plexus":
        return ([str(PLEXUS), "serve", "--tcp-echo", "off", "--tcp-chat", "off",
                 "--listen", listen, "--data-dir", data_dir, "--api-key", API_KEY,
                 "--token-hmac-secret", TOKEN_SECRET]
                + (["--memory"] if engine == "memory" else ["--engine", engine]))
    if name == "node-ws":
        return ["node", str(BENCH / "peers/node-ws/server.js"), str(port)]
    if name == "fastapi":
        return [str(BENCH / ".venv/bin/uvicorn"), "app:app", "--app-dir",
                str(BENCH / "peers/fastapi"), "--host", "127.0.0.1", "--port", str(port),
                "--log-level", "warning", "--no-access-log", "--ws", "websockets"]
    axum = str(BENCH / "peers/axum-baseline/target/release/axum-baseline")
    if name == "axum-default":
        return [axum, "--listen", listen]
    if name == "axum-tuned":
        return [axum, "--tuned", "--listen", listen]
    raise ValueError(name)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name, engine="memory", config=None):
        self.name = name
        self.engine = engine
        self.port = free_port()
        self.data_dir = tempfile.mkdtemp(prefix="plexus-bench-")
        self.log = open(Path(self.data_dir) / "server.log", "w")
        cmd = (["taskset", "-c", SERVER_CORE]
               + server_command(name, self.port, self.data_dir, engine))
        if config is not None:  # Plexus only: a configuration file in the data folder
            config_file = Path(self.data_dir) / "plexus.toml"
            config_file.write_text(config)
            cmd += ["--config", str(config_file)]
        # taskset execs the server, so the pid is the server's own.
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.flush()
                tail = Path(self.log.name).read_text(errors="replace").strip().splitlines()[-3:]
                raise RuntimeError(f"{name} exited ({self.log.name}): {' / '.join(tail)}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                time.sleep(0.3)
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{name} did not listen on {self.port}")

    @property
    def pid(self):
        return self.proc.pid

    def url(self, path):
        return f"ws://127.0.0.1:{self.port}{path}"

    def http(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def token(self):
        """A connection token for user `bench` (Plexus only)."""
        return subprocess.run([str(PLEXUS), "token", "--user", "bench", "--token-hmac-secret",
                               TOKEN_SECRET, "--data-dir", self.data_dir], check=True,
                              capture_output=True, text=True, timeout=30).stdout.strip()

    def native(self, channel):
        """`plexus bench` flags for native clients subscribed to `channel`."""
        return ["--protocol", "native", "--token", self.token(), "--channel", channel]

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14, 15)


def run_bench(args, pid=None, limit_s=600, on_line=None):
    """Runs `plexus bench ARGS --json` on the load core. With `pid`, samples the server's CPU
    every 50 ms. Returns the report, the CPU samples and the stderr progress lines (receipt
    time, text); `on_line(text)` is called for each line as it arrives."""
    cmd = ["taskset", "-c", LOAD_CORE, str(PLEXUS), "bench"] + args + ["--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    samples, lines, stop = [], [], threading.Event()

    def sample():
        while not stop.is_set():
            try:
                samples.append((time.monotonic(), cpu_ticks(pid)))
            except OSError:
                return
            time.sleep(0.05)

    def read_err():
        # Unbuffered: each progress line is stamped when it arrives.
        fd, pending = proc.stderr.fileno(), b""
        while chunk := os.read(fd, 65536):
            now = time.monotonic()
            pending += chunk.replace(b"\r", b"\n")
            *done, pending = pending.split(b"\n")
            for raw in done:
                if raw.strip():
                    line = raw.decode(errors="replace")
                    lines.append((now, line))
                    if on_line:
                        on_line(line)
        if pending.strip():
            lines.append((time.monotonic(), pending.decode(errors="replace")))

    threads = [threading.Thread(target=read_err, daemon=True)]
    if pid is not None:
        threads.append(threading.Thread(target=sample, daemon=True))
    for t in threads:
        t.start()
    try:
        out = proc.stdout.read()
        proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    stop.set()
    for t in threads:
        t.join(2)
    try:
        report = json.loads(out)
    except json.JSONDecodeError:
        raise RuntimeError(f"bench {args[0]} failed ({proc.returncode}): "
                           + "\n".join(l for _, l in lines[-5:]))
    return report, samples, lines


def cpu_at(samples, t):
    """Server CPU seconds at monotonic time t, interpolated between samples."""
    for (t0, c0), (t1, c1) in zip(samples, samples[1:]):
        if t0 <= t <= t1:
            frac = 0 if t1 == t0 else (t - t0) / (t1 - t0)
            return (c0 + frac * (c1 - c0)) / CLK_TCK
    raise ValueError("time outside the samples")


def windowed(samples, points):
    """CPU µs per event between the first and last (time, count) progress points."""
    points = [p for p in points if samples and samples[0][0] <= p[0] <= samples[-1][0]]
    if len(points) < 2 or points[-1][1] <= points[0][1]:
        return None, None
    (ta, na), (tb, nb) = points[0], points[-1]
    cpu = cpu_at(samples, tb) - cpu_at(samples, ta)
    return cpu * 1e6 / (nb - na), {"window_s": round(tb - ta, 2), "events": nb - na,
                                   "server_cpu_s": round(cpu, 3)}


FANOUT_RE = re.compile(r"sent (\d+)/\d+, (\d+) deliveries, (\w+)")
ECHO_RE = re.compile(r"(\d+) round trips, ([\d.]+)s")


def kernel_memory():
    """The kernel's memory that grows with sockets: slab caches (bytes, from /proc/slabinfo when
    readable), total slab (/proc/meminfo) and TCP buffer pages (/proc/net/sockstat)."""
    snap = {"slab": {}}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, value = line.split(":", 1)
        if name in ("Slab", "SUnreclaim", "SReclaimable"):
            snap[name] = int(value.split()[0])
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            f = line.split()[1:]
            stat = dict(zip(f[::2], map(int, f[1::2])))
            snap["tcp_inuse"], snap["tcp_mem_pages"] = stat.get("inuse"), stat.get("mem")
    try:
        for line in Path("/proc/slabinfo").read_text().splitlines()[2:]:
            f = line.split()
            snap["slab"][f[0]] = int(f[1]) * int(f[3])  # active objects x object size
    except OSError:
        pass  # readable by root only
    return snap


# Slab caches that grow by one object per socket: the socket (TCP), its inode, its file and
# dentry, its epoll registration.
SOCKET_CACHES = ("TCP", "TCPv6", "sock_inode_cache", "filp", "dentry", "eventpoll_epi",
                 "eventpoll_pwq", "lsm_file_cache", "lsm_inode_cache")


def kernel_per_connection(before, during, conns):
    """Kernel memory per connection. Both ends are on this machine, so one connection is two
    sockets: `socket_bytes` (the caches above) is per socket, the rest per connection. The
    counters are system-wide: other work on the machine (another benchmark closing thousands
    of sockets) shows in them, so `tcp_sockets` (≈ 2 × conns when quiet) says whether to trust
    the numbers."""
    if not before or not during or not conns:
        return None
    caches = {name: during["slab"].get(name, 0) - size for name, size in before["slab"].items()}
    top = sorted(caches.items(), key=lambda kv: -kv[1])[:10]
    return {"socket_bytes": round(sum(caches.get(n, 0) for n in SOCKET_CACHES) / (2 * conns))
            if caches else None,
            "slab_kib": round((during["Slab"] - before["Slab"]) / conns, 2),
            "tcp_buffer_kib": round((during["tcp_mem_pages"] - before["tcp_mem_pages"]) * 4
                                    / conns, 2),
            "tcp_sockets": during["tcp_inuse"] - before["tcp_inuse"],
            "top_caches_bytes": {name: round(size / conns) for name, size in top if size > 0}}


def test_conns(server, opts, native=False):
    if native:
        url, extra = server.url("/connection/websocket"), server.native("chat:idle")
    else:
        url, extra = server.url("/chat/idle"), []
    before, during = kernel_memory(), {}

    def on_line(line):  # once every connection is open: the kernel's side of them
        if not during and "holding" in line:
            during.update(kernel_memory())

    report, _, _ = run_bench(["conns", url, "--count", str(opts.conns), "--duration",
                              f"{opts.hold}s", "--server-pid", str(server.pid)] + extra,
                             on_line=on_line)
    rss = report.get("server_rss_kib") or {}
    return {"kib_per_conn": rss.get("per_connection_kib"), "held": report.get("held"),
            "failed": report.get("failed"), "rss_before_kib": rss.get("before"),
            "rss_after_kib": rss.get("after"), "failures": report.get("failures"),
            "kernel_per_conn": kernel_per_connection(before, during, report.get("held"))}


def test_conns_native(server, opts):
    return test_conns(server, opts, native=True)


HOLD_RE = re.compile(r"(\d+)/\d+ open, .*holding (\d+)s/(\d+)s")


def test_idle(server, opts):
    """Server CPU while it holds idle connections (heartbeats, timers), as % of one core."""
    report, samples, lines = run_bench(
        ["conns", server.url("/chat/idle"), "--count", str(opts.idle_conns), "--duration",
         f"{opts.idle_hold}s", "--server-pid", str(server.pid)], pid=server.pid,
        limit_s=opts.idle_hold + 300)
    # Lines of the hold itself: once it is over ("60s/60s") the connections are closing, and
    # closing them is not idle cost.
    held = [(t, int(m.group(1))) for t, line in lines
            if (m := HOLD_RE.search(line)) and int(m.group(2)) < int(m.group(3))]
    held = [p for p in held if samples and samples[0][0] <= p[0] <= samples[-1][0]]
    pct = window = None
    if len(held) >= 2:
        (ta, _), (tb, _) = held[0], held[-1]
        cpu = cpu_at(samples, tb) - cpu_at(samples, ta)
        pct = cpu / (tb - ta) * 100
        window = {"window_s": round(tb - ta, 2), "server_cpu_s": round(cpu, 3)}
    rss = report.get("server_rss_kib") or {}
    return {"core_pct": pct, "window": window, "held": report.get("held"),
            "conns": opts.idle_conns, "hold_s": opts.idle_hold, "dropped": report.get("dropped"),
            "kib_per_conn": rss.get("per_connection_kib"), "failures": report.get("failures")}


def fanout(server, url, subscribers, rate, duration, extra=()):
    report, samples, lines = run_bench(
        ["fanout", url, "--subscribers", str(subscribers), "--rate", str(rate),
         "--duration", f"{duration}s"] + list(extra), pid=server.pid)
    points = []
    for t, line in lines:
        m = FANOUT_RE.search(line)
        if m and m.group(3) == "publishing" and int(m.group(1)) > 0:
            points.append((t, int(m.group(2))))
    us, window = windowed(samples, points)
    lat = report.get("latency_us") or {}
    return {"us_per_delivery": us, "window": window, "p50_us": lat.get("p50_us"),
            "p99_us": lat.get("p99_us"), "max_us": lat.get("max_us"),
            "deliveries": report.get("deliveries"), "expected": report.get("expected_deliveries"),
            "lost": report.get("lost"), "ready": report.get("ready"),
            "dropped": report.get("dropped"), "sent": report.get("sent"),
            "planned": report.get("planned"), "subscribers": subscribers, "rate": rate,
            "deliveries_per_s": report.get("deliveries_per_s"),
            "failures": report.get("failures")}


def test_fanout(server, opts):
    return fanout(server, server.url("/chat/bench"), opts.subscribers, opts.rate, opts.duration)


def test_fanout_wide(server, opts):
    return fanout(server, server.url("/chat/wide"), opts.wide_subscribers, opts.wide_rate,
                  opts.duration)


def test_fanout_load(server, opts):
    return fanout(server, server.url("/chat/load"), opts.subscribers, opts.load_rate,
                  opts.duration)


def test_fanout_native(server, opts):
    return fanout(server, server.url("/connection/websocket"), opts.subscribers, opts.rate,
                  opts.duration, server.native("chat:bench"))


# The namespace of `fanout-filtered` and `fanout-delta`: as the built-in chat's history and
# recovery, clients may publish, and subscribers may pass tags filters or ask for deltas.
TICKS_CONFIG = """
[[namespaces]]
name = "ticks"
history_size = 100
history_ttl = "5m"
recover = true
allow_publish_for_client = true
allow_tags_filter = true
allowed_delta_types = ["fossil"]
"""


def test_fanout_filtered(server, opts, case):
    """1,000 x 50 on the native protocol in a namespace that allows tags filters: subscribers
    without a filter, or with one that every publication passes (`nex` of a tag none has,
    matched by the hub for each subscriber)."""
    extra = server.native("ticks:bench")
    if case == "filter":
        extra += ["--tags-filter", '{"key":"none","cmp":"nex"}']
    res = fanout(server, server.url("/connection/websocket"), opts.subscribers, opts.rate,
                 opts.duration, extra)
    return res | {"case": case}


def test_fanout_delta(server, opts, case):
    """1,000 x 50 on the native protocol in a namespace that allows deltas: subscribers with
    whole publications, or with Fossil deltas from the one before (each subscriber applies
    them; one that does not apply counts as lost)."""
    extra = server.native("ticks:bench") + (["--delta"] if case == "delta" else [])
    res = fanout(server, server.url("/connection/websocket"), opts.subscribers, opts.rate,
                 opts.duration, extra)
    return res | {"case": case}


def test_fanout_protobuf(server, opts, case):
    """`fanout-native` with JSON subscribers, or with Protobuf ones (binary pushes; the
    publisher stays on JSON)."""
    extra = server.native("chat:bench") + (["--protobuf"] if case == "protobuf" else [])
    res = fanout(server, server.url("/connection/websocket"), opts.subscribers, opts.rate,
                 opts.duration, extra)
    return res | {"case": case}


def test_echo(server, opts):
    report, samples, lines = run_bench(
        ["echo", server.url("/echo"), "--connections", "10", "--duration",
         f"{opts.duration}s"], pid=server.pid)
    # Progress lines within the measured duration only (the final line comes after it).
    points = [(t, int(m.group(1))) for t, line in lines
              if (m := ECHO_RE.search(line)) and int(m.group(1)) > 0
              and float(m.group(2)) < opts.duration]
    us, window = windowed(samples, points)
    lat = report.get("latency_us") or {}
    return {"us_per_round_trip": us, "window": window,
            "round_trips_per_s": report.get("round_trips_per_s"),
            "p99_us": lat.get("p99_us")}


def test_floor(opts):
    exe = BENCH / "floor/target/release/floor"
    out = {}
    for frames in (1, 8):
        res = subprocess.run([str(exe), "--conns", str(opts.subscribers), "--rate",
                              str(opts.rate), "--duration-s", str(opts.duration),
                              "--frames", str(frames)], capture_output=True, text=True,
                             check=True, timeout=opts.duration * 3 + 60)
        out[f"frames_{frames}"] = json.loads(res.stdout)
    # The same at the wide fan-out's size (both ends of every socket are in the floor's process,
    # so at most 9,900 under the 20,000 files a process may hold here).
    wide = min(opts.wide_subscribers, 9900)
    res = subprocess.run([str(exe), "--conns", str(wide), "--rate", str(opts.wide_rate),
                          "--duration-s", str(opts.duration), "--frames", "1"],
                         capture_output=True, text=True, check=True,
                         timeout=opts.duration * 3 + 120)
    out["wide"] = json.loads(res.stdout)
    return out


PUBLISH_RE = re.compile(r"(\d+) published, \d+ errors, publishing")


def fs_type(path):
    try:
        return subprocess.run(["stat", "-f", "-c", "%T", path], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def test_publish(server, opts, case):
    """Acknowledged publishes/s from `publishers` concurrent publishers, one in flight each."""
    via, publishers = case
    if via == "native":
        args = [server.url("/connection/websocket"), "--token", server.token()]
    else:
        args = [server.http("/api/publish"), "--api-key", API_KEY]
    report, samples, lines = run_bench(
        ["publish"] + args + ["--publishers", str(publishers), "--channel",
                              f"chat:publish-{via}", "--duration", f"{opts.duration}s"],
        pid=server.pid)
    points = [(t, int(m.group(1))) for t, line in lines if (m := PUBLISH_RE.search(line))]
    us, window = windowed(samples, points)
    lat = report.get("latency_us") or {}
    return {"engine": server.engine, "via": via, "publishes_per_s": report.get("publishes_per_s"),
            "published": report.get("published"), "errors": report.get("errors"),
            "connected": report.get("connected"), "publishers": publishers,
            "p50_us": lat.get("p50_us"), "p99_us": lat.get("p99_us"),
            "us_per_publish": us, "window": window, "data_fs": fs_type(server.data_dir),
            "failures": report.get("failures")}


def test_overload(server, opts):
    """Slow subscribers at a third of the publisher's rate, fast ones, and probes."""
    args = ["overload", server.url("/chat/slow"), "--subscribers",
            str(opts.overload_subscribers), "--fast-subscribers", str(opts.overload_fast),
            "--rate", f"{opts.overload_rate}/s", "--size", str(opts.overload_size),
            "--duration", f"{opts.overload_duration}s", "--server-pid", str(server.pid),
            "--probe-ws", server.url("/echo")]
    if server.name == "plexus":
        args += ["--probe-get", server.http("/health"), "--probe-get", server.http("/metrics"),
                 "--probe-api", server.http("/api/info"), "--api-key", API_KEY]
    report, _, _ = run_bench(args, limit_s=opts.overload_duration * 3 + 300)
    slow, fast = report.get("slow") or {}, report.get("fast") or {}
    probes = report.get("probes") or []
    rss = report.get("server_rss_kib") or {}
    return {
        "slow": {k: slow.get(k) for k in ("requested", "connected", "ready", "failed",
                                            "closed_slow", "closed_other", "open_at_end",
                                            "deliveries", "lost")},
        "fast": {k: fast.get(k) for k in ("requested", "connected", "failed", "closed_slow",
                                            "closed_other", "deliveries", "lost")}
                | {"p99_us": (fast.get("latency_us") or {}).get("p99_us")},
        "probes": [{"kind": p["kind"], "url": p["url"], "attempts": p["attempts"],
                    "ok": p["ok"], "max_us": p["latency_us"]["max_us"],
                    "p99_us": p["latency_us"]["p99_us"], "failures": p["failures"]}
                   for p in probes],
        "rss_before_kib": rss.get("before"), "rss_max_kib": rss.get("max"),
        "rss_end_kib": rss.get("end"), "sent": report.get("sent"),
        "planned": report.get("planned"), "rate": report.get("rate"),
        "read_rate": report.get("read_rate"), "size": report.get("size"),
        "failures": report.get("failures")}


TESTS = {"conns": test_conns, "conns-native": test_conns_native, "fanout": test_fanout,
         "fanout-wide": test_fanout_wide, "fanout-load": test_fanout_load,
         "fanout-native": test_fanout_native, "echo": test_echo, "idle": test_idle,
         "publish": test_publish, "overload": test_overload, "floor": None,
         "fanout-filtered": test_fanout_filtered, "fanout-protobuf": test_fanout_protobuf,
         "fanout-delta": test_fanout_delta}
# Tests only Plexus can take (the peers have no native protocol, API or engines).
PLEXUS_ONLY = {"conns-native", "fanout-native", "publish", "fanout-filtered",
               "fanout-protobuf", "fanout-delta"}
# Not in the default run (docs/benchmarks.md has no table for them): asked for by name.
EXTRA_TESTS = {"fanout-filtered", "fanout-protobuf", "fanout-delta"}
# Server configuration a test needs.
CONFIGS = {"fanout-filtered": TICKS_CONFIG, "fanout-delta": TICKS_CONFIG}


def publisher_counts(opts):
    return [int(n) for n in str(opts.publishers).split(",")]


def cases(test, peers, opts):
    """The measurements of one test in one round: (peer, engine, extra argument)."""
    if test == "floor":
        return [("floor", None, None)]
    if test in PLEXUS_ONLY:
        peers = [p for p in peers if p == "plexus"]
    if test == "fanout-filtered":
        return [(p, "memory", case) for p in peers for case in ("plain", "filter")]
    if test == "fanout-protobuf":
        return [(p, "memory", case) for p in peers for case in ("json", "protobuf")]
    if test == "fanout-delta":
        return [(p, "memory", case) for p in peers for case in ("whole", "delta")]
    if test == "publish":
        # Each publisher count, memory then durable, back to back, for both paths.
        return [(p, engine, (via, n)) for p in peers for n in publisher_counts(opts)
                for via in ("native", "api") for engine in ("memory", "embedded")]
    return [(p, "memory", None) for p in peers]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--peers", default="plexus,node-ws,fastapi,axum-default,axum-tuned")
    p.add_argument("--tests", default=",".join(t for t in TESTS if t not in EXTRA_TESTS))
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--conns", type=int, default=19000)
    p.add_argument("--hold", type=int, default=10)
    p.add_argument("--subscribers", type=int, default=1000)
    p.add_argument("--rate", type=int, default=50)
    p.add_argument("--wide-subscribers", type=int, default=10000)
    p.add_argument("--wide-rate", type=int, default=5)
    p.add_argument("--load-rate", type=int, default=500)
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--idle-conns", type=int, default=10000)
    p.add_argument("--idle-hold", type=int, default=60)
    # Publish throughput at each count: 64 waits on the commit's latency (a publisher has one
    # publish in flight), 256 is enough in flight to saturate the server core.
    p.add_argument("--publishers", default="64,256")
    p.add_argument("--overload-subscribers", type=int, default=100)
    p.add_argument("--overload-fast", type=int, default=10)
    p.add_argument("--overload-rate", type=int, default=300)
    p.add_argument("--overload-size", type=int, default=4096)
    p.add_argument("--overload-duration", type=int, default=20)
    p.add_argument("--out", default=str(BENCH / "results/latest.json"))
    opts = p.parse_args()
    peers = opts.peers.split(",")
    tests = opts.tests.split(",")
    unknown = [t for t in tests if t not in TESTS]
    if unknown:
        p.error(f"unknown tests {unknown}; known: {', '.join(TESTS)}")
    # What was measured, kept with the numbers so `run.sh --report-only` can name it later.
    results = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "options": vars(opts),
               "command": os.environ.get("BENCH_COMMAND"),
               "revision": os.environ.get("BENCH_REV"), "runs": []}
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every measurement, so an interrupted run still has its numbers
        results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        out.write_text(json.dumps(results, indent=1))

    for test in tests:
        for rnd in range(1, opts.rounds + 1):
            for peer, engine, extra in cases(test, peers, opts):
                label = " ".join(str(x) for x in (test, peer, engine, extra) if x)
                print(f"[round {rnd}] {label}", file=sys.stderr, flush=True)
                started = time.monotonic()
                server = None
                try:
                    if test == "floor":
                        res = test_floor(opts)
                    else:
                        server = Server(peer, engine, CONFIGS.get(test))
                        res = (TESTS[test](server, opts, extra) if extra
                               else TESTS[test](server, opts))
                except Exception as e:  # one failing peer does not stop the others
                    res = {"error": str(e)[:500]}
                finally:
                    if server:
                        server.stop()
                res["elapsed_s"] = round(time.monotonic() - started, 1)
                print(f"    {json.dumps(res)}", file=sys.stderr, flush=True)
                results["runs"].append({"test": test, "round": rnd, "peer": peer,
                                        "result": res})
                save()
    save()
    print(opts.out)


if __name__ == "__main__":
    main()
