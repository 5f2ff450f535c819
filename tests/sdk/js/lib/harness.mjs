// Shared pieces of the SDK end-to-end tests: a Plexus server in a child process, tokens, the
// server HTTP API, and Centrifuge clients whose raw WebSocket traffic is recorded.
//
// Each test writes what it saw (server output, every frame each client sent and received) to
// tests/sdk/.logs/js/<test>.log, so a failure can be read frame by frame.

import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Centrifuge } from 'centrifuge';
import jwt from 'jsonwebtoken';
import WebSocket from 'ws';

const here = path.dirname(fileURLToPath(import.meta.url));
const sdkDir = path.resolve(here, '../..');
const repoRoot = path.resolve(sdkDir, '../..');

export const PLEXUS_BIN = process.env.PLEXUS_BIN
  ? path.resolve(process.cwd(), process.env.PLEXUS_BIN)
  : path.join(repoRoot, 'target/debug/plexus');
export const SECRET = 'sdk-test-secret-0123456789abcdef';
export const API_KEY = 'sdk-test-api-key';
const LOG_DIR = path.join(sdkDir, '.logs', 'js');

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** A port that was free a moment ago: bind port 0, read it back, close. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const probe = net.createServer();
    probe.unref();
    probe.on('error', reject);
    probe.listen(0, '127.0.0.1', () => {
      const { port } = probe.address();
      probe.close(() => resolve(port));
    });
  });
}

/** A unique channel name in the `chat` namespace, or in `namespace`. */
export function room(prefix = 'room', namespace = 'chat') {
  return `${namespace}:${prefix}-${process.pid}-${Math.random().toString(36).slice(2, 10)}`;
}

/** An HS256 connection token. `exp` is absolute Unix seconds; omitted claims are left out. */
export function token(sub, { exp, channels, info, secret = SECRET } = {}) {
  const claims = { sub };
  if (exp !== undefined) claims.exp = exp;
  if (channels !== undefined) claims.channels = channels;
  if (info !== undefined) claims.info = info;
  return jwt.sign(claims, secret, { algorithm: 'HS256', noTimestamp: true });
}

/** An HS256 subscription token for `channel`; `exp` is absolute Unix seconds. */
export function subscriptionToken(sub, channel, { exp, secret = SECRET } = {}) {
  const claims = { sub, channel };
  if (exp !== undefined) claims.exp = exp;
  return jwt.sign(claims, secret, { algorithm: 'HS256', noTimestamp: true });
}

/** Resolves when `check()` is truthy; rejects with `what` after `timeout` ms. */
export async function until(check, what, timeout = 5_000) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${what}`);
    await sleep(20);
  }
}

/** The next `event` from `emitter` whose context passes `accept`, within `timeout` ms. */
export function once(emitter, event, { accept = () => true, timeout = 5_000 } = {}) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      emitter.off(event, listener);
      reject(new Error(`timed out after ${timeout} ms waiting for event '${event}'`));
    }, timeout);
    const listener = (ctx) => {
      if (!accept(ctx)) return;
      clearTimeout(timer);
      emitter.off(event, listener);
      resolve(ctx);
    };
    emitter.on(event, listener);
  });
}

/** Raised by Server.start when the binary refuses the engine as unknown. */
export class EngineUnavailable extends Error {}

/**
 * One test's record: the server's output and every client's frames, in arrival order, written
 * to .logs/js/<name>.log by `save()`.
 */
export class Recorder {
  constructor(name) {
    this.name = name.replace(/[^A-Za-z0-9_.-]+/g, '_').slice(0, 100);
    this.lines = [];
    this.start = Date.now();
  }

  add(source, text) {
    const ms = String(Date.now() - this.start).padStart(6);
    for (const line of String(text).split('\n')) {
      if (line.length > 0) this.lines.push(`${ms} ${source} ${line}`);
    }
  }

  get path() {
    return path.join(LOG_DIR, `${this.name}.log`);
  }

  save() {
    mkdirSync(LOG_DIR, { recursive: true });
    writeFileSync(this.path, `${this.lines.join('\n')}\n`);
  }

  /** The frames one client sent ('>') or received ('<'), parsed. */
  frames(client, direction) {
    const prefix = `${client} ${direction} `;
    const out = [];
    for (const line of this.lines) {
      const at = line.indexOf(prefix);
      if (at < 0) continue;
      for (const part of line.slice(at + prefix.length).split('\n')) {
        try {
          out.push(JSON.parse(part));
        } catch {
          // a close or error line
        }
      }
    }
    return out;
  }
}

/** A `plexus serve` child process. */
export class Server {
  constructor({ child, port, dataDir, engine, recorder, exited }) {
    Object.assign(this, { child, port, dataDir, engine, recorder, exited });
    this.http = `http://127.0.0.1:${port}`;
    this.ws = `ws://127.0.0.1:${port}/connection/websocket`;
  }

  /**
   * Starts a server and waits for GET /health. `dataDir` defaults to a fresh temporary folder
   * (removed by `cleanup()`), `port` to a free one. With `engine: 'redis'`, `redisUrl` and
   * `redisPrefix` become `--redis-url` and `--redis-prefix` (left to the server's defaults when
   * omitted); likewise, with `engine: 'nats'`, `natsUrl` and `natsPrefix` become `--nats-url`
   * and `--nats-prefix`; `args` are appended to the command line as given; `config` (TOML text) goes to a file
   * in the data folder passed with `--config`.
   */
  static async start(recorder, {
    engine = 'memory', dataDir, port, label = 'server', tcpChatPort, redisUrl, redisPrefix, natsUrl, natsPrefix,
    args: extraArgs = [], config,
  } = {}) {
    if (!existsSync(PLEXUS_BIN)) {
      throw new Error(`no server binary at ${PLEXUS_BIN}; run \`cargo build -p plexus\` or set PLEXUS_BIN`);
    }
    const ownsDir = !dataDir;
    dataDir ??= mkdtempSync(path.join(os.tmpdir(), 'plexus-sdk-js-'));
    port ??= await freePort();
    const args = [
      'serve',
      '--listen', `127.0.0.1:${port}`,
      '--tcp-echo', 'off',
      '--tcp-chat', tcpChatPort ? `127.0.0.1:${tcpChatPort}` : 'off',
      '--token-hmac-secret', SECRET,
      '--api-key', API_KEY,
      '--engine', engine,
      '--data-dir', dataDir,
    ];
    if (redisUrl !== undefined) args.push('--redis-url', redisUrl);
    if (redisPrefix !== undefined) args.push('--redis-prefix', redisPrefix);
    if (natsUrl !== undefined) args.push('--nats-url', natsUrl);
    if (natsPrefix !== undefined) args.push('--nats-prefix', natsPrefix);
    if (config !== undefined) {
      const file = path.join(dataDir, 'plexus.toml');
      writeFileSync(file, config);
      args.push('--config', file);
    }
    args.push(...extraArgs);
    recorder.add(label, `$ ${PLEXUS_BIN} ${args.join(' ')}`);
    const child = spawn(PLEXUS_BIN, args, {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, PLEXUS_LOG_LEVEL: process.env.PLEXUS_LOG_LEVEL ?? 'info' },
    });
    running.add(child);
    let output = '';
    child.stdout.on('data', (chunk) => { output += chunk; recorder.add(`${label}:out`, chunk); });
    child.stderr.on('data', (chunk) => { output += chunk; recorder.add(`${label}:err`, chunk); });
    const exited = new Promise((resolve) => {
      child.on('exit', (code, signal) => {
        running.delete(child);
        recorder.add(label, `exited: code ${code} signal ${signal}`);
        resolve({ code, signal });
      });
    });
    let early = null;
    exited.then((status) => { early = status; });
    const server = new Server({ child, port, dataDir, engine, recorder, exited });
    server.ownsDir = ownsDir;
    const deadline = Date.now() + 10_000;
    for (;;) {
      if (early) {
        await sleep(50); // let the last output arrive
        // Only a refusal of the engine's name counts: `invalid engine: "x" is neither embedded
        // nor memory` from plexus, or clap's `invalid value 'x' for '--engine ...'`.
        if (/(invalid|unknown) engine|engine[^\n]*(unknown|neither)|invalid value '[^']*' for '--engine/i.test(output)) {
          throw new EngineUnavailable(`the server refused --engine ${engine}: ${output.trim()}`);
        }
        throw new Error(`server exited before it was healthy (${JSON.stringify(early)}): ${output.trim()}`);
      }
      try {
        const response = await fetch(`${server.http}/health`);
        if (response.ok) return server;
      } catch {
        // not listening yet
      }
      if (Date.now() > deadline) {
        await server.kill();
        throw new Error(`server not healthy within 10 s: ${output.trim()}`);
      }
      await sleep(50);
    }
  }

  /** Sends `signal` (SIGKILL by default) and waits for the process to end. */
  async kill(signal = 'SIGKILL') {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill(signal);
    await this.exited;
  }

  /** Kills the server if running and removes a data folder it created. */
  async cleanup() {
    await this.kill();
    if (this.ownsDir) rmSync(this.dataDir, { recursive: true, force: true });
  }

  /**
   * Calls the server HTTP API (`POST /api/<method>`), returning the parsed body. A 404 says the
   * API is not there at all, which is reported as such.
   */
  async api(method, body) {
    const response = await fetch(`${this.http}/api/${method}`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', 'X-API-Key': API_KEY },
      body: JSON.stringify(body),
    });
    const text = await response.text();
    this.recorder.add('api', `POST /api/${method} ${JSON.stringify(body)} -> ${response.status} ${text.trim()}`);
    if (response.status === 404) {
      throw new Error(`the server has no HTTP API /api/${method} (404: ${text.trim()})`);
    }
    if (!response.ok) throw new Error(`/api/${method} answered ${response.status}: ${text.trim()}`);
    const parsed = JSON.parse(text);
    if (parsed.error) throw new Error(`/api/${method} error: ${JSON.stringify(parsed.error)}`);
    return parsed;
  }

  /** Publishes through the API and returns `result` ({offset, epoch}). */
  async publish(channel, data) {
    const { result } = await this.api('publish', { channel, data });
    return result;
  }
}

/** Every server started and not yet seen exit: killed if the test process dies. */
const running = new Set();
process.on('exit', () => {
  for (const child of running) child.kill('SIGKILL');
});

/**
 * Holds a client's reconnects: while `held`, every new WebSocket of a client given this gate is
 * pointed at a port where nothing listens, so the attempt fails at once and the SDK backs off.
 */
export class Gate {
  held = false;
}

/** A `ws` WebSocket that records what it sends and receives under `label`. */
function recordingWebSocket(recorder, label, gate) {
  return class RecordingWebSocket extends WebSocket {
    constructor(url, ...rest) {
      const held = gate?.held ?? false;
      super(held ? 'ws://127.0.0.1:1/connection/websocket' : url, ...rest);
      recorder.add(label, held ? `open held back (gate): ${url} not dialled` : `open ${url}`);
      this.addEventListener('message', (event) => recorder.add(`${label} <`, String(event.data)));
      this.addEventListener('close', (event) => recorder.add(label, `closed by ${event.wasClean ? 'close frame' : 'drop'}: code ${event.code} reason ${JSON.stringify(event.reason)}`));
      this.addEventListener('error', (event) => recorder.add(label, `socket error ${event.message ?? ''}`));
    }

    send(data, ...rest) {
      recorder.add(`${label} >`, String(data));
      return super.send(data, ...rest);
    }
  };
}

/**
 * A Centrifuge client for `server` whose frames go to the recorder under `label`. Not yet
 * connected. Closed by `closeAll`. With a `gate`, its connection attempts can be held back.
 */
export function client(server, recorder, label, options = {}, gate = null) {
  const centrifuge = new Centrifuge(server.ws, {
    websocket: recordingWebSocket(recorder, label, gate),
    name: `sdk-test-${label}`,
    ...options,
  });
  centrifuge.on('state', (ctx) => recorder.add(label, `state ${ctx.oldState} -> ${ctx.newState}`));
  centrifuge.on('connecting', (ctx) => recorder.add(label, `connecting code ${ctx.code} ${ctx.reason}`));
  centrifuge.on('connected', (ctx) => {
    centrifuge.clientId = ctx.client; // the id the server gave this connection
    recorder.add(label, `connected client ${ctx.client} transport ${ctx.transport}`);
  });
  centrifuge.on('disconnected', (ctx) => recorder.add(label, `disconnected code ${ctx.code} ${ctx.reason}`));
  centrifuge.on('error', (ctx) => recorder.add(label, `error ${ctx.type} ${JSON.stringify(ctx.error)}`));
  centrifuge.label = label;
  (recorder.clients ??= []).push(centrifuge);
  return centrifuge;
}

/** Subscription events that matter here, into the recorder. */
export function watch(recorder, label, sub) {
  sub.on('state', (ctx) => recorder.add(label, `sub ${ctx.channel} ${ctx.oldState} -> ${ctx.newState}`));
  sub.on('subscribed', (ctx) => recorder.add(label, `subscribed ${JSON.stringify(ctx)}`));
  sub.on('unsubscribed', (ctx) => recorder.add(label, `unsubscribed ${JSON.stringify(ctx)}`));
  sub.on('error', (ctx) => recorder.add(label, `sub error ${JSON.stringify(ctx)}`));
  return sub;
}

/** Disconnects every client of the recorder (quietly) and saves its log. */
export function closeAll(recorder) {
  for (const centrifuge of recorder.clients ?? []) {
    try {
      centrifuge.disconnect();
    } catch {
      // already gone
    }
  }
  recorder.save();
}

/** Publication contexts of `emitter` ('publication' events), collected in arrival order. */
export function collect(emitter) {
  const seen = [];
  emitter.on('publication', (ctx) => seen.push(ctx));
  return seen;
}

/**
 * The start of a test: a recorder named after it, a server started with `serverOptions`, and
 * an after hook that disconnects the clients, kills the server and saves the log.
 */
export async function setup(t, file, serverOptions = {}) {
  const recorder = new Recorder(`${file}--${t.name}`);
  let server = null;
  t.after(async () => {
    closeAll(recorder);
    await server?.cleanup();
    recorder.save();
  });
  t.diagnostic(`frames and server output: ${path.relative(process.cwd(), recorder.path)}`);
  server = await Server.start(recorder, serverOptions);
  return { recorder, server };
}

// --- Several nodes (cluster tests) ---------------------------------------------------------

/**
 * A TCP proxy on a port of its own that forwards each connection to the current target port;
 * `target` can be switched, and when either side of a connection ends the other is ended too.
 */
export class Proxy {
  constructor(recorder, target) {
    Object.assign(this, { recorder, target });
    this.sockets = new Set();
    this.server = net.createServer((downstream) => this.forward(downstream));
  }

  async listen() {
    await new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(0, '127.0.0.1', resolve);
    });
    this.port = this.server.address().port;
    this.recorder.add('proxy', `listening on ${this.port}, forwarding to ${this.target}`);
    return this;
  }

  forward(downstream) {
    const target = this.target;
    const upstream = net.connect({ port: target, host: '127.0.0.1' });
    this.sockets.add(downstream);
    this.sockets.add(upstream);
    this.recorder.add('proxy', `connection -> ${target}`);
    const end = (why) => {
      if (!downstream.destroyed || !upstream.destroyed) this.recorder.add('proxy', `connection to ${target} ended: ${why}`);
      downstream.destroy();
      upstream.destroy();
      this.sockets.delete(downstream);
      this.sockets.delete(upstream);
    };
    downstream.pipe(upstream);
    upstream.pipe(downstream);
    downstream.on('error', (error) => end(`client side ${error.code ?? error.message}`));
    upstream.on('error', (error) => end(`server side ${error.code ?? error.message}`));
    downstream.on('close', () => end('client side closed'));
    upstream.on('close', () => end('server side closed'));
  }

  switchTo(target) {
    this.recorder.add('proxy', `target ${this.target} -> ${target}`);
    this.target = target;
  }

  async close() {
    for (const socket of this.sockets) socket.destroy();
    await new Promise((resolve) => this.server.close(resolve));
  }
}

/** GET /ready: its HTTP status (0 when the request failed). */
export async function readyStatus(server) {
  try {
    const response = await fetch(`${server.http}/ready`, { signal: AbortSignal.timeout(2_000) });
    await response.text();
    return response.status;
  } catch {
    return 0;
  }
}

/** Waits until GET /ready on every server answers `status`. */
export async function allReady(servers, status, what, timeout) {
  await until(async () => {
    const statuses = await Promise.all(servers.map(readyStatus));
    return statuses.every((s) => s === status);
  }, what, timeout);
}

/**
 * POST /api/publish without throwing: `{status, body, ms}`, or `{error, ms}` when no answer came
 * within `timeout` ms.
 */
export async function tryPublish(server, channel, data, timeout = 10_000) {
  const started = Date.now();
  try {
    const response = await fetch(`${server.http}/api/publish`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', 'X-API-Key': API_KEY },
      body: JSON.stringify({ channel, data }),
      signal: AbortSignal.timeout(timeout),
    });
    const text = await response.text();
    const ms = Date.now() - started;
    server.recorder.add('api', `POST /api/publish ${JSON.stringify({ channel, data })} -> ${response.status} ${text.trim()} (${ms} ms)`);
    let body = null;
    try {
      body = JSON.parse(text);
    } catch {
      // not JSON
    }
    return { status: response.status, body, ms };
  } catch (error) {
    const ms = Date.now() - started;
    server.recorder.add('api', `POST /api/publish ${JSON.stringify({ channel, data })} -> no answer: ${error.message} (${ms} ms)`);
    return { error, ms };
  }
}

/** The publications of `channel`'s history as one node's API returns it. */
export async function fullHistory(server, channel) {
  const { result } = await server.api('history', { channel, limit: -1 });
  return result;
}
