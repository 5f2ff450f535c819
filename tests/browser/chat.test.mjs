// Browser tests of the chat page at GET / (crates/plexus-server/static/index.html), which runs
// on plexus.js: history, presence, pending messages, reconnect and recovery after a crash.
//
//   cd tests/browser && npm install && npm test

import { after, before, describe, test } from 'node:test';
import WebSocket from 'ws';
import {
  assert, gate, launchBrowser, messageTexts, messageWith, openPage, QUICK, RECONNECT, say, Server, shot,
  sleep, until, waitForMessage, waitForState,
} from './lib/harness.mjs';

describe('chat page', { timeout: 90_000 }, () => {
  const server = new Server('chat');
  let browser;
  const contexts = [];
  const sockets = [];

  async function chat(query, viewport) {
    const opened = await openPage(browser, `${server.base}/${query}`, viewport);
    contexts.push(opened.context);
    return opened;
  }

  before(async () => {
    await server.start();
    browser = await launchBrowser();
  });

  after(async () => {
    for (const socket of sockets) socket.terminate();
    for (const context of contexts) await context.close().catch(() => {});
    await browser?.close().catch(() => {});
    await server.close();
  });

  test('serves the page, self-contained', async () => {
    const response = await fetch(`${server.base}/`);
    assert.equal(response.status, 200);
    assert.match(response.headers.get('content-type'), /^text\/html/);
    const html = await response.text();
    assert.match(html, /<meta name="viewport"/);
    assert.match(html, /import \{[^}]*Plexus[^}]*\} from '\/plexus\.js'/);
    assert.match(html, /href="\/quotes"/);
    assert.doesNotMatch(html, /<(script|link|img)[^>]+(src|href)=["']?(https?:)?\/\//i,
      'the page must not load anything from elsewhere');
    assert.doesNotMatch(html, /innerHTML|insertAdjacentHTML|document\.write/, 'text only through textContent');
  });

  test('two people chat: history on join, messages both ways, presence', async () => {
    const room = 'two-people';
    // Some history before anyone joins, in the shapes the page must render.
    await server.publish(`chat:${room}`, { name: 'api', text: 'welcome to the room' });
    await server.publish(`chat:${room}`, 'bob: hi from a raw client');
    await server.publish(`chat:${room}`, { kind: 'other', n: 1 });

    const alice = await chat(`?room=${room}&name=alice`);
    const bob = await chat(`?room=${room}&name=bob`, { width: 390, height: 844 }); // a phone
    await waitForState(alice.page, 'connected');
    await waitForState(bob.page, 'connected');
    assert.equal(await alice.page.locator('#room').inputValue(), room);
    assert.equal(await bob.page.locator('#nick').inputValue(), 'bob');
    for (const { page } of [alice, bob]) {
      assert.match(await page.locator('#transport').textContent(), /WebSocket/);
      await waitForMessage(page, ['welcome to the room']);
      assert.deepEqual((await messageTexts(page)).slice(0, 3),
        ['welcome to the room', 'bob: hi from a raw client', '{"kind":"other","n":1}']);
      assert.equal(await messageWith(page, 'welcome to the room').locator('.nick').textContent(), 'api');
      assert.equal(await messageWith(page, 'bob: hi from a raw client').locator('.nick').count(), 0);
    }

    // Both are listed as online on both pages.
    for (const { page } of [alice, bob]) {
      await until(async () => {
        const names = await page.locator('#online .who').allTextContents();
        return names.includes('alice') && names.includes('bob');
      }, 'alice and bob both online');
    }

    await say(alice.page, 'hello from alice');
    for (const { page } of [alice, bob]) {
      const line = await waitForMessage(page, ['hello from alice']);
      await until(async () => (await line.getAttribute('class')).split(' ').includes('pending') === false, 'not pending');
      assert.equal(await line.locator('.nick').textContent(), 'alice');
    }
    assert.equal(await alice.page.getByLabel('Message').inputValue(), '', 'the box is cleared after sending');
    assert.match(await messageWith(alice.page, 'hello from alice').getAttribute('class'), /\bmine\b/);
    assert.doesNotMatch(await messageWith(bob.page, 'hello from alice').getAttribute('class'), /\bmine\b/);

    await say(bob.page, 'hi alice, bob here');
    await waitForMessage(alice.page, ['hi alice, bob here']);
    await waitForMessage(bob.page, ['hi alice, bob here']);

    // Text is shown as text, never parsed as HTML.
    const nasty = '<img src=x onerror="window.pwned=1"><b>not bold</b>';
    await say(alice.page, nasty);
    const line = await waitForMessage(bob.page, ['<img src=x']);
    assert.equal(await line.locator('.text').textContent(), nasty);
    assert.equal(await bob.page.locator('#messages img, #messages b').count(), 0);
    assert.equal(await bob.page.evaluate(() => window.pwned), undefined);

    // Each message once, in the same order on both pages and in the server's history.
    const history = (await server.history(`chat:${room}`)).map((pub) =>
      typeof pub.data === 'string' ? pub.data : pub.data.text ?? JSON.stringify(pub.data));
    await until(async () => (await messageTexts(bob.page)).length === history.length, 'bob to show every message');
    assert.deepEqual(await messageTexts(alice.page), history);
    assert.deepEqual(await messageTexts(bob.page), history);

    // A latecomer gets the history, and the others see them arrive.
    const carl = await chat(`?room=${room}&name=carl`);
    await waitForState(carl.page, 'connected');
    await until(async () => (await messageTexts(carl.page)).length === history.length, 'carl to get the history');
    assert.deepEqual(await messageTexts(carl.page), history);
    await until(async () => (await alice.page.locator('#online .who').allTextContents()).includes('carl'), 'carl online');
    await carl.context.close();
    await until(async () => !(await alice.page.locator('#online .who').allTextContents()).includes('carl'),
      'carl gone from the online list after leaving');

    await shot(alice.page, 'chat-alice');
    await shot(bob.page, 'chat-bob-phone');
    // Nothing scrolls sideways on a phone-sized screen.
    const overflow = await bob.page.evaluate(
      () => document.documentElement.scrollWidth - document.documentElement.clientWidth,
    );
    assert.ok(overflow <= 0, `page is ${overflow}px wider than a phone screen`);
    assert.deepEqual([...alice.errors, ...bob.errors, ...carl.errors], []);
  });

  test('a raw WebSocket client and the page share the room', async () => {
    const room = 'raw-and-page';
    const { page, errors } = await chat(`?room=${room}&name=carol`);
    await waitForState(page, 'connected');
    const raw = await new Promise((resolve, reject) => {
      const socket = new WebSocket(`ws://127.0.0.1:${server.port}/chat/${room}`);
      const received = [];
      socket.on('message', (data, isBinary) => received.push(isBinary ? data : data.toString()));
      socket.once('open', () => resolve({ socket, received }));
      socket.once('error', reject);
    });
    sockets.push(raw.socket);

    raw.socket.send('dave: from raw');
    const line = await waitForMessage(page, ['dave: from raw']);
    assert.equal(await line.locator('.text').textContent(), 'dave: from raw');

    await say(page, 'carol says hi');
    await until(() => raw.received.some((text) => {
      try {
        const data = JSON.parse(text);
        return data.name === 'carol' && data.text === 'carol says hi';
      } catch {
        return false;
      }
    }), 'the raw client to receive {"name":"carol","text":"carol says hi"}');
    assert.deepEqual(errors, []);
  });

  test('bad room names are refused in the page', async () => {
    const { page } = await chat(`?room=${encodeURIComponent('no spaces!')}&name=dave`);
    await page.locator('#join-error').filter({ hasText: 'Room' }).waitFor({ timeout: QUICK });
    assert.equal(await page.locator('#state').textContent(), 'offline');
    assert.equal(await page.locator('#room').getAttribute('aria-invalid'), 'true');
    // Fixing it joins.
    await page.locator('#room').fill('fixed-room');
    await page.getByRole('button', { name: 'Join' }).click();
    await waitForState(page, 'connected');
    assert.match(page.url(), /[?&]room=fixed-room&name=dave$/);
  });

  test('after a crash and restart the page reconnects by itself and shows every message once, in order', async () => {
    const room = 'crash';
    const channel = `chat:${room}`;
    const { page, errors } = await chat(`?room=${room}&name=erin`);
    await waitForState(page, 'connected');

    await server.publish(channel, { name: 'api', text: 'm1' });
    await server.publish(channel, { name: 'api', text: 'm2' });
    await waitForMessage(page, ['m2']);

    await server.kill(); // SIGKILL
    await waitForState(page, 'reconnecting');
    await shot(page, 'chat-reconnecting');

    await server.start(); // same port, same data dir
    // Published before the page is back (most likely): recovered on resubscribe.
    await server.publish(channel, { name: 'api', text: 'm3' });
    await server.publish(channel, { name: 'api', text: 'm4' });
    await waitForState(page, 'connected', RECONNECT);
    await server.publish(channel, { name: 'api', text: 'm5' }); // live
    await waitForMessage(page, ['m5']);
    await sleep(300); // a duplicate would show up by now

    assert.deepEqual(await messageTexts(page), ['m1', 'm2', 'm3', 'm4', 'm5']);
    assert.equal(await page.locator('.notice', { hasText: 'could not be recovered' }).count(), 0,
      'nothing was lost: no gap notice');
    await shot(page, 'chat-recovered');
    assert.deepEqual(errors, []);
  });

  test('a message typed while the server is down is pending, then delivered after the restart', async () => {
    const room = 'offline-queue';
    const channel = `chat:${room}`;
    const writer = await chat(`?room=${room}&name=frank`);
    const reader = await chat(`?room=${room}&name=gina`);
    await waitForState(writer.page, 'connected');
    await waitForState(reader.page, 'connected');

    await server.kill();
    await waitForState(writer.page, 'reconnecting');
    await say(writer.page, 'typed while offline');
    const pending = messageWith(writer.page, 'typed while offline');
    await pending.waitFor({ timeout: QUICK });
    assert.match(await pending.getAttribute('class'), /\bpending\b/);
    assert.match(await pending.textContent(), /waiting for connection/);
    assert.match(await writer.page.locator('#queue-note').textContent(), /1 message will be sent/);
    await shot(writer.page, 'chat-pending');

    await server.start();
    await waitForState(writer.page, 'connected', RECONNECT);
    // Confirmed: the pending copy is replaced by the publication with its offset.
    await writer.page.locator('#messages .message[data-offset]', { hasText: 'typed while offline' })
      .waitFor({ timeout: QUICK });
    assert.equal(await writer.page.locator('#messages .message.pending').count(), 0);
    assert.equal(await writer.page.locator('#messages .message', { hasText: 'typed while offline' }).count(), 1);
    assert.equal(await writer.page.locator('#queue-note').textContent(), '');
    await waitForMessage(reader.page, ['frank', 'typed while offline'], RECONNECT);

    const stored = (await server.history(channel)).filter((pub) => pub.data?.text === 'typed while offline');
    assert.equal(stored.length, 1, 'published exactly once');
    assert.deepEqual(stored[0].data, { name: 'frank', text: 'typed while offline' });
    await shot(writer.page, 'chat-pending-delivered');
    assert.deepEqual([...writer.errors, ...reader.errors], []);
  });

  test('a gap that cannot be recovered is announced, and the latest history is shown', async () => {
    const room = 'gap';
    const channel = `chat:${room}`;
    const door = await gate(server.port);
    try {
      const { page, errors } = await openPage(browser, `${door.base}/?room=${room}&name=kim`);
      contexts.push(page.context());
      await waitForState(page, 'connected');
      await server.publish(channel, { name: 'api', text: 'before the gap' });
      await waitForMessage(page, ['before the gap']);

      door.cut();
      await waitForState(page, 'reconnecting');
      // More than the channel keeps (history_size 100) while the page is away.
      const commands = Array.from({ length: 120 }, (_, i) => ({ publish: { channel, data: { name: 'api', text: `missed ${i + 1}` } } }));
      await server.api('batch', { commands });
      door.restore();

      await waitForState(page, 'connected', RECONNECT);
      const notice = page.locator('#messages .notice', { hasText: 'could not be recovered' });
      await notice.waitFor({ timeout: QUICK });
      await waitForMessage(page, ['missed 120']);
      const texts = await messageTexts(page);
      // What was shown stays, then the last 50 of the channel, in order, each once.
      const last50 = Array.from({ length: 50 }, (_, i) => `missed ${71 + i}`);
      assert.deepEqual(texts, ['before the gap', ...last50]);
      // The notice sits in the gap: after the old message, before the new ones.
      const order = await page.locator('#messages > li').evaluateAll((items) =>
        items.map((li) => (li.classList.contains('notice') ? 'NOTICE' : li.querySelector('.text').textContent)));
      assert.deepEqual(order.slice(0, 3), ['before the gap', 'NOTICE', 'missed 71']);
      await shot(page, 'chat-gap');
      assert.deepEqual(errors, []);
    } finally {
      await door.close();
    }
  });
});
