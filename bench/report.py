#!/usr/bin/env python3
"""Writes docs/benchmarks.md from a bench/results/*.json file (see bench/harness.py).

One section per target of issue 6, each with Plexus against the peers that took the same test
and the verdict: met, or the gap. A test that was not run shows as `n/m` (not measured).
"""

import json
import os
import platform
import statistics
import sys
from pathlib import Path

PEERS = ["plexus", "node-ws", "fastapi", "axum-default", "axum-tuned"]
LABEL = {"plexus": "Plexus", "node-ws": "Node ws", "fastapi": "FastAPI + uvicorn",
         "axum-default": "axum + broadcast (default)",
         "axum-tuned": "axum + broadcast (4 KiB read buf, TCP_NODELAY)"}
ROOT = Path(__file__).resolve().parent.parent
# Target 8: "responsive" means every probe answered, the slowest within this.
PROBE_LIMIT_MS = 1000
# Target 8: the server's queue for a slow connection (outbox_limit, 1 MiB by default).
OUTBOX_LIMIT_MIB = 1.0
# Target 8: RSS growth allowed beside the slow subscribers' queues.
RSS_SLACK_MIB = 64


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=1):
    return "n/m" if v is None else f"{v:,.{digits}f}"


def ms(us, digits=2):
    return fmt(None if us is None else us / 1000, digits)


def msv(us):
    return None if us is None else us / 1000


def ratio(a, b):
    return None if a is None or not b else a / b


def verdict(value, limit, unit="", higher=False, digits=2):
    """'**met**', or '**not met**' with the gap; 'not measured' without a value."""
    if value is None or limit is None:
        return "not measured"
    if (value >= limit) if higher else (value <= limit):
        return "**met**"
    gap = abs(value - limit)
    word = "short" if higher else "over"
    return (f"**not met**: {gap:,.{digits}f}{unit} {word} "
            f"({value / limit:,.2f} × the limit)" if limit else "**not met**")


def machine():
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} cores ({cpu}), Linux {platform.release()}"


class Runs:
    """The runs of a results file, as medians over rounds."""

    def __init__(self, runs):
        self.runs = runs

    def ok(self, test, peer, **where):
        return [r["result"] for r in self.runs
                if r["test"] == test and r["peer"] == peer and "error" not in r["result"]
                and all(r["result"].get(k) == v for k, v in where.items())]

    def get(self, test, peer, key, **where):
        """Median of `key` (a dotted path) over rounds."""
        def dig(res):
            for part in key.split("."):
                res = res.get(part) if isinstance(res, dict) else None
            return res
        return median([dig(res) for res in self.ok(test, peer, **where)])

    def errors(self):
        return [(r["test"], r["peer"], r["result"]["error"]) for r in self.runs
                if "error" in r["result"]]

    def rounds(self, test):
        return len({r["round"] for r in self.runs if r["test"] == test})

    def peers(self, test=None):
        return [p for p in PEERS if any(r["peer"] == p and (test is None or r["test"] == test)
                                        for r in self.runs)]


def main():
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    data = json.loads(src.read_text())
    opts = data["options"]
    R = Runs(data["runs"])
    peers = R.peers()
    others = [p for p in peers if p != "plexus"]
    axums = [p for p in peers if p.startswith("axum")]
    tests = ["conns", "conns-native", "fanout", "fanout-wide", "fanout-load", "fanout-native",
             "echo", "idle", "publish", "overload", "floor"]

    floor_runs = [r["result"] for r in data["runs"]
                  if r["test"] == "floor" and "error" not in r["result"]]
    floor1 = median([f["frames_1"]["us_per_write"] for f in floor_runs])
    floor8w = median([f["frames_8"]["us_per_write"] for f in floor_runs])
    floor8 = median([f["frames_8"]["us_per_frame"] for f in floor_runs])
    floor_wide = median([f["wide"]["us_per_write"] for f in floor_runs if "wide" in f])
    floor_wide_conns = max([f["wide"]["conns"] for f in floor_runs if "wide" in f], default=None)

    def best(test, key, among):
        vals = [(R.get(test, p, key), p) for p in among]
        vals = [(v, p) for v, p in vals if v is not None]
        return min(vals) if vals else (None, None)

    conns, subs, rate = opts["conns"], opts["subscribers"], opts["rate"]
    wide_subs, wide_rate = opts.get("wide_subscribers", 10000), opts.get("wide_rate", 5)
    load_rate = opts.get("load_rate", 500)
    idle_conns, idle_hold = opts.get("idle_conns", 10000), opts.get("idle_hold", 60)
    out = []
    w = out.append
    w("# Benchmarks: Plexus and its peers\n")
    w("Written by `bench/run.sh` (do not edit by hand; rerun it). Raw results: "
      f"`bench/results/{src.name}` (not committed).\n")
    w(f"- **Date:** {data['started']} to {data['finished']}")
    w(f"- **Machine:** {machine()}")
    command = data.get("command") or os.environ.get("BENCH_COMMAND") or "bench/run.sh"
    revision = data.get("revision") or os.environ.get("BENCH_REV") or "?"
    w(f"- **Command:** `{command.strip()}` (Plexus at `{revision}`)")
    w("- **Rounds:** " + ", ".join(f"{t} {R.rounds(t)}" for t in tests if R.rounds(t))
      + "; each cell is the median over rounds; servers run in rotation inside each round, "
      "each measurement on a fresh server process.")
    w("")

    w("## Method\n")
    w("Every server serves the same two raw WebSocket endpoints, `GET /echo` and "
      "`GET /chat/{room}`, so one client measures all of them: `plexus bench` "
      "(crates/plexus-bench). Plexus also takes the tests of its own protocol "
      "(`/connection/websocket`, a token minted with `plexus token`) and of its HTTP API. "
      "The server is pinned to core 0 (`taskset -c 0`), the load generator to core 1. Server "
      "CPU is utime+stime from `/proc/PID/stat`, sampled every 50 ms and taken only over the "
      "measured window (between the first and the last progress line of the publishing / "
      "round-trip / holding phase, so connecting and warm-up are excluded), divided by the "
      "deliveries, round trips or publishes counted in that window. RSS is `VmRSS` from "
      "`/proc/PID/status`. Plexus runs with `--memory` except where the durable engine is "
      "measured.\n")
    w(f"1. **Memory:** `plexus bench conns URL/chat/idle --count {conns} --duration "
      f"{opts['hold']}s --server-pid PID`: (RSS held − RSS before) / connections held. Native: "
      "the same on `/connection/websocket` with `--protocol native --token T --channel "
      "chat:idle` (each connection connected and subscribed).")
    w(f"2. **Fan-out:** `plexus bench fanout URL/chat/bench --subscribers {subs} --rate {rate} "
      f"--duration {opts['duration']}s` (64-byte messages): server CPU µs per delivery, and p99 "
      f"latency publisher → subscriber. The same at {wide_subs:,} × {wide_rate} msg/s and at "
      f"{subs:,} × {load_rate} msg/s; native: `--protocol native` on `/connection/websocket`, "
      "publisher and subscribers native (JSON pushes).")
    w(f"3. **Echo:** `plexus bench echo URL/echo --connections 10 --duration {opts['duration']}s`"
      " (one message in flight per connection): server CPU µs per round trip.")
    w(f"4. **Idle cost:** `plexus bench conns URL/chat/idle --count {idle_conns} --duration "
      f"{idle_hold}s`: server CPU over the hold (connections open, nothing sent but heartbeats) "
      "as % of one core.")
    w(f"5. **Durability:** `plexus bench publish URL --publishers N "
      f"--duration {opts['duration']}s`: acknowledged publishes/s into a channel with history "
      "(`chat:`), each publisher waiting for the acknowledgement of one publish before the next, "
      "through the native protocol (`publish` command and its reply) and through "
      "`POST /api/publish`; the server with `--memory`, then with the durable embedded engine "
      "(a publish is acknowledged once fsync'd; concurrent ones share a commit), at N = "
      f"{opts.get('publishers', 64)} publishers: with few in flight the durable throughput is "
      "bound by the commit's latency, with enough in flight by the server's CPU. The generator "
      "keeps polling while every publisher waits (on loopback the server's write would "
      "otherwise pay for waking it, as a remote client never costs a server; "
      "`--sleep-when-idle` measures that way).")
    w(f"6. **Past capacity:** `plexus bench overload URL/chat/slow --subscribers "
      f"{opts.get('overload_subscribers', 100)} --fast-subscribers "
      f"{opts.get('overload_fast', 10)} --rate {opts.get('overload_rate', 300)}/s --size "
      f"{opts.get('overload_size', 4096)} --duration {opts.get('overload_duration', 20)}s`: "
      "slow subscribers read a third of what is published (16 KiB socket receive buffer; the "
      "server's send buffer still grows to 4 MiB, so the backlog passes the kernel within "
      "seconds only with big messages), "
      "fast ones everything; every second a new WebSocket does one round trip on `/echo` "
      "and (Plexus) `GET /health`, `GET /metrics` and `POST /api/info` are timed, and the "
      "server's RSS is sampled. After publishing, slow subscribers read at full speed for up "
      "to 10 s, so that a cut subscriber reaches its close frame.")
    w(f"7. **Kernel floor:** `bench/floor` writes a 66-byte frame (a 64-byte message with its "
      f"2-byte header) to {subs} loopback TCP sockets, {rate} rounds/s "
      f"for {opts['duration']} s, readers on the other core; CPU of the writing thread per "
      "write(), for 1 frame per write and 8 frames per write. This is what the kernel charges "
      "for one delivery by itself, with no WebSocket or application work.\n")

    w("## Results\n")
    w(f"| server | KiB / idle conn ({conns:,}) | µs CPU / delivery | × floor | "
      "fan-out p99 ms | lost | µs CPU / echo round trip | echo round trips/s |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|")
    for p in peers:
        held = R.get("conns", p, "held")
        held = "" if held in (None, conns) else f" (held {int(held):,})"
        deliv = R.get("fanout", p, "us_per_delivery")
        w(f"| {LABEL[p]} | {fmt(R.get('conns', p, 'kib_per_conn'), 2)}{held} | "
          f"{fmt(deliv, 2)} | {fmt(ratio(deliv, floor1), 2)} | "
          f"{ms(R.get('fanout', p, 'p99_us'))} | {fmt(R.get('fanout', p, 'lost'), 0)} | "
          f"{fmt(R.get('echo', p, 'us_per_round_trip'), 2)} | "
          f"{fmt(R.get('echo', p, 'round_trips_per_s'), 0)} |")
    w(f"| kernel floor, 1 frame / write | | {fmt(floor1, 2)} | 1.00 | | | | |")
    w(f"| kernel floor, 8 frames / write | | {fmt(floor8, 2)} per frame "
      f"({fmt(floor8w, 2)} per write) | {fmt(ratio(floor8, floor1), 2)} | | | | |")
    w("\n`n/m`: not measured (test not run, or the server failed it; see below).\n")
    errs = R.errors()
    if errs:
        w("Failures during the run:\n")
        for t, p, e in errs:
            w(f"- {t} / {LABEL.get(p, p)}: `{e[:200]}`")
        w("")

    w("### Plexus against the best peer\n")
    w("| metric | Plexus | best peer | Plexus ÷ best |")
    w("|---|---:|---:|---:|")
    for test, key, name, digits in (
            ("conns", "kib_per_conn", "KiB / idle conn", 2),
            ("fanout", "us_per_delivery", "µs CPU / delivery", 2),
            ("fanout", "p99_us", "fan-out p99 µs", 0),
            ("echo", "us_per_round_trip", "µs CPU / echo round trip", 2),
            ("idle", "core_pct", "% of a core, idle connections", 3)):
        b, who = best(test, key, others)
        px = R.get(test, "plexus", key)
        w(f"| {name} | {fmt(px, digits)} | {fmt(b, digits)} ({LABEL.get(who, '-')}) | "
          f"{fmt(ratio(px, b), 2)} |")
    w("")

    # ---- Targets
    summary = []
    sections = []

    def section(title, lines):
        sections.append((title, lines))

    # 1. Memory
    raw_kib = R.get("conns", "plexus", "kib_per_conn")
    nat_kib = R.get("conns-native", "plexus", "kib_per_conn")
    at = "" if conns >= 19000 else f" (at {conns:,} only, not 19,000)"
    summary += [
        ("1. memory ≤ 2 KiB per idle WebSocket at 19,000, raw rooms",
         f"{fmt(raw_kib, 2)} KiB at {conns:,}", verdict(raw_kib, 2.0, " KiB") + at),
        ("1. memory ≤ 2 KiB per idle WebSocket at 19,000, native, one subscription each",
         f"{fmt(nat_kib, 2)} KiB at {conns:,}", verdict(nat_kib, 2.0, " KiB") + at)]
    lines = [f"| server | raw `/chat/idle` KiB / conn | native + 1 subscription KiB / conn |",
             "|---|---:|---:|"]
    for p in R.peers("conns") or R.peers("conns-native"):
        nat = R.get("conns-native", p, "kib_per_conn") if p == "plexus" else None
        lines.append(f"| {LABEL[p]} | {fmt(R.get('conns', p, 'kib_per_conn'), 2)} | "
                     f"{fmt(nat, 2) if p == 'plexus' else '—'} |")
    # The kernel's counters are system-wide: of the memory runs, the one where the sockets
    # opened match the connections held (two sockets each) is the one least disturbed.
    kernel = [(abs(r["kernel_per_conn"]["tcp_sockets"] / (2 * r["held"]) - 1), i, r)
              for i, r in enumerate(R.ok("conns", "plexus") + R.ok("conns-native", "plexus"))
              if r.get("kernel_per_conn") and r.get("held")]
    if kernel:
        k = min(kernel)[2]["kernel_per_conn"]
        lines.append(f"\nNot in RSS: the kernel's slab memory per socket (socket, inode, file, "
                     f"dentry, epoll entry) grew by {fmt(k.get('socket_bytes'), 0)} bytes, "
                     f"{fmt(k.get('slab_kib'), 2)} KiB of slab per connection in all (two "
                     f"sockets here: both ends are on this machine; {k.get('tcp_sockets'):,} TCP "
                     "sockets opened by the measurement, system-wide counters, so noisy when "
                     "other work runs). Idle sockets hold no buffer memory.")
    section(f"1. Memory per idle connection ({conns:,} connections)", lines)

    # 2. Fan-out cost at low rate
    px_deliv = R.get("fanout", "plexus", "us_per_delivery")
    ax_deliv, ax_who = best("fanout", "us_per_delivery", axums)
    nat_deliv = R.get("fanout-native", "plexus", "us_per_delivery")
    summary += [
        (f"2. fan-out CPU / delivery ≤ 1.2 × kernel floor ({subs:,} × {rate}, raw)",
         f"{fmt(ratio(px_deliv, floor1), 2)} × floor", verdict(ratio(px_deliv, floor1), 1.2)),
        ("2. fan-out CPU / delivery ≤ 0.75 × best axum (raw)",
         f"{fmt(ratio(px_deliv, ax_deliv), 2)} × {LABEL.get(ax_who, 'axum')}",
         verdict(ratio(px_deliv, ax_deliv), 0.75)),
        ("2. native (JSON pushes) ≤ 1.1 × raw rooms",
         f"{fmt(ratio(nat_deliv, px_deliv), 2)} × raw",
         verdict(ratio(nat_deliv, px_deliv), 1.1))]
    section(f"2. Fan-out cost at {subs:,} × {rate} msg/s", [
        "| | µs CPU / delivery | ratio | target |", "|---|---:|---:|---|",
        f"| Plexus, raw rooms | {fmt(px_deliv, 2)} | | |",
        f"| kernel floor, 1 frame / write | {fmt(floor1, 2)} | "
        f"Plexus {fmt(ratio(px_deliv, floor1), 2)} × | ≤ 1.2 × |",
        f"| best axum ({LABEL.get(ax_who, '-')}) | {fmt(ax_deliv, 2)} | "
        f"Plexus {fmt(ratio(px_deliv, ax_deliv), 2)} × | ≤ 0.75 × |",
        f"| Plexus, native protocol | {fmt(nat_deliv, 2)} | "
        f"{fmt(ratio(nat_deliv, px_deliv), 2)} × raw | ≤ 1.1 × |",
        "",
        f"Native fan-out: p99 {ms(R.get('fanout-native', 'plexus', 'p99_us'))} ms, lost "
        f"{fmt(R.get('fanout-native', 'plexus', 'lost'), 0)}."])

    # 3. Fan-out under load
    lines = [f"| server | deliveries/s (of {subs * load_rate:,}) | lost | sent / planned | "
             "p99 ms | max ms | µs CPU / delivery |", "|---|---:|---:|---:|---:|---:|---:|"]
    for p in R.peers("fanout-load"):
        g = lambda k: R.get("fanout-load", p, k)  # noqa: E731
        lines.append(f"| {LABEL[p]} | {fmt(g('deliveries_per_s'), 0)} | {fmt(g('lost'), 0)} | "
                     f"{fmt(g('sent'), 0)} / {fmt(g('planned'), 0)} | {ms(g('p99_us'))} | "
                     f"{ms(g('max_us'))} | {fmt(g('us_per_delivery'), 2)} |")
    lost = R.get("fanout-load", "plexus", "lost")
    sent, planned = (R.get("fanout-load", "plexus", k) for k in ("sent", "planned"))
    sustained = None if lost is None else (lost == 0 and sent == planned)
    summary += [
        (f"3. {subs:,} × {load_rate} msg/s sustained with no loss",
         f"lost {fmt(lost, 0)}, sent {fmt(sent, 0)} / {fmt(planned, 0)}",
         "not measured" if sustained is None else ("**met**" if sustained else "**not met**")),
        (f"3. p99 ≤ 50 ms at {subs:,} × {load_rate}",
         f"{ms(R.get('fanout-load', 'plexus', 'p99_us'))} ms",
         verdict(msv(R.get("fanout-load", "plexus", "p99_us")), 50, " ms")),
        (f"3. ≤ 1.5 µs server CPU per delivery at {subs:,} × {load_rate}",
         f"{fmt(R.get('fanout-load', 'plexus', 'us_per_delivery'), 2)} µs",
         verdict(R.get("fanout-load", "plexus", "us_per_delivery"), 1.5, " µs"))]
    section(f"3. Fan-out under load: {subs:,} × {load_rate} msg/s", lines)

    # 4. Latency
    lines = [f"| server | p99 ms at {subs:,} × {rate} | p99 ms at {wide_subs:,} × {wide_rate} | "
             f"lost at {wide_subs:,} | µs CPU / delivery at {wide_subs:,} |",
             "|---|---:|---:|---:|---:|"]
    for p in sorted(set(R.peers("fanout")) | set(R.peers("fanout-wide")), key=PEERS.index):
        lines.append(f"| {LABEL[p]} | {ms(R.get('fanout', p, 'p99_us'))} | "
                     f"{ms(R.get('fanout-wide', p, 'p99_us'))} | "
                     f"{fmt(R.get('fanout-wide', p, 'lost'), 0)} | "
                     f"{fmt(R.get('fanout-wide', p, 'us_per_delivery'), 2)} |")
    if floor_wide is not None:
        lines.append(f"| kernel floor, 1 frame / write to {floor_wide_conns:,} sockets | "
                     f"| ≥ {fmt(floor_wide * wide_subs / 1000 * 0.99, 1)} (99 % of "
                     f"{wide_subs:,} writes at {fmt(floor_wide, 2)} µs) | | "
                     f"{fmt(floor_wide, 2)} |")
    summary += [
        (f"4. p99 ≤ 6 ms at {subs:,} × {rate}", f"{ms(R.get('fanout', 'plexus', 'p99_us'))} ms",
         verdict(msv(R.get("fanout", "plexus", "p99_us")), 6, " ms")),
        (f"4. p99 ≤ 60 ms at {wide_subs:,} × {wide_rate}",
         f"{ms(R.get('fanout-wide', 'plexus', 'p99_us'))} ms",
         verdict(msv(R.get("fanout-wide", "plexus", "p99_us")), 60, " ms"))]
    section("4. Latency", lines)

    # 5. Echo
    px_echo = R.get("echo", "plexus", "us_per_round_trip")
    ax_echo, ax_echo_who = best("echo", "us_per_round_trip", axums)
    summary.append(("5. echo CPU / round trip ≤ 0.8 × best axum",
                    f"{fmt(ratio(px_echo, ax_echo), 2)} × {LABEL.get(ax_echo_who, 'axum')}",
                    verdict(ratio(px_echo, ax_echo), 0.8)))
    section("5. Echo", [f"Plexus {fmt(px_echo, 2)} µs per round trip; best axum "
                        f"({LABEL.get(ax_echo_who, '-')}) {fmt(ax_echo, 2)} µs: "
                        f"{fmt(ratio(px_echo, ax_echo), 2)} ×, target ≤ 0.8 ×."])

    # 6. Idle cost
    lines = [f"| server | % of one core ({idle_conns:,} idle, {idle_hold} s) | server CPU s | "
             "KiB / conn |", "|---|---:|---:|---:|"]
    for p in R.peers("idle"):
        lines.append(f"| {LABEL[p]} | {fmt(R.get('idle', p, 'core_pct'), 3)} | "
                     f"{fmt(R.get('idle', p, 'window.server_cpu_s'), 3)} | "
                     f"{fmt(R.get('idle', p, 'kib_per_conn'), 2)} |")
    lines.append("\nPlexus pings every 25 s; a server that sends no heartbeats spends ~0 here, "
                 "which says nothing about finding dead peers.")
    px_idle = R.get("idle", "plexus", "core_pct")
    # The target is for 10,000 connections; the cost is per connection, so a run with another
    # count is scaled to 10,000 (and says so).
    at_10k = None if px_idle is None else px_idle * 10_000 / idle_conns
    caveats = ("" if idle_conns == 10_000 else f"; scaled from {idle_conns:,}") + (
        "" if idle_hold >= 50 else "; shorter than two heartbeat cycles")
    summary.append(("6. idle cost of 10,000 connections ≤ 0.5 % of one core",
                    f"{fmt(at_10k, 3)} % over {idle_hold} s{caveats}",
                    verdict(at_10k, 0.5, " %", digits=3)))
    section("6. Idle cost", lines)

    # 7. Durability
    lines = ["| path | publishers | memory: publishes/s | embedded (fsync'd): publishes/s | "
             "embedded ÷ memory | p99 ms memory / embedded | µs CPU / publish memory / embedded "
             "| CPU: memory ÷ embedded |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    counts = sorted({r["result"].get("publishers") for r in data["runs"]
                     if r["test"] == "publish" and "error" not in r["result"]} - {None})

    def paired(via, n, key, invert=False):
        """Median over rounds of each round's embedded ÷ memory (memory ÷ embedded when
        `invert`): the two runs of a round are back to back, so the machine's drift between
        rounds cancels out."""
        by_round = {}
        for run in data["runs"]:
            res = run["result"]
            if (run["test"] == "publish" and "error" not in res and res.get("via") == via
                    and res.get("publishers") == n and res.get(key)):
                by_round.setdefault(run["round"], {})[res.get("engine")] = res[key]
        ratios = [(v["memory"] / v["embedded"]) if invert else (v["embedded"] / v["memory"])
                  for v in by_round.values() if "memory" in v and "embedded" in v]
        return median(ratios) if ratios else None

    for via, name in (("native", "native protocol"), ("api", "HTTP API")):
        for n in counts:
            g = lambda engine, k: R.get("publish", "plexus", k, engine=engine, via=via,  # noqa
                                        publishers=n)
            mem, emb = g("memory", "publishes_per_s"), g("embedded", "publishes_per_s")
            thr = paired(via, n, "publishes_per_s")
            cpu = paired(via, n, "us_per_publish", invert=True)
            lines.append(f"| {name} | {n} | {fmt(mem, 0)} | {fmt(emb, 0)} | "
                         f"{fmt(thr, 2)} | "
                         f"{ms(g('memory', 'p99_us'))} / {ms(g('embedded', 'p99_us'))} | "
                         f"{fmt(g('memory', 'us_per_publish'), 1)} / "
                         f"{fmt(g('embedded', 'us_per_publish'), 1)} | {fmt(cpu, 2)} |")
            summary.append((f"7. durable publishes ≥ 80 % of memory's, {name}, {n} publishers",
                            f"{fmt(thr, 2)} × ({fmt(emb, 0)} / {fmt(mem, 0)} per s; "
                            f"CPU per publish {fmt(cpu, 2)} ×)",
                            verdict(thr, 0.8, higher=True)))
    filesystems = {r["result"].get("data_fs") for r in data["runs"]
                   if r["test"] == "publish" and "error" not in r["result"]} - {None}
    lines.append("\nembedded ÷ memory is the median over rounds of each round's ratio (the two "
                 "runs of a round are back to back). CPU: memory ÷ embedded is the same for the "
                 "server's CPU per publish: the share of the memory engine's capacity the durable "
                 "one keeps when the server's core is the bound (the load generator, on the "
                 "other core, does about as much work per publish as the server, so with the "
                 "memory engine both cores are busy: see bench/NOTES.md).")
    if filesystems:
        lines.append(f"\nData directory on {', '.join(sorted(filesystems))}"
                     + (" (tmpfs: fsync costs nothing there; this does not measure durability)"
                        if "tmpfs" in filesystems else "") + ".")
    section("7. Durability's price", lines)

    # 8. Past capacity
    lines = ["| server | slow: cut with 3008 | slow: ended otherwise / open at end | "
             "slow: messages lost | fast: lost / ended | probes ok | slowest probe ms | "
             "RSS MiB before / max / end |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    px_overload = None
    for p in R.peers("overload"):
        res = R.ok("overload", p)
        if not res:
            continue
        o = res[len(res) // 2]  # one run, not a median of mixed fields
        slow, fast = o["slow"], o["fast"]
        attempts = sum(pr["attempts"] for pr in o["probes"])
        ok = sum(pr["ok"] for pr in o["probes"])
        slowest = max((pr["max_us"] for pr in o["probes"]), default=None)
        mib = lambda k: None if o.get(k) is None else o[k] / 1024  # noqa: E731
        lines.append(
            f"| {LABEL[p]} | {slow['closed_slow']} / {slow['connected']} | "
            f"{slow['closed_other']} / {slow['open_at_end']} | {fmt(slow.get('lost'), 0)} | "
            f"{fast['lost']} / "
            f"{(fast['closed_slow'] or 0) + (fast['closed_other'] or 0)} | {ok} / {attempts} | "
            f"{ms(slowest, 1)} | {fmt(mib('rss_before_kib'), 0)} / {fmt(mib('rss_max_kib'), 0)}"
            f" / {fmt(mib('rss_end_kib'), 0)} |")
        if p == "plexus":
            px_overload = (o, ok, attempts, slowest)
    if px_overload:
        o, ok, attempts, slowest = px_overload
        slow = o["slow"]
        growth = (o["rss_max_kib"] - o["rss_before_kib"]) / 1024 if o.get("rss_max_kib") else None
        bound = slow["connected"] * OUTBOX_LIMIT_MIB + RSS_SLACK_MIB
        cut_all = slow["connected"] > 0 and slow["closed_slow"] == slow["connected"]
        responsive = attempts > 0 and ok == attempts and slowest is not None \
            and slowest <= PROBE_LIMIT_MS * 1000
        summary += [
            ("8. slow subscribers cut with 3008",
             f"{slow['closed_slow']} of {slow['connected']}",
             "**met**" if cut_all else "**not met**"),
            ("8. server responsive (new WebSocket, /health, /metrics, /api/info)",
             f"{ok} / {attempts} probes ok, slowest {ms(slowest, 1)} ms",
             "**met**" if responsive else
             f"**not met** (every probe must answer within {PROBE_LIMIT_MS} ms)"),
            ("8. memory bounded",
             f"RSS +{fmt(growth, 0)} MiB at most (bound {bound:,.0f} MiB: slow × outbox_limit"
             f" + {RSS_SLACK_MIB})", verdict(growth, bound, " MiB", digits=0))]
    else:
        summary += [("8. past capacity: 3008 cuts, responsive, memory bounded", "n/m",
                     "not measured")]
    lines.append(f"\nPublisher {opts.get('overload_rate', 300)} msg/s of "
                 f"{opts.get('overload_size', 4096)} bytes; slow subscribers read a third of that."
                 " 'Responsive': every probe answered, the slowest within "
                 f"{PROBE_LIMIT_MS} ms. 'Bounded': RSS growth ≤ slow subscribers × "
                 f"{OUTBOX_LIMIT_MIB:g} MiB (outbox_limit) + {RSS_SLACK_MIB} MiB. A server "
                 "without a per-connection bound shows it as RSS growth; one that drops what a "
                 "laggard cannot take, without closing it, as slow subscribers still open with "
                 "messages lost; one that slows everyone down, as loss and delay for the fast "
                 "subscribers.")
    section("8. Past capacity", lines)

    # 9. Capacity model
    capacity = ROOT / "docs/capacity.md"
    summary.append(("9. docs/capacity.md: a capacity model",
                    "docs/capacity.md" if capacity.exists() else "missing",
                    "**written**" if capacity.exists() else "**not met**"))

    w("## Targets (issue 6)\n")
    w("| target | measured | verdict |")
    w("|---|---|---|")
    for r in summary:
        w(f"| {r[0]} | {r[1]} | {r[2]} |")
    w("")
    for title, lines in sections:
        w(f"### {title}\n")
        for line in lines:
            w(line)
        w("")
    notes = Path(__file__).with_name("NOTES.md")
    if notes.exists():
        w(notes.read_text().strip())
        w("")
    dst.write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
