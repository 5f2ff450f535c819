// Browser tests for the chat page served at GET / (crates/plexus-server/static/index.html).
//
// Uses a prebuilt server binary (PLEXUS_BIN, default ../../target/debug/plexus; run `cargo build`
// first) and the system Chromium (CHROMIUM_BIN, default /usr/bin/chromium) through
// playwright-core. Screenshots and the server's log go to artifacts/browser/ at the repo root.
//
//   cd tests/browser && npm install && npm test

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createWriteStream, existsSync, mkdirSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import WebSocket from 'ws';

const here = path.dirname(fileURLToPath(import.meta.url));
const repoRoot = path.resolve(here, '../..');
const PLEXUS_BIN = path.resolve(here, process.env.PLEXUS_BIN ?? '../../target/debug/plexus');
const CHROMIUM_BIN = process.env.CHROMIUM_BIN ?? '/usr/bin/chromium';
const ARTIFACTS = path.join(repoRoot, 'artifacts', 'browser');
const ROOM = 'browsertest';

/** Short waits for things that should be quick; reconnecting may take a full backoff step. */
const QUICK = 5_000;
const RECONNECT = 20_000;

mkdirSync(ARTIFACTS, { recursive: true });
const serverLog = createWriteStream(path.join(ARTIFACTS, 'server.log'));

/** A port that was free a moment ago: bind port 0, read it back, close. */
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

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Every server this file started and has not seen exit: killed if the test process dies. */
const running = new Set();
process.on('exit', () => {
  for (const child of running) child.kill('SIGKILL');
});

/** Starts `plexus serve` on `port` and waits until GET /health answers. */
async function startServer(port) {
  if (!existsSync(PLEXUS_BIN)) {
    throw new Error(`no server binary at ${PLEXUS_BIN}; run \`cargo build\` or set PLEXUS_BIN`);
  }
  const child = spawn(
    PLEXUS_BIN,
    ['serve', '--listen', `127.0.0.1:${port}`, '--tcp-echo', 'off', '--tcp-chat', 'off'],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  running.add(child);
  const exited = new Promise((resolve) => {
    child.on('exit', (code, signal) => {
      running.delete(child);
      serverLog.write(`--- server pid ${child.pid} exited: code ${code} signal ${signal}\n`);
      resolve({ code, signal });
    });
  });
  child.stdout.pipe(serverLog, { end: false });
  child.stderr.pipe(serverLog, { end: false });
  const server = { child, exited, port };
  const deadline = Date.now() + 10_000;
  let early = null;
  exited.then((status) => { early = status; });
  for (;;) {
    if (early) throw new Error(`server exited before it was healthy: ${JSON.stringify(early)}`);
    try {
      const response = await fetch(`http://127.0.0.1:${port}/health`);
      if (response.ok) {
        const body = await response.json();
        assert.equal(body.status, 'ok');
        return server;
      }
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) {
      await stopServer(server);
      throw new Error(`server on port ${port} did not become healthy within 10 s`);
    }
    await sleep(50);
  }
}

/** SIGTERM (a graceful shutdown), then SIGKILL if it takes too long; resolves once it exited. */
async function stopServer(server) {
  if (!server || !running.has(server.child)) return server?.exited;
  server.child.kill('SIGTERM');
  const timer = setTimeout(() => server.child.kill('SIGKILL'), 8_000);
  try {
    return await server.exited;
  } finally {
    clearTimeout(timer);
  }
}

async function shot(page, name) {
  await page.screenshot({ path: path.join(ARTIFACTS, `${name}.png`), fullPage: true });
}

async function waitForState(page, state, timeout = QUICK) {
  try {
    await page.waitForFunction(
      (want) => document.getElementById('state')?.textContent === want,
      state,
      { timeout, polling: 50 },
    );
  } catch (error) {
    const now = await page.locator('#state').textContent().catch(() => '?');
    throw new Error(`state never became "${state}" (it is "${now}"): ${error.message}`);
  }
}

/** A message line containing every one of `texts`. */
function messageWith(page, ...texts) {
  let locator = page.locator('#messages .message');
  for (const text of texts) locator = locator.filter({ hasText: text });
  return locator.first();
}

async function waitForMessage(page, texts, timeout = QUICK) {
  const line = messageWith(page, ...texts);
  await line.waitFor({ state: 'visible', timeout });
  return line;
}

/** Opens the chat page in a fresh browser context (its own cookies and storage). */
async function openChat(browser, base, query, viewport) {
  const context = await browser.newContext(viewport ? { viewport } : {});
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (error) => errors.push(error));
  await page.goto(`${base}/${query}`);
  return { context, page, errors };
}

function rawClient(port, room) {
  return new Promise((resolve, reject) => {
    const socket = new WebSocket(`ws://127.0.0.1:${port}/chat/${room}`);
    const received = [];
    socket.on('message', (data, isBinary) => received.push(isBinary ? data : data.toString()));
    socket.once('open', () => resolve({ socket, received }));
    socket.once('error', reject);
  });
}

async function until(predicate, what, timeout = QUICK) {
  const deadline = Date.now() + timeout;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(25);
  }
}

describe('chat page', { timeout: 60_000 }, () => {
  let port;
  let base;
  let server;
  let browser;
  const contexts = [];
  const sockets = [];

  async function chat(query, viewport) {
    const opened = await openChat(browser, base, query, viewport);
    contexts.push(opened.context);
    return opened;
  }

  before(async () => {
    port = await freePort();
    base = `http://127.0.0.1:${port}`;
    server = await startServer(port);
    browser = await chromium.launch({
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
  });

  after(async () => {
    for (const socket of sockets) socket.terminate();
    for (const context of contexts) await context.close().catch(() => {});
    await browser?.close().catch(() => {});
    await stopServer(server);
  });

  test('serves the page', async () => {
    const response = await fetch(`${base}/`);
    assert.equal(response.status, 200);
    assert.match(response.headers.get('content-type'), /^text\/html/);
    const html = await response.text();
    assert.match(html, /<meta name="viewport"/);
    assert.doesNotMatch(html, /<(script|link|img)[^>]+(src|href)=["']?(https?:)?\/\//i,
      'the page must not load anything from elsewhere');
  });

  test('two browsers chat in a room', async () => {
    const alice = await chat(`?room=${ROOM}&name=alice`);
    const bob = await chat(`?room=${ROOM}&name=bob`, { width: 390, height: 844 }); // a phone
    await waitForState(alice.page, 'connected');
    await waitForState(bob.page, 'connected');
    assert.equal(await alice.page.locator('#room').inputValue(), ROOM);
    assert.equal(await bob.page.locator('#nick').inputValue(), 'bob');

    const box = alice.page.getByLabel('Message');
    await box.fill('hello from alice');
    await box.press('Enter');
    for (const { page } of [alice, bob]) {
      const line = await waitForMessage(page, ['alice', 'hello from alice']);
      assert.equal(await line.locator('.nick').textContent(), 'alice');
    }
    assert.equal(await box.inputValue(), '', 'the box is cleared after sending');

    const bobBox = bob.page.getByLabel('Message');
    await bobBox.fill('hi alice, bob here');
    await bobBox.press('Enter');
    await waitForMessage(alice.page, ['bob', 'hi alice, bob here']);
    await waitForMessage(bob.page, ['bob', 'hi alice, bob here']);

    // Message text is shown as text, never parsed as HTML.
    const nasty = '<img src=x onerror="window.pwned=1"><b>not bold</b>';
    await box.fill(nasty);
    await box.press('Enter');
    const line = await waitForMessage(bob.page, ['alice', '<img src=x']);
    assert.equal(await line.locator('.body').textContent(), `alice: ${nasty}`);
    assert.equal(await bob.page.locator('#messages img').count(), 0);
    assert.equal(await bob.page.evaluate(() => window.pwned), undefined);

    await shot(alice.page, 'alice');
    await shot(bob.page, 'bob-phone');
    // Nothing scrolls sideways on a phone-sized screen.
    const overflow = await bob.page.evaluate(
      () => document.documentElement.scrollWidth - document.documentElement.clientWidth,
    );
    assert.ok(overflow <= 0, `page is ${overflow}px wider than a phone screen`);
    assert.deepEqual([...alice.errors, ...bob.errors], []);
  });

  test('a raw WebSocket client and the page share the room', async () => {
    const { page, errors } = await chat(`?room=${ROOM}&name=carol`);
    await waitForState(page, 'connected');
    const raw = await rawClient(port, ROOM);
    sockets.push(raw.socket);

    raw.socket.send('from raw');
    const line = await waitForMessage(page, ['from raw']);
    assert.equal(await line.locator('.nick').count(), 0, 'a line without "NICK: " has no nick');

    raw.socket.send(Buffer.from([1, 2, 3]));
    await waitForMessage(page, ['[binary message, 3 bytes]']);

    await page.getByLabel('Message').fill('carol says hi');
    await page.getByLabel('Message').press('Enter');
    await until(() => raw.received.includes('carol: carol says hi'),
      'the raw client to receive "carol: carol says hi"');
    await shot(page, 'carol-raw');
    assert.deepEqual(errors, []);
  });

  test('bad room names are refused in the page', async () => {
    const { page } = await chat('?room=' + encodeURIComponent('no spaces!') + '&name=dave');
    await page.locator('#join-error').filter({ hasText: 'Room' }).waitFor({ timeout: QUICK });
    assert.equal(await page.locator('#state').textContent(), 'offline');
    assert.equal(await page.locator('#room').getAttribute('aria-invalid'), 'true');
    await shot(page, 'dave-bad-room');
  });

  test('the page reconnects after a server restart', async () => {
    const { page, errors } = await chat(`?room=${ROOM}&name=erin`);
    await waitForState(page, 'connected');

    const status = await stopServer(server);
    assert.equal(status.code, 0, 'the server exits cleanly on SIGTERM');
    await waitForState(page, 'reconnecting');
    await waitForMessage(page, ['* disconnected: 1001 server shutting down']);
    // Stay down long enough for a few retries to fail: the page keeps trying, quietly.
    await sleep(1_500);
    assert.equal(await page.locator('#state').textContent(), 'reconnecting');
    assert.match(await page.locator('#state-detail').textContent(), /retrying/);
    assert.equal(await messageWith(page, 'could not connect').count(), 0);
    await shot(page, 'erin-reconnecting');

    server = await startServer(port);
    await waitForState(page, 'connected', RECONNECT);
    const box = page.getByLabel('Message');
    await box.fill('back again');
    await box.press('Enter');
    await waitForMessage(page, ['erin', 'back again']);
    await shot(page, 'erin-reconnected');
    assert.deepEqual(errors, []);
  });
});
