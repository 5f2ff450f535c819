#!/usr/bin/env python3
"""Writes docs/benchmarks.md from a bench/results/*.json file (see bench/harness.py)."""

import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

PEERS = ["plexus", "node-ws", "fastapi", "axum-default", "axum-tuned"]
LABEL = {"plexus": "Plexus", "node-ws": "Node ws", "fastapi": "FastAPI + uvicorn",
         "axum-default": "axum + broadcast (default)",
         "axum-tuned": "axum + broadcast (4 KiB read buf, TCP_NODELAY)"}


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=1):
    return "n/m" if v is None else f"{v:,.{digits}f}"


def ratio(a, b):
    return None if a is None or not b else a / b


def machine():
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} cores ({cpu}), Linux {platform.release()}"


def main():
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    data = json.loads(src.read_text())
    opts = data["options"]
    runs = data["runs"]

    def cells(test, peer, key):
        return [r["result"].get(key) for r in runs
                if r["test"] == test and r["peer"] == peer and "error" not in r["result"]]

    def errors(test, peer):
        return [r["result"]["error"] for r in runs
                if r["test"] == test and r["peer"] == peer and "error" in r["result"]]

    peers = [p for p in PEERS if any(r["peer"] == p for r in runs)]
    m = {}
    for p in peers:
        m[p] = {
            "kib": median(cells("conns", p, "kib_per_conn")),
            "held": median(cells("conns", p, "held")),
            "deliv": median(cells("fanout", p, "us_per_delivery")),
            "p99": median(cells("fanout", p, "p99_us")),
            "lost": median(cells("fanout", p, "lost")),
            "dps": median(cells("fanout", p, "deliveries_per_s")),
            "echo": median(cells("echo", p, "us_per_round_trip")),
            "rtps": median(cells("echo", p, "round_trips_per_s")),
            "echo_p99": median(cells("echo", p, "p99_us")),
        }
    floor_runs = [r["result"] for r in runs if r["test"] == "floor"]
    floor1 = median([f["frames_1"]["us_per_write"] for f in floor_runs])
    floor8w = median([f["frames_8"]["us_per_write"] for f in floor_runs])
    floor8 = median([f["frames_8"]["us_per_frame"] for f in floor_runs])
    rounds = {k: len({r["round"] for r in runs if r["test"] == k}) for k in
              ("conns", "fanout", "echo", "floor")}

    def best(key, among):
        vals = [(m[p][key], p) for p in among if p in m and m[p][key] is not None]
        return min(vals) if vals else (None, None)

    others = [p for p in peers if p != "plexus"]
    axums = [p for p in peers if p.startswith("axum")]
    out = []
    w = out.append
    w("# Benchmarks: Plexus and its peers\n")
    w("Written by `bench/run.sh` (do not edit by hand; rerun it). Raw results: "
      f"`bench/results/{src.name}` (not committed).\n")
    w(f"- **Date:** {data['started']} to {data['finished']}")
    w(f"- **Machine:** {machine()}")
    w(f"- **Command:** `{os.environ.get('BENCH_COMMAND', 'bench/run.sh')}` "
      f"(Plexus at `{os.environ.get('BENCH_REV', '?')}`)")
    w(f"- **Rounds:** {', '.join(f'{k} {v}' for k, v in rounds.items() if v)}; each cell is "
      "the median over rounds; servers run in rotation inside each round, each measurement on a "
      "fresh server process.")
    w("")
    w("## Method\n")
    w("Every server serves the same two raw WebSocket endpoints, `GET /echo` and "
      "`GET /chat/{room}`, so one client measures all of them: `plexus bench` "
      "(crates/plexus-bench). The server is pinned to core 0 (`taskset -c 0`), the load "
      "generator to core 1. Server CPU is utime+stime from `/proc/PID/stat`, sampled every "
      "50 ms and taken only over the measured window (between the first and the last progress "
      "line of the publishing / round-trip phase, so connecting and warm-up are excluded), "
      "divided by the deliveries or round trips counted in that window. RSS is `VmRSS` from "
      "`/proc/PID/status`, before and while holding the idle connections.\n")
    w(f"1. **Memory:** `plexus bench conns URL/chat/idle --count {opts['conns']} "
      f"--duration {opts['hold']}s --server-pid PID`: (RSS held − RSS before) / connections held.")
    w(f"2. **Fan-out:** `plexus bench fanout URL/chat/bench --subscribers {opts['subscribers']} "
      f"--rate {opts['rate']} --duration {opts['duration']}s` (64-byte messages): server CPU µs "
      "per delivery, and p99 latency publisher → subscriber.")
    w(f"3. **Echo:** `plexus bench echo URL/echo --connections 10 --duration {opts['duration']}s`"
      " (one message in flight per connection): server CPU µs per round trip.")
    w(f"4. **Kernel floor:** `bench/floor` writes a 66-byte frame (a 64-byte message with its "
      f"2-byte header) to {opts['subscribers']} loopback TCP sockets, {opts['rate']} rounds/s "
      f"for {opts['duration']} s, readers on the other core; CPU of the writing thread per "
      "write(), for 1 frame per write and 8 frames per write. This is what the kernel charges "
      "for one delivery by itself, with no WebSocket or application work.\n")
    w("## Results\n")
    w(f"| server | KiB / idle conn ({opts['conns']:,}) | µs CPU / delivery | × floor | "
      "fan-out p99 ms | lost | µs CPU / echo round trip | echo round trips/s |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|")
    for p in peers:
        x = m[p]
        held = "" if x["held"] in (None, opts["conns"]) else f" (held {int(x['held']):,})"
        w(f"| {LABEL[p]} | {fmt(x['kib'], 2)}{held} | {fmt(x['deliv'], 2)} | "
          f"{fmt(ratio(x['deliv'], floor1), 2)} | "
          f"{fmt(None if x['p99'] is None else x['p99'] / 1000, 2)} | "
          f"{fmt(x['lost'], 0)} | {fmt(x['echo'], 2)} | {fmt(x['rtps'], 0)} |")
    w(f"| kernel floor, 1 frame / write | | {fmt(floor1, 2)} | 1.00 | | | | |")
    w(f"| kernel floor, 8 frames / write | | {fmt(floor8, 2)} per frame "
      f"({fmt(floor8w, 2)} per write) | {fmt(ratio(floor8, floor1), 2)} | | | | |")
    w("\n`n/m`: not measured (test not run, or the server failed it; see below).\n")
    errs = [(t, p, e) for t in ("conns", "fanout", "echo") for p in peers for e in errors(t, p)]
    if errs:
        w("Failures during the run:\n")
        for t, p, e in errs:
            w(f"- {t} / {LABEL[p]}: `{e[:200]}`")
        w("")

    w("### Plexus against the best peer\n")
    w("| metric | Plexus | best peer | Plexus ÷ best |")
    w("|---|---:|---:|---:|")
    for key, name, digits in (("kib", "KiB / idle conn", 2), ("deliv", "µs CPU / delivery", 2),
                              ("p99", "fan-out p99 µs", 0), ("echo", "µs CPU / echo round trip", 2)):
        b, who = best(key, others)
        px = m.get("plexus", {}).get(key)
        w(f"| {name} | {fmt(px, digits)} | {fmt(b, digits)} ({LABEL.get(who, '-')}) | "
          f"{fmt(ratio(px, b), 2)} |")
    w("")

    w("## Targets (issue 6)\n")
    px = m.get("plexus", {})
    ax_deliv, ax_who = best("deliv", axums)
    ax_echo, ax_echo_who = best("echo", axums)

    def verdict(value, limit):
        if value is None or limit is None:
            return "not measured"
        return "**met**" if value <= limit else "**not met**"

    rows = [
        ("memory ≤ 2 KiB per idle WebSocket at 19,000 (raw rooms)",
         f"{fmt(px.get('kib'), 2)} KiB at {opts['conns']:,}",
         verdict(px.get("kib"), 2.0) + ("" if opts["conns"] >= 19000 else
                                        f" (at {opts['conns']:,} only, not 19,000)")),
        ("memory ≤ 2 KiB per idle WebSocket (native protocol)", "n/m", "not measured yet"),
        ("fan-out CPU / delivery ≤ 1.2 × kernel floor",
         f"{fmt(ratio(px.get('deliv'), floor1), 2)} × floor",
         verdict(ratio(px.get("deliv"), floor1), 1.2)),
        ("fan-out CPU / delivery ≤ 0.75 × best axum baseline",
         f"{fmt(ratio(px.get('deliv'), ax_deliv), 2)} × {LABEL.get(ax_who, 'axum')}",
         verdict(ratio(px.get("deliv"), ax_deliv), 0.75)),
        ("fan-out p99 ≤ 6 ms at 1,000 × 50 msg/s",
         f"{fmt(None if px.get('p99') is None else px['p99'] / 1000, 2)} ms",
         verdict(px.get("p99"), 6000)),
        ("echo CPU / round trip ≤ 0.8 × best axum baseline",
         f"{fmt(ratio(px.get('echo'), ax_echo), 2)} × {LABEL.get(ax_echo_who, 'axum')}",
         verdict(ratio(px.get("echo"), ax_echo), 0.8)),
    ]
    w("| target | measured | verdict |")
    w("|---|---|---|")
    for r in rows:
        w(f"| {r[0]} | {r[1]} | {r[2]} |")
    w("")
    notes = Path(__file__).with_name("NOTES.md")
    if notes.exists():
        w(notes.read_text().strip())
        w("")
    dst.write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
