// Subscriptions of plexus.js on a fake clock and a fake WebSocket: recovery bookkeeping,
// duplicates, unsubscribe codes, tokens.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { PLEXUS_JS, acceptConnect, flush, makeClient } from './lib/fakes.mjs';

const { Plexus, ClientCode, ErrorCode } = await import(PLEXUS_JS);

/** A subscription whose events are recorded as [name, ctx]. */
function recorded(sub) {
  const events = [];
  for (const name of ['state', 'subscribing', 'subscribed', 'unsubscribed', 'publication', 'join', 'leave', 'error']) {
    sub.on(name, (ctx) => events.push([name, ctx]));
  }
  const data = () => events.filter(([n]) => n === 'publication').map(([, c]) => c.data);
  const last = (name) => events.filter(([n]) => n === name).at(-1)?.[1];
  return { events, data, last };
}

const pub = (channel, offset, data = `m${offset}`) => ({ push: { channel, pub: { data, offset } } });

/** Drops the connection with 3011 and brings up the next one; returns the new socket. */
async function reconnect(clock, sockets) {
  sockets[sockets.length - 1].serverClose(3011, 'force reconnect');
  const count = sockets.length;
  while (sockets.length === count) await clock.runNext();
  return acceptConnect(sockets);
}

describe('subscription', () => {
  test('a tags filter goes with every subscribe as tf', async () => {
    const { client, clock, sockets } = await makeClient(Plexus);
    const tagsFilter = { op: 'or', nodes: [{ key: 'ticker', cmp: 'eq', val: 'BTC' }, { key: 'size', cmp: 'gte', val: '10' }] };
    const sub = client.newSubscription('ticks:x', { tagsFilter });
    sub.subscribe();
    client.connect();
    let socket = await acceptConnect(sockets);
    await flush();
    let command = socket.reply('subscribe', { recoverable: true, positioned: true, epoch: 'e1', offset: 3 });
    assert.deepEqual(command.subscribe, { channel: 'ticks:x', tf: tagsFilter });
    socket = await reconnect(clock, sockets);
    await flush();
    command = socket.last('subscribe');
    assert.deepEqual(command.subscribe, { channel: 'ticks:x', tf: tagsFilter, recover: true, epoch: 'e1', offset: 3 });
  });

  test('delta compression: whole and delta publications rebuilt; one that does not apply resubscribes', async () => {
    const { client, sockets } = await makeClient(Plexus);
    const sub = client.newSubscription('prices:x', { delta: 'fossil' });
    const { data, last } = recorded(sub);
    sub.subscribe();
    client.connect();
    const socket = await acceptConnect(sockets);
    await flush();
    const command = socket.reply('subscribe', { recoverable: true, positioned: true, epoch: 'e1', offset: 0, delta: true });
    assert.deepEqual(command.subscribe, { channel: 'prices:x', delta: 'fossil' });
    // Whole: the JSON as a string. Then the delta the server makes from it to
    // {"symbol":"BTC","price":50017} (docs/protocol.md): 30 bytes, copy 27, insert "17}".
    socket.receive(
      pub('prices:x', 1, '{"symbol":"BTC","price":50000}'),
      { push: { channel: 'prices:x', pub: { data: 'U\nR@0,3:17}1HXElc;', offset: 2, delta: true } } },
    );
    assert.deepEqual(data(), [{ symbol: 'BTC', price: 50000 }, { symbol: 'BTC', price: 50017 }]);
    assert.equal(last('publication').delta, undefined);
    // A delta with a wrong checksum: an error, no publication, and a resubscribe from offset 2.
    socket.receive({ push: { channel: 'prices:x', pub: { data: 'U\nR@0,3:18}1HXElc;', offset: 3, delta: true } } });
    assert.equal(data().length, 2);
    assert.equal(last('error').type, 'delta');
    await flush();
    const commands = socket.commands();
    assert.deepEqual(commands.at(-2).unsubscribe, { channel: 'prices:x' });
    assert.deepEqual(commands.at(-1).subscribe, { channel: 'prices:x', delta: 'fossil', recover: true, epoch: 'e1', offset: 2 });
  });

  test('subscribe, publications, join/leave, unsubscribe', async () => {
    const { client, sockets } = await makeClient(Plexus);
    const sub = client.newSubscription('chat:x', { joinLeave: true });
    const { events, data, last } = recorded(sub);
    sub.subscribe();
    client.connect();
    const socket = await acceptConnect(sockets);
    await flush();
    const command = socket.reply('subscribe', { recoverable: true, positioned: true, epoch: 'e1', offset: 2 });
    assert.deepEqual(command.subscribe, { channel: 'chat:x', join_leave: true });
    assert.equal(sub.state, 'subscribed');
    assert.deepEqual(last('subscribed'), {
      channel: 'chat:x', recoverable: true, positioned: true, wasRecovering: false, recovered: false,
      position: { offset: 2, epoch: 'e1' }, data: undefined,
    });
    socket.receive(
      { push: { channel: 'chat:x', pub: { data: { text: 'hi' }, offset: 3, info: { user: '42', client: 'c' } } } },
      { push: { channel: 'chat:x', join: { info: { user: '7', client: 'd' } } } },
      { push: { channel: 'chat:x', leave: { info: { user: '7', client: 'd' } } } },
    );
    assert.deepEqual(last('publication'), { channel: 'chat:x', data: { text: 'hi' }, offset: 3, info: { user: '42', client: 'c' } });
    assert.deepEqual(last('join'), { channel: 'chat:x', info: { user: '7', client: 'd' } });
    assert.deepEqual(last('leave'), { channel: 'chat:x', info: { user: '7', client: 'd' } });
    assert.deepEqual(sub.position, { offset: 3, epoch: 'e1' });

    sub.unsubscribe();
    await flush();
    assert.deepEqual(socket.last('unsubscribe').unsubscribe, { channel: 'chat:x' });
    assert.equal(sub.state, 'unsubscribed');
    assert.deepEqual(last('unsubscribed'), { channel: 'chat:x', code: ClientCode.unsubscribeCalled, reason: 'unsubscribe called' });
    socket.receive(pub('chat:x', 4));
    assert.deepEqual(data(), [{ text: 'hi' }], 'nothing after unsubscribe');
    assert.deepEqual(events.filter(([n]) => n === 'state').map(([, c]) => c.newState), ['subscribing', 'subscribed', 'unsubscribed']);
    client.disconnect();
  });

  test('resubscribe carries the epoch and offset of the last publication; recovered ones come first, in order, without duplicates', async () => {
    const { client, clock, sockets } = await makeClient(Plexus);
    const sub = client.newSubscription('chat:x');
    const { data, last } = recorded(sub);
    sub.subscribe();
    client.connect();
    let socket = await acceptConnect(sockets);
    await flush();
    socket.reply('subscribe', { recoverable: true, positioned: true, epoch: 'e1', offset: 5 });
    socket.receive(pub('chat:x', 6), pub('chat:x', 7), pub('chat:x', 7, 'dup'), pub('chat:x', 5, 'old'));
    assert.deepEqual(data(), ['m6', 'm7']);

    socket = await reconnect(clock, sockets);
    assert.equal(sub.state, 'subscribing');
    await flush();
    const command = socket.last('subscribe');
    assert.deepEqual(command.subscribe, { channel: 'chat:x', recover: true, epoch: 'e1', offset: 7 });
    // A publication that overtakes the reply waits for it.
    socket.receive(pub('chat:x', 11));
    assert.deepEqual(data(), ['m6', 'm7']);
    socket.receive({
      id: command.id,
      subscribe: {
        recoverable: true, positioned: true, epoch: 'e1', offset: 10, was_recovering: true, recovered: true,
        publications: [{ data: 'm7', offset: 7 }, { data: 'm8', offset: 8 }, { data: 'm9', offset: 9 }, { data: 'm10', offset: 10 }],
      },
    });
    socket.receive(pub('chat:x', 10, 'dup'), pub('chat:x', 12));
    assert.deepEqual(data(), ['m6', 'm7', 'm8', 'm9', 'm10', 'm11', 'm12']);
    assert.equal(last('subscribed').recovered, true);
    assert.equal(last('subscribed').wasRecovering, true);
    assert.deepEqual(last('subscribed').position, { offset: 10, epoch: 'e1' });

    // Recovery impossible (another epoch): surfaced as recovered: false; the old offset is gone.
    socket = await reconnect(clock, sockets);
    await flush();
    assert.deepEqual(socket.last('subscribe').subscribe, { channel: 'chat:x', recover: true, epoch: 'e1', offset: 12 });
    socket.reply('subscribe', { recoverable: true, positioned: true, epoch: 'e2', offset: 3, was_recovering: true });
    assert.equal(last('subscribed').recovered, false);
    assert.equal(last('subscribed').wasRecovering, true);
    socket.receive(pub('chat:x', 4, 'fresh'));
    assert.deepEqual(data().slice(-1), ['fresh']);
    assert.deepEqual(sub.position, { offset: 4, epoch: 'e2' });

    // recover: false never asks for recovery.
    const plain = client.newSubscription('chat:y', { recover: false });
    plain.subscribe();
    await flush();
    socket.reply('subscribe', { recoverable: true, epoch: 'e', offset: 9 });
    socket = await reconnect(clock, sockets);
    await flush();
    const commands = socket.commands().filter((c) => c.subscribe);
    assert.deepEqual(commands.find((c) => c.subscribe.channel === 'chat:y').subscribe, { channel: 'chat:y' });
    client.disconnect();
  });

  test('a channel without recovery is resubscribed without recover', async () => {
    const { client, clock, sockets } = await makeClient(Plexus);
    const sub = client.newSubscription('plain');
    sub.subscribe();
    client.connect();
    let socket = await acceptConnect(sockets);
    await flush();
    socket.reply('subscribe', {});
    socket.receive({ push: { channel: 'plain', pub: { data: 1 } } }, { push: { channel: 'plain', pub: { data: 1 } } });
    const { data } = recorded(sub);
    socket.receive({ push: { channel: 'plain', pub: { data: 2 } } }, { push: { channel: 'plain', pub: { data: 2 } } });
    assert.deepEqual(data(), [2, 2], 'offset 0: no deduplication');
    socket = await reconnect(clock, sockets);
    await flush();
    assert.deepEqual(socket.last('subscribe').subscribe, { channel: 'plain' });
    client.disconnect();
  });

  test('server unsubscribe: 2500-2999 resubscribes with recovery, below 2500 stays unsubscribed', async () => {
    const { client, sockets } = await makeClient(Plexus);
    const sub = client.newSubscription('chat:x');
    const { last } = recorded(sub);
    sub.subscribe();
    client.connect();
    const socket = await acceptConnect(sockets);
    await flush();
    socket.reply('subscribe', { recoverable: true, epoch: 'e', offset: 1 });
    socket.receive({ push: { channel: 'chat:x', unsubscribe: { code: 2500, reason: 'insufficient state' } } });
    assert.equal(sub.state, 'subscribing');
    assert.deepEqual(last('subscribing'), { channel: 'chat:x', code: 2500, reason: 'insufficient state' });
    await flush();
    assert.deepEqual(socket.last('subscribe').subscribe, { channel: 'chat:x', recover: true, epoch: 'e', offset: 1 });
    socket.reply('subscribe', { recoverable: true, epoch: 'e', offset: 1, was_recovering: true, recovered: true });
    assert.equal(sub.state, 'subscribed');
    socket.receive({ push: { channel: 'chat:x', unsubscribe: { code: 2000, reason: 'server unsubscribe' } } });
    assert.equal(sub.state, 'unsubscribed');
    assert.deepEqual(last('unsubscribed'), { channel: 'chat:x', code: 2000, reason: 'server unsubscribe' });
    const before = socket.sent.length;
    await flush();
    assert.equal(socket.sent.length, before, 'no unsubscribe command: the server did it');
    client.disconnect();
  });

  test('subscribe errors: permanent ones unsubscribe, temporary ones retry with backoff', async () => {
    const { client, clock, sockets } = await makeClient(Plexus);
    const denied = client.newSubscription('secret:x');
    const busy = client.newSubscription('chat:busy');
    const deniedEvents = recorded(denied);
    denied.subscribe();
    busy.subscribe();
    client.connect();
    const socket = await acceptConnect(sockets);
    await flush();
    const [first, second] = socket.commands().filter((c) => c.subscribe);
    socket.receive(
      { id: first.id, error: { code: 103, message: 'permission denied' } },
      { id: second.id, error: { code: 111, message: 'too many requests', temporary: true } },
    );
    assert.equal(denied.state, 'unsubscribed');
    assert.deepEqual(deniedEvents.last('unsubscribed'), { channel: 'secret:x', code: 103, reason: 'permission denied' });
    assert.equal(deniedEvents.last('error').error.code, 103);
    assert.equal(busy.state, 'subscribing');
    await clock.advance(600);
    assert.equal(socket.commands().filter((c) => c.subscribe?.channel === 'chat:busy').length, 2, 'retried');
    client.disconnect();
  });

  test('a subscribe timeout reconnects the client', async () => {
    const { client, clock, sockets, events } = await makeClient(Plexus, { timeout: 2000 });
    client.newSubscription('chat:x').subscribe();
    client.connect();
    await acceptConnect(sockets, { ping: 0 });
    await clock.advance(2000);
    assert.ok(sockets[0].closedByClient);
    assert.deepEqual(events.at(-1), ['connecting', { code: ClientCode.subscribeTimeout, reason: 'subscribe timeout' }]);
    client.disconnect();
  });

  test('subscription tokens: getToken, and again after error 109', async () => {
    const asked = [];
    const { client, sockets } = await makeClient(Plexus);
    const sub = client.newSubscription('private:x', { getToken: async (ctx) => { asked.push(ctx); return `st${asked.length}`; } });
    sub.subscribe();
    client.connect();
    const socket = await acceptConnect(sockets);
    await flush();
    const first = socket.last('subscribe');
    assert.deepEqual(first.subscribe, { channel: 'private:x', token: 'st1' });
    assert.deepEqual(asked, [{ channel: 'private:x' }]);
    socket.receive({ id: first.id, error: { code: 109, message: 'token expired' } });
    assert.equal(sub.state, 'subscribing');
    client.disconnect();
  });

  test('one subscription per channel; publish from a subscription', async () => {
    const { client, sockets } = await makeClient(Plexus);
    const sub = client.newSubscription('chat:x');
    assert.throws(() => client.newSubscription('chat:x'), /already/);
    assert.equal(client.getSubscription('chat:x'), sub);
    client.connect();
    const socket = await acceptConnect(sockets);
    const ack = sub.publish({ a: 1 });
    await flush();
    assert.deepEqual(socket.reply('publish', {}).publish, { channel: 'chat:x', data: { a: 1 } });
    assert.deepEqual(await ack, {});
    client.removeSubscription(sub);
    assert.equal(client.getSubscription('chat:x'), null);
    client.disconnect();
  });

  test('unsubscribe while the subscribe is in flight: the late reply is ignored', async () => {
    const { client, sockets } = await makeClient(Plexus);
    const sub = client.newSubscription('chat:x');
    sub.subscribe();
    client.connect();
    const socket = await acceptConnect(sockets);
    await flush();
    const command = socket.last('subscribe');
    sub.unsubscribe();
    await flush();
    assert.ok(socket.last('unsubscribe'));
    socket.receive({ id: command.id, subscribe: { recoverable: true, epoch: 'e', offset: 1 } });
    assert.equal(sub.state, 'unsubscribed');
    client.disconnect();
  });

  test('client disconnect leaves subscriptions subscribing; connect() resubscribes them', async () => {
    const { client, sockets } = await makeClient(Plexus);
    const sub = client.newSubscription('chat:x');
    sub.subscribe();
    client.connect();
    let socket = await acceptConnect(sockets);
    await flush();
    socket.reply('subscribe', { recoverable: true, epoch: 'e', offset: 4 });
    client.disconnect();
    assert.equal(sub.state, 'subscribing');
    client.connect();
    socket = await acceptConnect(sockets);
    await flush();
    assert.deepEqual(socket.last('subscribe').subscribe, { channel: 'chat:x', recover: true, epoch: 'e', offset: 4 });
    client.disconnect();
    await assert.rejects(client.presence('chat:x'), { code: ErrorCode.disconnected });
  });
});
