// plexus.js against the real server (target/debug/plexus, built when missing; PLEXUS_BIN to
// override): connect with a minted HS256 token over `ws`, subscribe, receive a publication from
// the server API, and recover what was published while the server had disconnected the client.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import WebSocket from 'ws';
import { PLEXUS_JS } from './lib/fakes.mjs';
import { NodeEventSource, Server, sleep, token, until } from './lib/server.mjs';

const { Plexus } = await import(PLEXUS_JS);

describe('against the real server', () => {
  let server;
  const clients = [];
  before(async () => {
    server = await Server.start();
  });
  after(async () => {
    for (const client of clients) client.disconnect();
    await server?.stop();
  });

  function newClient(options = {}) {
    const client = new Plexus(server.ws, { websocket: WebSocket, name: 'plexusjs-test', ...options });
    const log = [];
    for (const name of ['state', 'connecting', 'connected', 'disconnected', 'error']) {
      client.on(name, (ctx) => log.push([name, ctx]));
    }
    client.log = log;
    clients.push(client);
    return client;
  }

  const connected = (client) => until(() => client.state === 'connected', `connected; events ${JSON.stringify(client.log)}`);

  test('subscribe, receive an API publication, recover 3 missed after a forced reconnect', async () => {
    // A reconnect delay of about 1 s, so the 3 publications land while the client is away.
    const client = newClient({ token: token('u1'), minReconnectDelay: 1000, random: () => 0.999 });
    const sub = client.newSubscription('chat:x');
    const seen = [];
    sub.on('publication', (ctx) => seen.push(['publication', ctx.data, ctx.offset]));
    sub.on('subscribed', (ctx) => seen.push(['subscribed', ctx]));
    sub.subscribe();
    client.connect();
    await connected(client);
    assert.equal(client.transport, 'websocket');
    await until(() => sub.state === 'subscribed', 'subscribed');

    await server.api('publish', { channel: 'chat:x', data: { n: 0 } });
    await until(() => seen.some(([kind, data]) => kind === 'publication' && data?.n === 0), 'the API publication');
    assert.deepEqual(await client.publish('chat:x', { n: 'own' }), {});
    await until(() => seen.some(([kind, data]) => kind === 'publication' && data?.n === 'own'), 'our own publication');
    const position = sub.position;
    assert.ok(position.epoch, 'the channel has a position');

    const away = new Promise((resolve) => client.once('connecting', resolve));
    await server.api('disconnect', { user: 'u1', disconnect: { code: 3011, reason: 'force reconnect' } });
    assert.deepEqual(await away, { code: 3011, reason: 'force reconnect' });
    for (const n of [1, 2, 3]) await server.api('publish', { channel: 'chat:x', data: { n } });
    await until(() => seen.filter(([kind, data]) => kind === 'publication' && [1, 2, 3].includes(data?.n)).length === 3, 'the 3 recovered publications', 8000);

    const resubscribed = seen.findIndex(([kind, ctx]) => kind === 'subscribed' && ctx.wasRecovering);
    assert.ok(resubscribed > 0, 'resubscribed with recovery');
    const { recovered, wasRecovering, position: after } = seen[resubscribed][1];
    assert.equal(wasRecovering, true);
    assert.equal(recovered, true);
    assert.equal(after.epoch, position.epoch);
    assert.deepEqual(seen.slice(resubscribed + 1).map(([, data, offset]) => [data.n, offset]), [
      [1, position.offset + 1], [2, position.offset + 2], [3, position.offset + 3],
    ]);

    const history = await sub.history({ limit: -1 });
    assert.deepEqual(history.publications.map((p) => p.data.n), [0, 'own', 1, 2, 3]);
    const stats = await sub.presenceStats();
    assert.deepEqual(stats, { numClients: 1, numUsers: 1 });
    await assert.rejects(client.rpc('anything', {}), { code: 108 });
    client.disconnect();
  });

  test('delta compression: publications rebuilt from Fossil deltas, live and after a recovering reconnect', async () => {
    // The built-in quotes namespace allows deltas; its demo publisher adds prices of its own
    // while the channel is watched, which the deltas chain through as well.
    const frames = [];
    class CountingWebSocket extends WebSocket {
      constructor(...args) {
        super(...args);
        this.addEventListener('message', (event) => frames.push(String(event.data)));
      }
    }
    const client = newClient({ token: token('u9'), websocket: CountingWebSocket, minReconnectDelay: 1000, random: () => 0.999 });
    const sub = client.newSubscription('quotes:PLEXUSJS', { delta: 'fossil' });
    const seen = [];
    sub.on('publication', (ctx) => {
      if (ctx.data?.kind === 'test') seen.push(ctx.data);
    });
    const errors = [];
    sub.on('error', (ctx) => errors.push(ctx));
    sub.subscribe();
    client.connect();
    await connected(client);
    await until(() => sub.state === 'subscribed', 'subscribed');
    const doc = (n) => ({ kind: 'test', name: 'Ёлка — €', n, rows: Array.from({ length: 8 }, (_, i) => ({ i, v: n * 10 + i })) });
    for (const n of [1, 2, 3, 4, 5]) await server.api('publish', { channel: 'quotes:PLEXUSJS', data: doc(n) });
    await until(() => seen.length === 5, 'five publications');
    assert.deepEqual(seen, [1, 2, 3, 4, 5].map(doc));
    const deltas = () => frames.filter((frame) => frame.includes('"delta":true')).length;
    assert.ok(deltas() >= 4, `deltas on the wire: ${deltas()}`);

    const away = new Promise((resolve) => client.once('connecting', resolve));
    await server.api('disconnect', { user: 'u9', disconnect: { code: 3011, reason: 'force reconnect' } });
    await away;
    for (const n of [6, 7, 8]) await server.api('publish', { channel: 'quotes:PLEXUSJS', data: doc(n) });
    await until(() => seen.length === 8, 'the three missed, recovered', 8000);
    await server.api('publish', { channel: 'quotes:PLEXUSJS', data: doc(9) });
    await until(() => seen.length === 9, 'one more live');
    assert.deepEqual(seen, [1, 2, 3, 4, 5, 6, 7, 8, 9].map(doc));
    assert.deepEqual(errors, []);
    client.disconnect();
  });

  test('a forged token stops the client with 3500', async () => {
    const client = newClient({ token: `${token('u2')}x` });
    const stopped = new Promise((resolve) => client.once('disconnected', resolve));
    client.connect();
    const { code } = await stopped;
    assert.equal(code, 3500);
    assert.equal(client.state, 'disconnected');
  });

  test('an expired token: error 109, getToken, connected', async () => {
    let asked = 0;
    const client = newClient({ token: token('u3', -60), getToken: async () => { asked++; return token('u3'); } });
    client.connect();
    await connected(client);
    assert.equal(asked, 1);
    assert.ok(client.log.some(([name, ctx]) => name === 'error' && ctx.error.code === 109));
    client.disconnect();
  });

  test('server pings are answered: with a 1 s ping and pong timeout the connection lives on', async () => {
    const fast = await Server.start(['--ping-interval', '1s', '--pong-timeout', '1s']);
    try {
      const client = new Plexus(fast.ws, { websocket: WebSocket, token: token('u5') });
      clients.push(client);
      const events = [];
      client.on('connecting', (ctx) => events.push(ctx));
      client.connect();
      await until(() => client.state === 'connected', 'connected');
      const id = client.client;
      await sleep(3500);
      assert.equal(client.state, 'connected');
      assert.equal(client.client, id, 'the same connection');
      assert.deepEqual(events, [{ code: 0, reason: 'connect called' }]);
      client.disconnect();
    } finally {
      await fast.stop();
    }
  });

  for (const transport of ['sse', 'http_stream']) {
    test(`WebSocket refused → ${transport}: subscribe, publish, receive`, async (t) => {
      const probe = await fetch(`${server.http}/connection/${transport}`, { method: transport === 'sse' ? 'GET' : 'POST' });
      await probe.body?.cancel();
      if (probe.status === 404) {
        t.skip(`this server has no /connection/${transport}`);
        return;
      }
      const client = newClient({
        token: token('u4'),
        transports: [
          { transport: 'websocket', endpoint: server.ws.replace(/\d+\/connection/, '1/connection') }, // nothing listens on port 1
          { transport, endpoint: `${server.http}/connection/${transport}` },
        ],
        eventsource: NodeEventSource,
        debug: !!process.env.DEBUG,
      });
      const sub = client.newSubscription(`chat:${transport}`);
      const seen = [];
      sub.on('publication', (ctx) => seen.push(ctx.data));
      sub.subscribe();
      client.connect();
      await connected(client);
      assert.equal(client.transport, transport);
      await until(() => sub.state === 'subscribed', 'subscribed');
      assert.deepEqual(await sub.publish({ via: transport }), {});
      await server.api('publish', { channel: `chat:${transport}`, data: { via: 'api' } });
      await until(() => seen.length === 2, 'both publications');
      assert.deepEqual(seen, [{ via: transport }, { via: 'api' }]);
      client.disconnect();
      await sleep(50);
    });
  }
});
