// The chat page when WebSocket upgrades are refused (as by some proxies): it falls back to SSE
// (or HTTP streaming) through plexus.js and the chat works both ways.

import { after, before, describe, test } from 'node:test';
import {
  assert, launchBrowser, messageTexts, messageWith, openPage, QUICK, RECONNECT, say, Server, shot,
  until, waitForMessage, waitForState, wsBlockingProxy,
} from './lib/harness.mjs';

describe('chat page without WebSocket', { timeout: 60_000 }, () => {
  const server = new Server('fallback');
  let proxy;
  let browser;
  const contexts = [];

  before(async () => {
    await server.start();
    proxy = await wsBlockingProxy(server.port);
    browser = await launchBrowser();
  });

  after(async () => {
    for (const context of contexts) await context.close().catch(() => {});
    await browser?.close().catch(() => {});
    await proxy?.close();
    await server.close();
  });

  test('falls back to a streaming transport and chats both ways', async () => {
    const room = 'no-websocket';
    const channel = `chat:${room}`;
    const hana = await openPage(browser, `${proxy.base}/?room=${room}&name=hana`);
    const ivan = await openPage(browser, `${server.base}/?room=${room}&name=ivan`, { width: 390, height: 760 });
    contexts.push(hana.context, ivan.context);
    await waitForState(hana.page, 'connected', 10_000);
    await waitForState(ivan.page, 'connected');
    assert.ok(proxy.upgradesRefused.count >= 1, 'the page tried WebSocket first');

    const transport = await hana.page.locator('#transport').getAttribute('data-transport');
    assert.ok(['sse', 'http_stream'].includes(transport), `transport is ${transport}`);
    assert.match(await hana.page.locator('#transport').textContent(), /SSE|HTTP streaming/);
    assert.equal(await ivan.page.locator('#transport').getAttribute('data-transport'), 'websocket');

    // Page (SSE) → the other page and the server's history.
    await say(hana.page, 'sent over the fallback');
    await waitForMessage(ivan.page, ['hana', 'sent over the fallback']);
    await hana.page.locator('#messages .message[data-offset]', { hasText: 'sent over the fallback' })
      .waitFor({ timeout: QUICK });
    const stored = await server.history(channel);
    assert.deepEqual(stored.map((pub) => pub.data), [{ name: 'hana', text: 'sent over the fallback' }]);

    // API and the other page → page (SSE).
    await server.publish(channel, { name: 'api', text: 'from the server API' });
    await waitForMessage(hana.page, ['api', 'from the server API']);
    await say(ivan.page, 'ivan over websocket');
    await waitForMessage(hana.page, ['ivan', 'ivan over websocket']);

    // Presence works over the fallback too.
    await until(async () => {
      const names = await hana.page.locator('#online .who').allTextContents();
      return names.includes('hana') && names.includes('ivan');
    }, 'hana and ivan online');
    assert.equal(await messageWith(hana.page, 'sent over the fallback').count(), 1);
    await shot(hana.page, 'fallback-hana-sse');
    await shot(ivan.page, 'fallback-ivan-phone');

    // A crash: the page comes back over the same fallback and recovers what it missed.
    await server.kill();
    await waitForState(hana.page, 'reconnecting');
    await server.start();
    await server.publish(channel, { name: 'api', text: 'while the stream was down' });
    await waitForState(hana.page, 'connected', RECONNECT);
    await waitForMessage(hana.page, ['while the stream was down']);
    await say(hana.page, 'still over the fallback');
    await waitForMessage(ivan.page, ['hana', 'still over the fallback'], RECONNECT);
    assert.equal(await hana.page.locator('#transport').getAttribute('data-transport'), transport);
    assert.deepEqual(await messageTexts(hana.page), [
      'sent over the fallback', 'from the server API', 'ivan over websocket',
      'while the stream was down', 'still over the fallback',
    ]);
    assert.deepEqual([...hana.errors, ...ivan.errors], []);
  });
});
