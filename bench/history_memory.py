#!/usr/bin/env python3
"""What retained history costs: server RSS and disk per retained entry.

Starts `target/release/plexus serve` on a fresh data directory (embedded engine, or the memory
engine with --memory), publishes --entries messages of a 64-byte JSON payload to each of
--channels `chat:` channels through the HTTP API (8 keep-alive connections), and reports the
RSS growth per publish. After a clean stop (which takes a checkpoint), it reports the size of
history.redb and history.wal per publish. With the default `chat:` retention (100 per channel)
and --entries 100, every publish is retained.

Usage: bench/history_memory.py [--channels 1000] [--entries 100] [--memory]
Used for docs/capacity.md ("What history and durability cost"). Loopback only, bounded.
"""
import argparse
import http.client
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PORT = 9311
CONNECTIONS = 8


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def publish(first, channels, entries):
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=30)
    headers = {"Authorization": "apikey k", "Content-Type": "application/json"}
    for ch in range(first, channels, CONNECTIONS):
        for _ in range(entries):
            body = json.dumps({"channel": f"chat:h{ch}", "data": {"m": "x" * 52}})
            conn.request("POST", "/api/publish", body, headers)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"publish failed: HTTP {response.status}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--channels", type=int, default=1000)
    p.add_argument("--entries", type=int, default=100)
    p.add_argument("--memory", action="store_true", help="the memory engine instead")
    opts = p.parse_args()
    data = tempfile.mkdtemp(prefix="plexus-history-")
    command = [str(ROOT / "target/release/plexus"), "serve", "--tcp-echo", "off",
               "--tcp-chat", "off", "--listen", f"127.0.0.1:{PORT}", "--data-dir", data,
               "--api-key", "k", "--token-hmac-secret", "s"] + (["--memory"] if opts.memory else [])
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.5)
        before = rss_kib(server.pid)
        started = time.time()
        threads = [threading.Thread(target=publish, args=(k, opts.channels, opts.entries))
                   for k in range(CONNECTIONS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.time() - started
        time.sleep(1)
        after = rss_kib(server.pid)
        total = opts.channels * opts.entries
        engine = "memory" if opts.memory else "embedded"
        print(f"{engine}: {opts.channels} channels x {opts.entries} publishes: RSS {before} -> "
              f"{after} KiB, {(after - before) * 1024 / total:.0f} B per publish "
              f"({total / elapsed:.0f} publishes/s)")
    finally:
        server.terminate()
        server.wait(30)
    for name in ("history.redb", "history.wal"):
        path = Path(data) / name
        if path.exists():
            size = path.stat().st_size
            print(f"  {name}: {size / 1024:.0f} KiB, {size / total:.0f} B per publish")
    shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
