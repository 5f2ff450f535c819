#!/usr/bin/env python3
"""Measurement driver behind bench/run.sh (run.sh builds and installs; this runs and reports).

For each test, every server runs in rotation (Plexus, then each peer), in interleaved rounds;
each measurement starts a fresh server pinned to core 0 and the load generator
(`target/release/plexus bench ...`) pinned to core 1. Server CPU is utime+stime from
/proc/PID/stat, sampled every 50 ms and read over the measured window only (see `windowed`);
RSS comes from the bench's own `--server-pid` report (/proc/PID/status VmRSS).
Raw results go to bench/results/*.json; docs/benchmarks.md is written by `report`.
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


def server_command(name, port, data_dir):
    listen = f"127.0.0.1:{port}"
    if name == "plexus":
        return [str(PLEXUS), "serve", "--memory", "--tcp-echo", "off", "--tcp-chat", "off",
                "--listen", listen, "--data-dir", data_dir]
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
    def __init__(self, name):
        self.name = name
        self.port = free_port()
        self.data_dir = tempfile.mkdtemp(prefix="plexus-bench-")
        self.log = open(Path(self.data_dir) / "server.log", "w")
        cmd = ["taskset", "-c", SERVER_CORE] + server_command(name, self.port, self.data_dir)
        # taskset execs the server, so the pid is the server's own.
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited: see {self.log.name}")
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


def run_bench(args, pid=None, progress_re=None, limit_s=600):
    """Runs `plexus bench ARGS --json` on the load core. With `pid`, samples the server's CPU
    every 50 ms and returns the stderr progress lines (receipt time, match groups)."""
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
            lines.extend((now, l.decode(errors="replace")) for l in done if l.strip())
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


def test_conns(server, opts):
    report, _, _ = run_bench(["conns", server.url("/chat/idle"), "--count", str(opts.conns),
                              "--duration", f"{opts.hold}s", "--server-pid", str(server.pid),
                              "-q"])
    rss = report.get("server_rss_kib") or {}
    return {"kib_per_conn": rss.get("per_connection_kib"), "held": report.get("held"),
            "failed": report.get("failed"), "rss_before_kib": rss.get("before"),
            "rss_after_kib": rss.get("after"), "failures": report.get("failures")}


def test_fanout(server, opts):
    report, samples, lines = run_bench(
        ["fanout", server.url("/chat/bench"), "--subscribers", str(opts.subscribers),
         "--rate", str(opts.rate), "--duration", f"{opts.duration}s"], pid=server.pid)
    points = []
    for t, line in lines:
        m = FANOUT_RE.search(line)
        if m and m.group(3) == "publishing" and int(m.group(1)) > 0:
            points.append((t, int(m.group(2))))
    us, window = windowed(samples, points)
    lat = report.get("latency_us") or {}
    return {"us_per_delivery": us, "window": window, "p50_us": lat.get("p50_us"),
            "p99_us": lat.get("p99_us"), "deliveries": report.get("deliveries"),
            "expected": report.get("expected_deliveries"), "lost": report.get("lost"),
            "ready": report.get("ready"), "dropped": report.get("dropped"),
            "deliveries_per_s": report.get("deliveries_per_s")}


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
    return out


TESTS = {"conns": test_conns, "fanout": test_fanout, "echo": test_echo}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--peers", default="plexus,node-ws,fastapi,axum-default,axum-tuned")
    p.add_argument("--tests", default="conns,fanout,echo,floor")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--conns", type=int, default=19000)
    p.add_argument("--hold", type=int, default=10)
    p.add_argument("--subscribers", type=int, default=1000)
    p.add_argument("--rate", type=int, default=50)
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--out", default=str(BENCH / "results/latest.json"))
    opts = p.parse_args()
    peers = opts.peers.split(",")
    tests = opts.tests.split(",")
    results = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "options": vars(opts),
               "runs": []}
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every measurement, so an interrupted run still has its numbers
        results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        out.write_text(json.dumps(results, indent=1))

    for test in tests:
        for rnd in range(1, opts.rounds + 1):
            if test == "floor":
                print(f"[round {rnd}] floor", file=sys.stderr, flush=True)
                results["runs"].append({"test": "floor", "round": rnd, "peer": "floor",
                                        "result": test_floor(opts)})
                save()
                continue
            for peer in peers:
                print(f"[round {rnd}] {test} {peer}", file=sys.stderr, flush=True)
                server = None
                try:
                    server = Server(peer)
                    res = TESTS[test](server, opts)
                except Exception as e:  # one failing peer does not stop the others
                    res = {"error": str(e)[:500]}
                finally:
                    if server:
                        server.stop()
                print(f"    {json.dumps(res)}", file=sys.stderr, flush=True)
                results["runs"].append({"test": test, "round": rnd, "peer": peer,
                                        "result": res})
                save()
    save()
    print(opts.out)


if __name__ == "__main__":
    main()
