// The admin page at /admin (crates/plexus-server/static/admin.html): signs in with the API key,
// polls `info`, `channels` and /metrics, shows nodes, channels, rates and charts, publishes.
//
//   cd tests/browser && npm install && node --test admin.test.mjs

import { after, before, describe, test } from 'node:test';
import WebSocket from 'ws';
import {
  API_KEY, assert, launchBrowser, openPage, QUICK, RECONNECT, Server, shot, sleep, until,
} from './lib/harness.mjs';

const ROOM = 'admintest';
const CHANNEL = `chat:${ROOM}`;

describe('admin page', { timeout: 60_000 }, () => {
  const server = new Server('admin');
  let browser;
  let context;
  let page;
  let pageErrors;
  const sockets = [];
  // Console errors, each with what the test was doing then: some failed requests are expected
  // (the 401 of a wrong key, refused connections while the server is down), nothing else.
  let phase = 'start';
  const consoleErrors = [];

  /** A raw chat-room WebSocket client that keeps what it receives. */
  async function member(room) {
    const socket = new WebSocket(`ws://127.0.0.1:${server.port}/chat/${room}`);
    socket.received = [];
    socket.on('message', (data) => socket.received.push(String(data)));
    sockets.push(socket);
    await new Promise((resolve, reject) => {
      socket.once('open', resolve);
      socket.once('error', reject);
    });
    return socket;
  }

  const text = (id) => page.locator(`#${id}`).textContent();
  /** A summary card as a number (NaN for "—"). */
  const number = async (id) => {
    const shown = (await text(id)).trim();
    return /^-?[\d,]+(\.\d+)?$/.test(shown) ? Number(shown.replaceAll(',', '')) : Number.NaN;
  };
  const state = () => page.locator('#status').getAttribute('data-state');
  const points = (id) => page.locator(`#${id}`).getAttribute('data-points').then(Number);
  const channelRow = (name) => page.locator(`#channels tbody tr[data-channel="${name}"]`);

  /** `until`, with what was last seen (`shown()`) in the error when it times out. */
  async function untilSeen(predicate, what, shown, timeout = QUICK) {
    try {
      await until(predicate, what, timeout);
    } catch (error) {
      throw new Error(`${error.message} (last seen: ${await shown()})`);
    }
  }

  async function waitForStatus(want, timeout = QUICK) {
    await untilSeen(async () => (await state()) === want, `#status data-state "${want}"`, state, timeout);
  }

  async function waitForNumber(id, want, timeout = QUICK) {
    await untilSeen(async () => (await number(id)) === want, `#${id} to show ${want}`, () => text(id), timeout);
  }

  async function signIn(key) {
    await page.locator('#api-key').fill(key);
    await page.locator('#connect-button').click();
  }

  /** Pixels with any ink on the canvas. */
  const ink = (id) => page.evaluate((canvasId) => {
    const canvas = document.getElementById(canvasId);
    const { data } = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height);
    let n = 0;
    for (let i = 3; i < data.length; i += 4) if (data[i] > 0) n++;
    return n;
  }, id);

  before(async () => {
    await server.start();
    browser = await launchBrowser();
    ({ context, page, errors: pageErrors } = await openPage(browser, `${server.base}/admin?interval=250`));
    page.on('console', (message) => {
      if (message.type() === 'error') consoleErrors.push({ phase, text: message.text() });
    });
  });

  after(async () => {
    for (const socket of sockets) socket.terminate();
    await context?.close().catch(() => {});
    await browser?.close().catch(() => {});
    await server.close();
  });

  test('serves the page, self-contained', async () => {
    const response = await fetch(`${server.base}/admin`);
    assert.equal(response.status, 200);
    assert.match(response.headers.get('content-type'), /^text\/html/);
    const html = await response.text();
    assert.match(html, /<meta name="viewport"/);
    assert.doesNotMatch(html, /<(script|link|img)[^>]+(src|href)=["']?(https?:)?\/\//i,
      'the page must not load anything from elsewhere');
    assert.doesNotMatch(html, /url\(\s*["']?(https?:)?\/\//i, 'no stylesheet resources from elsewhere');
    assert.doesNotMatch(html, /innerHTML|insertAdjacentHTML|document\.write/, 'text only through textContent');
  });

  test('the shared stylesheet /plexus.css is served and applied', async () => {
    const response = await fetch(`${server.base}/plexus.css`);
    assert.equal(response.status, 200);
    assert.match(response.headers.get('content-type'), /^text\/css/);
    assert.match(await response.text(), /--bg:/);
    const { token, background } = await page.evaluate(() => ({
      token: getComputedStyle(document.documentElement).getPropertyValue('--bg').trim(),
      background: getComputedStyle(document.body).backgroundColor,
    }));
    assert.match(token, /^#[0-9a-f]{6}$/i, 'the --bg token comes from /plexus.css');
    const [r, g, b] = [1, 3, 5].map((i) => parseInt(token.slice(i, i + 2), 16));
    assert.equal(background, `rgb(${r}, ${g}, ${b})`);
  });

  test('a wrong key is refused; the right one connects', async () => {
    assert.equal(await state(), 'signed-out');
    assert.ok(await page.locator('#sign-in').isVisible());
    assert.ok(await page.locator('#dashboard').isHidden());
    assert.match(await page.locator('#sign-in').textContent(), /api_key/);
    assert.equal(await page.getByLabel('API key').getAttribute('type'), 'password');

    phase = 'wrong-key';
    await signIn('not-the-key');
    await page.locator('#auth-error').filter({ hasText: 'wrong API key' }).waitFor({ timeout: QUICK });
    await sleep(600); // a few poll intervals: nothing goes ahead on its own
    assert.equal(await state(), 'signed-out');
    assert.ok(await page.locator('#dashboard').isHidden());
    assert.equal(await page.evaluate(() => sessionStorage.getItem('plexus-admin-key')), null);
    phase = 'signed-in';

    await signIn(API_KEY);
    await waitForStatus('connected');
    assert.equal(await page.locator('#auth-error').textContent(), '');
    assert.ok(await page.locator('#sign-in').isHidden());
    await waitForNumber('node-count', 1);
    await waitForNumber('total-clients', 0);
    // One row in the nodes table, the server's own node.
    const { nodes } = await server.api('info', {});
    const rows = page.locator('#nodes tbody tr');
    await until(async () => (await rows.count()) === 1, 'one node row');
    assert.equal(await rows.first().getAttribute('data-uid'), nodes[0].uid);
    const cells = await rows.first().locator('td').allTextContents();
    assert.match(cells[0], new RegExp(`^${nodes[0].name}`));
    assert.equal(cells[1], nodes[0].version);
    assert.match(cells[6], /^(\d+s|\d+m \d+s)$/, `uptime "${cells[6]}"`);
  });

  test('clients and channels follow raw WebSocket members', async () => {
    const alice = await member(ROOM);
    const bob = await member(ROOM);
    await waitForNumber('total-clients', 2);
    await waitForNumber('total-channels', 1);
    await waitForNumber('total-subs', 2);
    const row = channelRow(CHANNEL);
    await row.waitFor({ timeout: QUICK });
    await until(async () => (await row.locator('td').allTextContents()).join('|') === `${CHANNEL}|2`,
      'the channel row with 2 clients');
    const nodeCells = await page.locator('#nodes tbody tr').first().locator('td').allTextContents();
    assert.equal(nodeCells[2], '2', 'the node has 2 clients');

    // The filter goes to the server as a glob.
    await page.getByLabel('Filter').fill('quotes:*');
    await until(async () => (await row.count()) === 0, 'the chat channel filtered out');
    assert.match(await page.locator('#channels tbody').textContent(), /no channel matches quotes:\*/);
    await page.getByLabel('Filter').fill('chat:admin*');
    await row.waitFor({ timeout: QUICK });
    await page.getByLabel('Filter').fill('');

    bob.close();
    await waitForNumber('total-clients', 1);
    await until(async () => (await row.locator('td').nth(1).textContent()) === '1', 'the channel row with 1 client');
    assert.equal(alice.readyState, WebSocket.OPEN);
  });

  test('traffic shows in the rates and the charts', async () => {
    const alice = sockets[0];
    const before = { clients: await points('chart-clients'), deliveries: await points('chart-deliveries') };
    const seen = { deliveries: 0, in: 0, out: 0, publications: 0, commit: '' };
    let n = 0;
    const sender = setInterval(() => alice.send(`load ${n++}`), 40);
    try {
      await untilSeen(async () => {
        seen.deliveries = Math.max(seen.deliveries, (await number('rate-deliveries')) || 0);
        seen.in = Math.max(seen.in, (await number('rate-in')) || 0);
        seen.out = Math.max(seen.out, (await number('rate-out')) || 0);
        seen.publications = Math.max(seen.publications, (await number('rate-publications')) || 0);
        const commit = await text('commit-latency');
        if (/^\d[\d,]*\.\d\d$/.test(commit)) seen.commit = commit;
        return seen.deliveries > 0 && seen.in > 0 && seen.out > 0 && seen.publications > 0 && seen.commit;
      }, 'positive rates and a commit latency', async () => JSON.stringify(seen), 10_000);
    } finally {
      clearInterval(sender);
    }
    assert.ok(n > 0 && alice.received.length > 0, 'the room echoed the messages');
    assert.ok(await page.locator('#commit-card').isVisible(), 'the durable engine has a commit latency card');

    await until(async () => (await points('chart-clients')) >= before.clients + 3
      && (await points('chart-deliveries')) >= before.deliveries + 3, 'the charts to get points');
    for (const id of ['chart-clients', 'chart-deliveries']) {
      const canvas = page.locator(`#${id}`);
      const size = await canvas.evaluate((c) => ({ width: c.width, clientWidth: c.clientWidth, dpr: devicePixelRatio }));
      assert.equal(size.width, Math.round(size.clientWidth * size.dpr), `${id} is drawn at device pixels`);
      const inked = await ink(id);
      assert.ok(inked > 1000, `${id}: only ${inked} pixels drawn`);
    }
    assert.match(await page.locator('#legend-deliveries').textContent(), /max [1-9]/);
    await shot(page, 'admin');
  });

  test('publishes from the form; invalid JSON is refused before sending', async () => {
    const alice = sockets[0];
    await sleep(300); // the echoes of the traffic test are in
    alice.received.length = 0;

    await page.getByLabel('Channel', { exact: true }).fill(CHANNEL);
    await page.getByLabel('Data (JSON)').fill('{"text": "from admin"}');
    await page.getByRole('button', { name: 'Publish' }).click();
    const result = page.locator('#publish-result');
    await result.filter({ hasText: /published at offset \d+/ }).waitFor({ timeout: QUICK });
    const offset = Number((await result.textContent()).match(/offset (\d+)/)[1]);
    assert.equal(offset, await server.offset(CHANNEL));
    assert.equal(await result.getAttribute('data-state'), 'ok');
    await until(async () => alice.received.length >= 1, 'the member to get the publication');
    await sleep(300);
    assert.deepEqual(alice.received, ['{"text":"from admin"}']);

    alice.received.length = 0;
    await page.getByLabel('Data (JSON)').fill('{"text": "half');
    await page.getByRole('button', { name: 'Publish' }).click();
    await result.filter({ hasText: /invalid JSON/ }).waitFor({ timeout: QUICK });
    assert.equal(await result.getAttribute('data-state'), 'error');
    assert.equal(await page.getByLabel('Data (JSON)').getAttribute('aria-invalid'), 'true');
    await sleep(500);
    assert.equal(await server.offset(CHANNEL), offset, 'nothing was published');
    assert.deepEqual(alice.received, []);

    // A refusal of the server is shown as it is.
    await page.getByLabel('Channel', { exact: true }).fill('nosuchnamespace:x');
    await page.getByLabel('Data (JSON)').fill('1');
    await page.getByRole('button', { name: 'Publish' }).click();
    await result.filter({ hasText: /^error \d+: / }).waitFor({ timeout: QUICK });
  });

  test('fits a 360 px wide screen', async () => {
    await page.setViewportSize({ width: 360, height: 740 });
    await sleep(300);
    const overflow = await page.evaluate(
      () => document.documentElement.scrollWidth - document.documentElement.clientWidth,
    );
    assert.ok(overflow <= 0, `page is ${overflow}px wider than the screen`);
    // The charts follow the width.
    const width = await page.locator('#chart-clients').evaluate((c) => c.clientWidth);
    assert.ok(width > 200 && width <= 360, `chart is ${width}px wide`);
    await until(async () => (await ink('chart-clients')) > 500, 'the narrow chart redrawn');
    await shot(page, 'admin-phone');
    await page.setViewportSize({ width: 1100, height: 760 });
  });

  test('a reload stays signed in; sign out forgets the key', async () => {
    await page.reload();
    await waitForStatus('connected');
    assert.ok(await page.locator('#sign-in').isHidden());
    await waitForNumber('node-count', 1);
    await waitForNumber('total-clients', 1);
    assert.equal(await page.evaluate(() => localStorage.length), 0, 'the key is not kept beyond the tab');

    await page.getByRole('button', { name: 'Sign out' }).click();
    await waitForStatus('signed-out');
    assert.ok(await page.locator('#sign-in').isVisible());
    assert.ok(await page.locator('#dashboard').isHidden());
    assert.ok(await page.locator('#sign-out').isHidden());
    assert.equal(await page.evaluate(() => sessionStorage.getItem('plexus-admin-key')), null);
    await page.reload();
    await sleep(500);
    assert.equal(await state(), 'signed-out');
    assert.ok(await page.locator('#sign-in').isVisible());

    await signIn(API_KEY);
    await waitForStatus('connected');
  });

  test('shows the server down, and recovers by itself when it is back', async () => {
    phase = 'server-down';
    await server.kill();
    await waitForStatus('error');
    assert.notEqual(await text('status-detail'), '');
    assert.equal(await text('rate-deliveries'), '—');
    await sleep(600); // still polling while it is down
    assert.equal(await state(), 'error');

    await server.start();
    await waitForStatus('connected', RECONNECT);
    phase = 'back';
    await waitForNumber('node-count', 1);
    await waitForNumber('total-clients', 0); // the crash dropped the raw members
    const member2 = await member(ROOM);
    await waitForNumber('total-clients', 1);
    await channelRow(CHANNEL).waitFor({ timeout: QUICK });
    member2.close();
  });

  test('no errors in the page', async () => {
    assert.deepEqual(pageErrors, []);
    const unexpected = consoleErrors.filter(({ phase: when, text: what }) => !(
      (when === 'wrong-key' && /status of 401/.test(what))
      || (when === 'server-down' && /Failed to load resource: net::ERR_CONNECTION_(REFUSED|RESET)/.test(what))
    ));
    assert.deepEqual(unexpected, []);
    assert.ok(consoleErrors.some(({ phase: when }) => when === 'server-down'),
      'the failed polls while the server was down were seen (the check can fail)');
  });
});
