// What the browser tests share: the real server binary (started, SIGKILLed and restarted on the
// same port and data dir), the system Chromium through playwright-core, the server HTTP API, a
// proxy that refuses WebSocket upgrades, and screenshots.
//
// PLEXUS_BIN: the server binary (default ../../target/debug/plexus: `cargo build -p plexus`).
// CHROMIUM_BIN: the browser (default /usr/bin/chromium).
// Screenshots and server logs go to artifacts/browser/ at the repository root.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createWriteStream, existsSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const testsDir = path.resolve(here, '..');
export const repoRoot = path.resolve(testsDir, '../..');
export const PLEXUS_BIN = path.resolve(testsDir, process.env.PLEXUS_BIN ?? '../../target/debug/plexus');
export const CHROMIUM_BIN = process.env.CHROMIUM_BIN ?? '/usr/bin/chromium';
export const ARTIFACTS = path.join(repoRoot, 'artifacts', 'browser');
export const API_KEY = 'browser-test-key';

/** Waits for things that should be quick; reconnecting may take a backoff step or two. */
export const QUICK = 5_000;
export const RECONNECT = 20_000;

mkdirSync(ARTIFACTS, { recursive: true });

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

/** Every server started and not seen exiting: killed if the test process dies. */
const running = new Set();
process.on('exit', () => {
  for (const child of running) child.kill('SIGKILL');
});

/**
 * A Plexus server on one port and one data dir that can be killed and started again: what a
 * page sees as the same server coming back after a crash.
 */
export class Server {
  constructor(name) {
    this.name = name;
    this.dataDir = mkdtempSync(path.join(os.tmpdir(), `plexus-browser-${name}-`));
    this.log = createWriteStream(path.join(ARTIFACTS, `server-${name}.log`));
    this.child = null;
    this.exited = null;
    this.port = 0;
  }

  get base() {
    return `http://127.0.0.1:${this.port}`;
  }

  /** Starts `plexus serve` (on the same port as before, if there was a before). */
  async start() {
    if (!existsSync(PLEXUS_BIN)) {
      throw new Error(`no server binary at ${PLEXUS_BIN}; run \`cargo build -p plexus\` or set PLEXUS_BIN`);
    }
    if (!this.port) this.port = await freePort();
    const child = spawn(PLEXUS_BIN, [
      'serve',
      '--listen', `127.0.0.1:${this.port}`,
      '--tcp-echo', 'off',
      '--tcp-chat', 'off',
      '--data-dir', this.dataDir,
      '--api-key', API_KEY,
    ], { stdio: ['ignore', 'pipe', 'pipe'] });
    running.add(child);
    this.child = child;
    let early = null;
    this.exited = new Promise((resolve) => {
      child.on('exit', (code, signal) => {
        running.delete(child);
        this.log.write(`--- server pid ${child.pid} exited: code ${code} signal ${signal}\n`);
        early = { code, signal };
        resolve({ code, signal });
      });
    });
    this.log.write(`--- server pid ${child.pid} on port ${this.port}\n`);
    child.stdout.pipe(this.log, { end: false });
    child.stderr.pipe(this.log, { end: false });
    const deadline = Date.now() + 10_000;
    for (;;) {
      if (early) throw new Error(`server exited before it was healthy: ${JSON.stringify(early)}`);
      try {
        const response = await fetch(`${this.base}/health`);
        if (response.ok) return this;
      } catch {
        // not listening yet
      }
      if (Date.now() > deadline) {
        await this.kill();
        throw new Error(`server on port ${this.port} did not become healthy within 10 s`);
      }
      await sleep(30);
    }
  }

  /** SIGKILL: a crash, nothing is flushed or said goodbye. Resolves once it is gone. */
  async kill() {
    if (!this.child || !running.has(this.child)) return this.exited;
    this.child.kill('SIGKILL');
    return this.exited;
  }

  /** SIGTERM (graceful), SIGKILL if that takes too long. */
  async stop() {
    if (!this.child || !running.has(this.child)) return this.exited;
    this.child.kill('SIGTERM');
    const timer = setTimeout(() => this.child.kill('SIGKILL'), 8_000);
    try {
      return await this.exited;
    } finally {
      clearTimeout(timer);
    }
  }

  async close() {
    await this.stop();
    rmSync(this.dataDir, { recursive: true, force: true });
  }

  /** A server API call: its `result`, or a thrown error. */
  async api(method, body) {
    const response = await fetch(`${this.base}/api/${method}`, {
      method: 'POST',
      headers: { 'X-API-Key': API_KEY, 'Content-Type': 'application/json' },
      body: JSON.stringify(body),
    });
    const answer = await response.json();
    if (!response.ok || answer.error) throw new Error(`api ${method}: ${response.status} ${JSON.stringify(answer)}`);
    return answer.result;
  }

  publish(channel, data) {
    return this.api('publish', { channel, data });
  }

  /** The channel's publications, oldest first (all the server keeps). */
  async history(channel) {
    const result = await this.api('history', { channel, limit: -1 });
    return result.publications ?? [];
  }

  /** The channel's top offset. */
  async offset(channel) {
    const result = await this.api('history', { channel, limit: 0 });
    return result.offset;
  }
}

export async function launchBrowser() {
  return chromium.launch({
    executablePath: CHROMIUM_BIN,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-background-networking',
      '--disable-quic',
      '--no-first-run',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
}

/** Opens `url` in a fresh browser context (its own storage); collects uncaught page errors. */
export async function openPage(browser, url, viewport) {
  const context = await browser.newContext(viewport ? { viewport } : { viewport: { width: 1100, height: 760 } });
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (error) => errors.push(error));
  await page.goto(url);
  return { context, page, errors };
}

export async function shot(page, name) {
  await page.screenshot({ path: path.join(ARTIFACTS, `${name}.png`) });
}

export async function waitForState(page, state, timeout = QUICK) {
  try {
    await page.waitForFunction(
      (want) => document.getElementById('state')?.textContent === want,
      state,
      { timeout, polling: 50 },
    );
  } catch (error) {
    const now = await page.locator('#state').textContent().catch(() => '?');
    throw new Error(`state never became "${state}" (it is "${now}"): ${error.message.split('\n')[0]}`);
  }
}

/** The confirmed (not pending) message elements' `.text`, in page order. */
export function messageTexts(page) {
  return page.locator('#messages .message:not(.pending) .text').allTextContents();
}

/** A message element containing every one of `texts`. */
export function messageWith(page, ...texts) {
  let locator = page.locator('#messages .message');
  for (const text of texts) locator = locator.filter({ hasText: text });
  return locator.first();
}

export async function waitForMessage(page, texts, timeout = QUICK) {
  const line = messageWith(page, ...texts);
  await line.waitFor({ state: 'visible', timeout });
  return line;
}

export async function say(page, text) {
  const box = page.getByLabel('Message');
  await box.fill(text);
  await box.press('Enter');
}

export async function until(predicate, what, timeout = QUICK) {
  const deadline = Date.now() + timeout;
  for (;;) {
    if (await predicate()) return;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

/**
 * A tiny HTTP proxy to `target` that answers every WebSocket upgrade with 403, as some
 * corporate proxies do; everything else (SSE, HTTP streaming, emulation POSTs) is forwarded
 * and streamed as it comes.
 */
export async function wsBlockingProxy(targetPort) {
  const upgradesRefused = { count: 0 };
  const server = http.createServer((req, res) => {
    const upstream = http.request({
      host: '127.0.0.1',
      port: targetPort,
      method: req.method,
      path: req.url,
      headers: req.headers,
    }, (answer) => {
      res.writeHead(answer.statusCode, answer.rawHeaders);
      res.flushHeaders();
      answer.pipe(res);
      // The server went away mid-stream: so does the browser's stream, as it would without us.
      answer.on('close', () => {
        if (!answer.complete) res.destroy();
      });
    });
    upstream.on('error', () => {
      if (!res.headersSent) res.writeHead(502, { 'Content-Type': 'text/plain' });
      res.end();
    });
    res.on('close', () => upstream.destroy());
    req.pipe(upstream);
  });
  server.on('upgrade', (req, socket) => {
    upgradesRefused.count += 1;
    const body = 'websocket upgrades are not allowed here\n';
    socket.end(`HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: ${body.length}\r\nConnection: close\r\n\r\n${body}`);
  });
  const sockets = new Set();
  server.on('connection', (socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
  });
  const port = await freePort();
  await new Promise((resolve) => server.listen(port, '127.0.0.1', resolve));
  return {
    port,
    base: `http://127.0.0.1:${port}`,
    upgradesRefused,
    close: () => new Promise((resolve) => {
      for (const socket of sockets) socket.destroy();
      server.close(() => resolve());
    }),
  };
}

/**
 * A TCP pass-through to `target` that can be cut: `cut()` drops every connection and refuses
 * new ones until `restore()`. A page behind it loses the server while the server (and its
 * API) keeps running.
 */
export async function gate(targetPort) {
  let open = true;
  const pairs = new Set();
  const server = net.createServer((client) => {
    if (!open) {
      client.destroy();
      return;
    }
    const upstream = net.connect(targetPort, '127.0.0.1');
    const pair = { client, upstream };
    pairs.add(pair);
    const done = () => {
      pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    for (const socket of [client, upstream]) {
      socket.on('error', done);
      socket.on('close', done);
    }
    client.pipe(upstream);
    upstream.pipe(client);
  });
  const port = await freePort();
  await new Promise((resolve) => server.listen(port, '127.0.0.1', resolve));
  const cutAll = () => {
    for (const { client, upstream } of [...pairs]) {
      client.destroy();
      upstream.destroy();
    }
    pairs.clear();
  };
  return {
    port,
    base: `http://127.0.0.1:${port}`,
    cut() {
      open = false;
      cutAll();
    },
    restore() {
      open = true;
    },
    close: () => new Promise((resolve) => {
      cutAll();
      server.close(() => resolve());
    }),
  };
}

export { assert };
