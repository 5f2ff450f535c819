// The real server for the integration tests: `plexus serve` in a child process on a free port,
// HS256 tokens minted with node:crypto, the server HTTP API, and a small EventSource for Node
// (which has none) so the SSE transport can be tried against the real thing.

import { spawn, spawnSync } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const repoRoot = path.resolve(here, '../../..');
export const PLEXUS_BIN = process.env.PLEXUS_BIN
  ? path.resolve(process.cwd(), process.env.PLEXUS_BIN)
  : path.join(repoRoot, 'target/debug/plexus');
export const SECRET = 'plexusjs-test-secret-0123456789abcdef';
export const API_KEY = 'plexusjs-test-api-key';

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const base64url = (value) => Buffer.from(value).toString('base64url');

/** An HS256 JWT with these claims, signed with `secret`. */
export function hs256(claims, secret = SECRET) {
  const head = `${base64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }))}.${base64url(JSON.stringify(claims))}`;
  return `${head}.${createHmac('sha256', secret).update(head).digest('base64url')}`;
}

/** A connection token for `sub` that expires `ttl` seconds from now (negative: already expired). */
export function token(sub, ttl = 3600) {
  return hs256({ sub, exp: Math.floor(Date.now() / 1000) + ttl });
}

function freePort() {
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

/** Resolves when `check()` is truthy; rejects naming `what` after `timeout` ms. */
export async function until(check, what, timeout = 5000) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${what}`);
    await sleep(10);
  }
}

/** Builds the binary once when it is missing (`cargo build -p plexus`). */
function ensureBinary() {
  if (existsSync(PLEXUS_BIN)) return;
  const built = spawnSync('cargo', ['build', '-p', 'plexus'], { cwd: repoRoot, stdio: 'inherit' });
  if (built.status !== 0 || !existsSync(PLEXUS_BIN)) throw new Error(`could not build ${PLEXUS_BIN}`);
}

export class Server {
  /** `extraArgs` go after the standard ones, e.g. ['--ping-interval', '1s']. */
  static async start(extraArgs = []) {
    ensureBinary();
    const dataDir = mkdtempSync(path.join(os.tmpdir(), 'plexusjs-'));
    const port = await freePort();
    const args = [
      'serve', '--listen', `127.0.0.1:${port}`, '--tcp-echo', 'off', '--tcp-chat', 'off',
      '--token-hmac-secret', SECRET, '--api-key', API_KEY, '--memory', '--data-dir', dataDir,
      ...extraArgs,
    ];
    const child = spawn(PLEXUS_BIN, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    const server = new Server(child, port, dataDir);
    child.stdout.on('data', (chunk) => { server.output += chunk; });
    child.stderr.on('data', (chunk) => { server.output += chunk; });
    server.exited = new Promise((resolve) => child.on('exit', resolve));
    running.add(child);
    child.on('exit', () => running.delete(child));
    try {
      await until(async () => {
        if (child.exitCode !== null) throw new Error(`server exited: ${server.output}`);
        try {
          return (await fetch(`${server.http}/health`)).ok;
        } catch {
          return false;
        }
      }, 'the server to be healthy', 10_000);
    } catch (error) {
      await server.stop();
      throw error;
    }
    return server;
  }

  constructor(child, port, dataDir) {
    this.child = child;
    this.dataDir = dataDir;
    this.output = '';
    this.http = `http://127.0.0.1:${port}`;
    this.ws = `ws://127.0.0.1:${port}/connection/websocket`;
  }

  /** `POST /api/{method}` with the API key; the parsed body. */
  async api(method, body) {
    const response = await fetch(`${this.http}/api/${method}`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', 'X-API-Key': API_KEY },
      body: JSON.stringify(body),
    });
    const text = await response.text();
    if (!response.ok) throw new Error(`/api/${method} answered ${response.status}: ${text}`);
    const parsed = JSON.parse(text);
    if (parsed.error) throw new Error(`/api/${method} error ${JSON.stringify(parsed.error)}`);
    return parsed;
  }

  async stop() {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGKILL');
    await this.exited;
    rmSync(this.dataDir, { recursive: true, force: true });
  }
}

const running = new Set();
process.on('exit', () => {
  for (const child of running) child.kill('SIGKILL');
});

/**
 * Just enough of EventSource for plexus.js in Node: GET with fetch, `data:` lines joined into
 * one message per event, onmessage / onerror, close(). No automatic reconnect.
 */
export class NodeEventSource {
  constructor(url) {
    this.url = url;
    this.onmessage = null;
    this.onerror = null;
    this._abort = new AbortController();
    this._run().catch(() => {
      if (!this._abort.signal.aborted) this.onerror?.({});
    });
  }

  async _run() {
    const response = await fetch(this.url, { headers: { Accept: 'text/event-stream' }, signal: this._abort.signal });
    if (!response.ok) throw new Error(`event stream answered ${response.status}`);
    const decoder = new TextDecoder();
    let buffered = '';
    let data = [];
    for await (const chunk of response.body) {
      buffered += decoder.decode(chunk, { stream: true });
      let newline;
      while ((newline = buffered.indexOf('\n')) >= 0) {
        const line = buffered.slice(0, newline).replace(/\r$/, '');
        buffered = buffered.slice(newline + 1);
        if (line === '') {
          if (data.length > 0) this.onmessage?.({ data: data.join('\n') });
          data = [];
        } else if (line.startsWith('data:')) {
          data.push(line.slice(5).replace(/^ /, ''));
        }
      }
    }
    throw new Error('event stream ended');
  }

  close() {
    this._abort.abort();
  }
}
