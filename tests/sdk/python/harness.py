"""Shared pieces of the Python SDK tests: a Plexus server in a child process, tokens, the
server HTTP API, a TCP relay that can hold a client's reconnects back, and event recorders.

Each test writes what it saw (server output, and the SDK's own debug log, which has every frame
sent and received) to tests/sdk/.logs/python/<test>.log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import httpx
import jwt

from centrifuge import ClientEventHandler, SubscriptionEventHandler

HERE = Path(__file__).resolve().parent
SDK_DIR = HERE.parent
REPO_ROOT = SDK_DIR.parent.parent
LOG_DIR = SDK_DIR / ".logs" / "python"

PLEXUS_BIN = Path(os.environ["PLEXUS_BIN"]).resolve() if os.environ.get("PLEXUS_BIN") \
    else REPO_ROOT / "target" / "debug" / "plexus"
SECRET = "sdk-test-secret-0123456789abcdef"
API_KEY = "sdk-test-api-key"


def free_port() -> int:
    """A port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def room(prefix: str = "room") -> str:
    """A unique channel in the `chat` namespace."""
    return f"chat:{prefix}-{uuid.uuid4().hex[:10]}"


def token(sub: str, *, exp: Optional[int] = None, channels: Optional[list] = None,
          info: Any = None, secret: str = SECRET) -> str:
    """An HS256 connection token."""
    claims: dict = {"sub": sub}
    if exp is not None:
        claims["exp"] = exp
    if channels is not None:
        claims["channels"] = channels
    if info is not None:
        claims["info"] = info
    return jwt.encode(claims, secret, algorithm="HS256")


async def until(check: Callable[[], Any], what: str, timeout: float = 5.0) -> Any:
    """Waits until `check()` is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


class Recorder:
    """One test's log: lines from the server and the SDK, in arrival order."""

    def __init__(self, name: str) -> None:
        self.name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:120]
        self.start = time.monotonic()
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def add(self, source: str, text: str) -> None:
        ms = int((time.monotonic() - self.start) * 1000)
        with self._lock:
            for line in str(text).splitlines():
                if line:
                    self.lines.append(f"{ms:6d} {source} {line}")

    @property
    def path(self) -> Path:
        return LOG_DIR / f"{self.name}.log"

    def received(self) -> list:
        """Every JSON frame the SDK logged as received ("data received ..."), parsed. A message
        with several replies spans several log lines."""
        frames = []
        with self._lock:
            lines = list(self.lines)
        for line in lines:
            _, _, rest = line.strip().partition(" ")
            source, _, text = rest.partition(" ")
            if source != "sdk":
                continue
            if text.startswith("DEBUG data received "):
                text = text[len("DEBUG data received "):]
            elif not text.startswith("{"):
                continue
            try:
                frames.append(json.loads(text))
            except ValueError:
                pass
        return frames

    def save(self) -> None:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self.path.write_text("\n".join(self.lines) + "\n")


class _SdkLogHandler(logging.Handler):
    """Sends the centrifuge logger's records (frames included, at DEBUG) to a recorder."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__(logging.DEBUG)
        self.recorder = recorder

    def emit(self, record: logging.LogRecord) -> None:
        self.recorder.add("sdk", self.format(record))


def capture_sdk_log(recorder: Recorder) -> Callable[[], None]:
    """Records the SDK's debug log; returns the function that stops it."""
    logger = logging.getLogger("centrifuge")
    handler = _SdkLogHandler(recorder)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    previous = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)

    def stop() -> None:
        logger.removeHandler(handler)
        logger.setLevel(previous)

    return stop


class Server:
    """A `plexus serve` child process."""

    def __init__(self, recorder: Recorder, *, engine: str = "memory",
                 data_dir: Optional[str] = None, port: Optional[int] = None,
                 config: Optional[str] = None) -> None:
        if not PLEXUS_BIN.exists():
            raise RuntimeError(f"no server binary at {PLEXUS_BIN}; run `cargo build -p plexus` "
                               "or set PLEXUS_BIN")
        self.recorder = recorder
        self.owns_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="plexus-sdk-py-")
        self.port = port or free_port()
        self.http = f"http://127.0.0.1:{self.port}"
        self.ws = f"ws://127.0.0.1:{self.port}/connection/websocket"
        args = [str(PLEXUS_BIN), "serve", "--listen", f"127.0.0.1:{self.port}",
                "--tcp-echo", "off", "--tcp-chat", "off", "--token-hmac-secret", SECRET,
                "--api-key", API_KEY, "--engine", engine, "--data-dir", self.data_dir]
        if config is not None:  # TOML text, in a file in the data folder
            config_file = os.path.join(self.data_dir, "plexus.toml")
            with open(config_file, "w") as f:
                f.write(config)
            args += ["--config", config_file]
        recorder.add("server", "$ " + " ".join(args))
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        stdin=subprocess.DEVNULL)
        self.output: list[str] = []
        for stream, name in ((self.process.stdout, "server:out"), (self.process.stderr, "server:err")):
            threading.Thread(target=self._pump, args=(stream, name), daemon=True).start()

    def _pump(self, stream, name: str) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            self.output.append(line)
            self.recorder.add(name, line)

    async def wait_healthy(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient() as http:
            while True:
                if self.process.poll() is not None:
                    await asyncio.sleep(0.05)
                    raise RuntimeError(f"server exited ({self.process.returncode}) before it was "
                                       f"healthy: {' | '.join(self.output)}")
                try:
                    if (await http.get(f"{self.http}/health")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server not healthy within {timeout} s: {' | '.join(self.output)}")
                await asyncio.sleep(0.05)

    async def api(self, method: str, body: dict) -> dict:
        """POST /api/<method>; raises on a transport error, a non-200 or an `error` reply."""
        async with httpx.AsyncClient() as http:
            response = await http.post(f"{self.http}/api/{method}", json=body,
                                       headers={"X-API-Key": API_KEY})
        text = response.text.strip()
        self.recorder.add("api", f"POST /api/{method} {body} -> {response.status_code} {text}")
        if response.status_code == 404:
            raise AssertionError(f"the server has no HTTP API /api/{method} (404: {text})")
        assert response.status_code == 200, f"/api/{method} answered {response.status_code}: {text}"
        reply = response.json()
        assert "error" not in reply, f"/api/{method} error: {reply}"
        return reply

    async def publish(self, channel: str, data: Any) -> dict:
        """Publishes through the API; returns `result` ({offset, epoch})."""
        return (await self.api("publish", {"channel": channel, "data": data}))["result"]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        self.recorder.add("server", f"exited: {self.process.returncode}")

    def cleanup(self) -> None:
        self.kill()
        if self.owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)


class Relay:
    """A TCP relay in front of the server. While `held`, it closes new connections at once, so
    a client's reconnect attempts fail and it backs off; connections already open go on."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.held = False
        self._server: Optional[asyncio.base_events.Server] = None
        self._tasks: set[asyncio.Task] = set()
        self.port = 0

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/connection/websocket"

    async def start(self) -> "Relay":
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.held:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        for task in (asyncio.create_task(pipe(reader, up_writer)),
                     asyncio.create_task(pipe(up_reader, writer))):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()


class Events(ClientEventHandler, SubscriptionEventHandler):
    """Records every client or subscription event as (name, context), in order."""

    def __init__(self, recorder: Recorder, label: str) -> None:
        self.recorder = recorder
        self.label = label
        self.seen: list[tuple[str, Any]] = []

    def _add(self, name: str, ctx: Any) -> None:
        self.seen.append((name, ctx))
        self.recorder.add(self.label, f"{name} {ctx}")

    def of(self, name: str) -> list:
        return [ctx for event, ctx in self.seen if event == name]

    async def next(self, name: str, after: int, what: str = "", timeout: float = 5.0,
                   accept: Callable[[Any], bool] = lambda ctx: True) -> Any:
        """The first `name` event at index `after` or later that passes `accept`."""
        def find():
            for event, ctx in self.seen[after:]:
                if event == name and accept(ctx):
                    return (ctx,)
            return None
        return (await until(find, what or f"{self.label} {name}", timeout))[0]

    async def on_connecting(self, ctx):
        self._add("connecting", ctx)

    async def on_connected(self, ctx):
        self._add("connected", ctx)

    async def on_disconnected(self, ctx):
        self._add("disconnected", ctx)

    async def on_error(self, ctx):
        self._add("error", ctx)

    async def on_subscribing(self, ctx):
        self._add("subscribing", ctx)

    async def on_subscribed(self, ctx):
        self._add("subscribed", ctx)

    async def on_unsubscribed(self, ctx):
        self._add("unsubscribed", ctx)

    async def on_publication(self, ctx):
        self._add("publication", ctx)

    async def on_join(self, ctx):
        self._add("join", ctx)

    async def on_leave(self, ctx):
        self._add("leave", ctx)


def publications(events: Events) -> list:
    """The Publication objects of the recorded publication events."""
    return [ctx.pub for ctx in events.of("publication")]
