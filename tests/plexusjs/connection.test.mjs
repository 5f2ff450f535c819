// Connection behaviour of plexus.js on a fake clock and a fake WebSocket: backoff, watchdog,
// disconnect codes, tokens, commands (timeout, batching, offline queue).

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { PLEXUS_JS, acceptConnect, flush, makeClient } from './lib/fakes.mjs';

const { Plexus, backoff, ErrorCode, ClientCode, PlexusError } = await import(PLEXUS_JS);

describe('backoff', () => {
  test('full jitter stays within [0, min(max, min * 2^attempt)]', () => {
    for (let attempt = 0; attempt < 12; attempt++) {
      const cap = Math.min(20000, 500 * 2 ** attempt);
      assert.equal(backoff(attempt, 500, 20000, () => 0), 0);
      assert.equal(backoff(attempt, 500, 20000, () => 0.9999999), cap);
      for (let i = 0; i < 50; i++) {
        const delay = backoff(attempt, 500, 20000);
        assert.ok(delay >= 0 && delay <= cap, `attempt ${attempt}: ${delay} not in [0, ${cap}]`);
      }
    }
    assert.equal(backoff(1000, 500, 20000, () => 0.9999999), 20000, 'huge attempt counts stay capped');
  });

  test('the client waits a jittered delay whose cap doubles up to the max, and resets after a connect', async () => {
    const { client, clock, sockets } = await makeClient(Plexus, { random: () => 0.9999999 });
    client.connect();
    const delays = [];
    for (let i = 0; i < 8; i++) {
      const socket = sockets[sockets.length - 1];
      const closedAt = clock.now();
      socket.serverClose(1006); // the connection failed before it opened
      const count = sockets.length;
      while (sockets.length === count) assert.ok(await clock.runNext(), 'a reconnect is scheduled');
      delays.push(sockets[sockets.length - 1].createdAt - closedAt);
    }
    assert.deepEqual(delays, [500, 1000, 2000, 4000, 8000, 16000, 20000, 20000]);

    await acceptConnect(sockets);
    assert.equal(client.state, 'connected');
    const closedAt = clock.now();
    sockets[sockets.length - 1].serverClose(3011, 'force reconnect');
    const count = sockets.length;
    while (sockets.length === count) await clock.runNext();
    assert.equal(sockets[sockets.length - 1].createdAt - closedAt, 500, 'backoff starts over after a successful connect');
    client.disconnect();
  });

  test('with real randomness every delay is within its cap', async () => {
    const { client, clock, sockets } = await makeClient(Plexus, { minReconnectDelay: 100, maxReconnectDelay: 3000 });
    client.connect();
    for (let attempt = 0; attempt < 10; attempt++) {
      const closedAt = clock.now();
      sockets[sockets.length - 1].serverClose(1006);
      const count = sockets.length;
      while (sockets.length === count) await clock.runNext();
      const delay = sockets[sockets.length - 1].createdAt - closedAt;
      const cap = Math.min(3000, 100 * 2 ** attempt);
      assert.ok(delay >= 0 && delay <= cap, `attempt ${attempt}: ${delay} not in [0, ${cap}]`);
    }
    client.disconnect();
  });
});

describe('connection', () => {
  test('connects: connect command, state events, connected event with client and transport', async () => {
    const { client, sockets, events } = await makeClient(Plexus, { token: 'T1', name: 'unit' });
    client.connect();
    assert.equal(client.state, 'connecting');
    sockets[0].open();
    const connect = sockets[0].last('connect');
    assert.deepEqual(connect.connect, { name: 'unit', version: '0.1.0', token: 'T1' });
    await acceptConnect(sockets, { client: 'abc' });
    assert.equal(client.state, 'connected');
    assert.deepEqual(events.filter(([n]) => n === 'state').map(([, c]) => c.newState), ['connecting', 'connected']);
    assert.deepEqual(events.find(([n]) => n === 'connected')[1], { client: 'abc', transport: 'websocket', data: undefined });
    client.disconnect();
    assert.equal(client.state, 'disconnected');
    assert.ok(sockets[0].closedByClient);
    assert.deepEqual(events.at(-1), ['disconnected', { code: ClientCode.disconnectCalled, reason: 'disconnect called' }]);
  });

  test('disconnect codes 3500 and up stop the client', async () => {
    for (const code of [3500, 3501, 3503, 4500]) {
      const { client, clock, sockets, events } = await makeClient(Plexus);
      client.connect();
      await acceptConnect(sockets);
      sockets[0].serverClose(code, 'go away');
      assert.equal(client.state, 'disconnected');
      assert.deepEqual(events.find(([n]) => n === 'disconnected')[1], { code, reason: 'go away' });
      await clock.advance(120_000);
      assert.equal(sockets.length, 1, `no reconnect after ${code}`);
    }
  });

  test('disconnect codes 3000-3499 and a close without a code reconnect', async () => {
    for (const code of [3000, 3001, 3005, 3011, 3499, 1005, 1006, undefined]) {
      const { client, clock, sockets, events } = await makeClient(Plexus);
      client.connect();
      await acceptConnect(sockets);
      sockets[0].serverClose(code, 'bye');
      assert.equal(client.state, 'connecting', `state after ${code}`);
      if (code !== undefined) assert.deepEqual(events.at(-1), ['connecting', { code, reason: 'bye' }]);
      await clock.advance(600);
      assert.equal(sockets.length, 2, `reconnected after ${code}`);
      await acceptConnect(sockets);
      assert.equal(client.state, 'connected');
      client.disconnect();
    }
  });

  test('a disconnect push is followed like a close code', async () => {
    const { client, clock, sockets } = await makeClient(Plexus);
    client.connect();
    await acceptConnect(sockets);
    sockets[0].receive({ push: { disconnect: { code: 3011, reason: 'force reconnect' } } });
    assert.equal(client.state, 'connecting');
    assert.ok(sockets[0].closedByClient);
    await clock.advance(600);
    await acceptConnect(sockets);
    sockets[1].receive({ push: { disconnect: { code: 3503, reason: 'force disconnect' } } });
    assert.equal(client.state, 'disconnected');
  });

  test('connect timeout closes the attempt and retries', async () => {
    const { client, clock, sockets } = await makeClient(Plexus, { timeout: 1000 });
    client.connect();
    sockets[0].open();
    await clock.advance(999);
    assert.equal(sockets[0].closedByClient, false);
    await clock.advance(1);
    assert.ok(sockets[0].closedByClient);
    await clock.advance(600);
    assert.equal(sockets.length, 2);
    client.disconnect();
  });
});

describe('watchdog', () => {
  test('no message within ping + margin closes and reconnects', async () => {
    const { client, clock, sockets, events } = await makeClient(Plexus);
    client.connect();
    await acceptConnect(sockets, { ping: 10 });
    await clock.advance(14_999);
    assert.equal(client.state, 'connected');
    await clock.advance(1);
    assert.ok(sockets[0].closedByClient);
    assert.equal(client.state, 'connecting');
    assert.deepEqual(events.at(-1), ['connecting', { code: ClientCode.noPing, reason: 'no ping' }]);
    await clock.advance(600);
    assert.equal(sockets.length, 2);
    client.disconnect();
  });

  test('a ping is answered with {} and resets the watchdog; pingMargin is configurable', async () => {
    const { client, clock, sockets } = await makeClient(Plexus, { pingMargin: 2000 });
    client.connect();
    await acceptConnect(sockets, { ping: 3 });
    for (let i = 0; i < 5; i++) {
      await clock.advance(4000);
      sockets[0].receive({});
      await flush();
      assert.equal(sockets[0].sent.at(-1), '{}', 'the pong');
    }
    assert.equal(client.state, 'connected');
    assert.equal(sockets.length, 1);
    // Any message counts, not only pings.
    await clock.advance(4000);
    sockets[0].receive({ push: { message: { data: 1 } } });
    await clock.advance(4999);
    assert.equal(client.state, 'connected');
    await clock.advance(1);
    assert.equal(client.state, 'connecting');
    client.disconnect();
  });

  test('without pong: true pings are not answered', async () => {
    const { client, sockets } = await makeClient(Plexus);
    client.connect();
    await acceptConnect(sockets, { ping: 25, pong: false });
    const before = sockets[0].sent.length;
    sockets[0].receive({});
    await flush();
    assert.equal(sockets[0].sent.length, before);
    client.disconnect();
  });
});

describe('tokens', () => {
  test('error 109 on connect: getToken gives a new token and the client connects with it', async () => {
    let calls = 0;
    const { client, clock, sockets } = await makeClient(Plexus, {
      token: 'old',
      getToken: async () => `new-${++calls}`,
    });
    client.connect();
    sockets[0].open();
    sockets[0].receive({ id: sockets[0].last('connect').id, error: { code: 109, message: 'token expired' } });
    await clock.advance(600);
    assert.equal(calls, 1, 'getToken asked once');
    assert.equal(sockets.length, 2);
    sockets[1].open();
    assert.equal(sockets[1].last('connect').connect.token, 'new-1');
    await acceptConnect(sockets);
    assert.equal(client.state, 'connected');
    client.disconnect();
  });

  test('error 109 without getToken stops the client', async () => {
    const { client, sockets, events } = await makeClient(Plexus, { token: 'old' });
    client.connect();
    sockets[0].open();
    sockets[0].receive({ id: sockets[0].last('connect').id, error: { code: 109, message: 'token expired' } });
    assert.equal(client.state, 'disconnected');
    assert.equal(events.find(([n]) => n === 'disconnected')[1].code, ClientCode.tokenExpired);
  });

  test('getToken is asked first when there is no token; UnauthorizedError stops', async () => {
    const { UnauthorizedError } = await import(PLEXUS_JS);
    const { client, sockets, events } = await makeClient(Plexus, {
      getToken: async () => { throw new UnauthorizedError(); },
    });
    client.connect();
    await flush();
    assert.equal(sockets.length, 0);
    assert.equal(client.state, 'disconnected');
    assert.equal(events.find(([n]) => n === 'disconnected')[1].code, ClientCode.unauthorized);
  });

  test('a connection with a ttl is refreshed with a token from getToken before it runs out', async () => {
    const tokens = ['t2', 't3'];
    const { client, clock, sockets } = await makeClient(Plexus, { token: 't1', getToken: async () => tokens.shift() });
    client.connect();
    await acceptConnect(sockets, { expires: true, ttl: 60, ping: 0 });
    await clock.advance(49_000);
    assert.throws(() => sockets[0].last('refresh'));
    await clock.advance(1_000);
    await flush();
    const refresh = sockets[0].reply('refresh', { expires: true, ttl: 30 });
    assert.deepEqual(refresh.refresh, { token: 't2' });
    await clock.advance(24_000);
    await flush();
    assert.equal(sockets[0].last('refresh').refresh.token, 't3');
    client.disconnect();
  });
});

describe('commands', () => {
  test('a command without a reply rejects with code 0 after timeout ms', async () => {
    const { client, clock, sockets } = await makeClient(Plexus, { timeout: 3000 });
    client.connect();
    await acceptConnect(sockets);
    const pending = client.presence('chat:x');
    let settled = null;
    pending.catch((error) => { settled = error; });
    await clock.advance(2999);
    assert.equal(settled, null);
    await clock.advance(1);
    assert.ok(settled instanceof PlexusError);
    assert.equal(settled.code, ErrorCode.timeout);
    assert.equal(settled.message, 'timeout');
    // A late reply is ignored.
    sockets[0].reply('presence', { presence: {} });
    client.disconnect();
  });

  test('replies resolve and errors reject with {code, message}', async () => {
    const { client, sockets } = await makeClient(Plexus);
    client.connect();
    await acceptConnect(sockets);
    const history = client.history('chat:x', { limit: 2, since: { offset: 1, epoch: 'e' }, reverse: true });
    const stats = client.presenceStats('chat:x');
    const rpc = client.rpc('m', { a: 1 });
    await flush();
    const historyCommand = sockets[0].reply('history', {
      publications: [{ data: 'a', offset: 2 }, { data: 'b', offset: 3, info: { user: 'u', client: 'c' } }],
      epoch: 'e', offset: 3,
    });
    assert.deepEqual(historyCommand.history, { channel: 'chat:x', limit: 2, since: { offset: 1, epoch: 'e' }, reverse: true });
    sockets[0].reply('presence_stats', { num_clients: 2, num_users: 1 });
    const rpcCommand = sockets[0].last('rpc');
    sockets[0].receive({ id: rpcCommand.id, error: { code: 108, message: 'not available' } });
    assert.deepEqual(await history, {
      publications: [
        { channel: 'chat:x', data: 'a', offset: 2 },
        { channel: 'chat:x', data: 'b', offset: 3, info: { user: 'u', client: 'c' } },
      ],
      epoch: 'e', offset: 3,
    });
    assert.deepEqual(await stats, { numClients: 2, numUsers: 1 });
    await assert.rejects(rpc, { code: 108, message: 'not available' });
    client.disconnect();
  });

  test('commands issued in one tick go in one message joined by \\n; batched replies are split', async () => {
    const { client, sockets } = await makeClient(Plexus);
    client.connect();
    const socket = await acceptConnect(sockets);
    const before = socket.sent.length;
    const acks = [client.publish('chat:x', 1), client.publish('chat:x', 2), client.presenceStats('chat:x')];
    await flush();
    assert.equal(socket.sent.length, before + 1, 'one WebSocket message');
    const lines = socket.sent.at(-1).split('\n').map((line) => JSON.parse(line));
    assert.deepEqual(lines.map((c) => Object.keys(c).find((k) => k !== 'id')), ['publish', 'publish', 'presence_stats']);
    socket.receive(...lines.map((c) => (c.publish ? { id: c.id, publish: {} } : { id: c.id, presence_stats: { num_clients: 1 } })));
    assert.deepEqual(await Promise.all(acks), [{}, {}, { numClients: 1, numUsers: 0 }]);
    client.disconnect();
  });

  test('publish while not connected is queued, bounded, and sent in order after connect and resubscribe', async () => {
    const { client, clock, sockets } = await makeClient(Plexus, { maxQueued: 3 });
    const sub = client.newSubscription('chat:x');
    sub.subscribe();
    const acks = [1, 2, 3].map((n) => client.publish('chat:x', { n }));
    await assert.rejects(client.publish('chat:x', { n: 4 }), (error) => error.code === ErrorCode.queueFull && /queue full/.test(error.message));
    client.connect();
    const socket = await acceptConnect(sockets);
    await flush();
    const frame = socket.sent.at(-1).split('\n').map((line) => JSON.parse(line));
    assert.deepEqual(frame.map((c) => (c.subscribe ? 'subscribe' : `publish ${c.publish.data.n}`)), ['subscribe', 'publish 1', 'publish 2', 'publish 3']);
    for (const command of frame) socket.receive(command.subscribe ? { id: command.id, subscribe: {} } : { id: command.id, publish: {} });
    assert.deepEqual(await Promise.all(acks), [{}, {}, {}]);

    // Lost connection: queued again, sent after the reconnect.
    socket.serverClose(3011, 'force reconnect');
    const later = [client.publish('chat:x', 'a'), sub.publish('b')];
    await clock.advance(600);
    const second = await acceptConnect(sockets);
    await flush();
    const resent = second.commands().slice(1);
    assert.deepEqual(resent.map((c) => (c.subscribe ? 'subscribe' : c.publish.data)), ['subscribe', 'a', 'b']);
    for (const command of resent) second.receive(command.subscribe ? { id: command.id, subscribe: {} } : { id: command.id, publish: {} });
    assert.deepEqual(await Promise.all(later), [{}, {}]);
    client.disconnect();
  });

  test('a queued publish waits longer than timeout; other queued commands time out', async () => {
    const { client, clock, sockets } = await makeClient(Plexus, { timeout: 1000 });
    client.connect();
    sockets[0].serverClose(1006);
    const ack = client.publish('chat:x', 'late');
    const stats = client.presenceStats('chat:x');
    stats.catch(() => {});
    await clock.advance(1000);
    await assert.rejects(stats, { code: ErrorCode.timeout });
    while (sockets.length === 1) await clock.runNext();
    const socket = await acceptConnect(sockets);
    await flush();
    socket.reply('publish', {});
    assert.deepEqual(await ack, {});
    client.disconnect();
  });

  test('commands in flight when the connection drops reject with connectionClosed', async () => {
    const { client, sockets } = await makeClient(Plexus);
    client.connect();
    await acceptConnect(sockets);
    const ack = client.publish('chat:x', 1);
    await flush();
    sockets[0].serverClose(3011);
    await assert.rejects(ack, { code: ErrorCode.connectionClosed });
    client.disconnect();
  });

  test('message pushes and server-side subscriptions reach the client', async () => {
    const { client, clock, sockets, events } = await makeClient(Plexus);
    client.connect();
    await acceptConnect(sockets, { subs: { 'news:a': { recoverable: true, epoch: 'e', offset: 4 } } });
    sockets[0].receive(
      { push: { message: { data: { hello: 1 } } } },
      { push: { channel: 'news:a', pub: { data: 'x', offset: 5 } } },
      { push: { channel: 'news:a', pub: { data: 'dup', offset: 5 } } },
    );
    assert.deepEqual(events.filter(([n]) => n === 'message' || n === 'publication').map(([n, c]) => [n, c.data]), [
      ['message', { hello: 1 }], ['publication', 'x'],
    ]);
    sockets[0].serverClose(3011);
    await clock.advance(600);
    sockets[1].open();
    assert.deepEqual(sockets[1].last('connect').connect.subs, { 'news:a': { recover: true, epoch: 'e', offset: 5 } });
    client.disconnect();
  });
});
