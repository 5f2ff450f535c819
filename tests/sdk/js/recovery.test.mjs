// Recovery after a server-initiated disconnect, as the official centrifuge-js SDK does it by itself.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Gate, client, collect, once, room, setup, token, until, watch } from './lib/harness.mjs';

const FILE = 'recovery';

test('after /api/disconnect with 3011 the SDK reconnects and recovers exactly what it missed', async (t) => {
  const { recorder, server } = await setup(t, FILE);
  const channel = room('recovery');
  const gate = new Gate();
  const ann = client(server, recorder, 'ann', {
    token: token('u1'),
    minReconnectDelay: 200,
    maxReconnectDelay: 1_000,
  }, gate);
  const sub = watch(recorder, 'ann', ann.newSubscription(channel));
  const seen = collect(sub);
  const subscribedEvents = [];
  sub.on('subscribed', (ctx) => subscribedEvents.push(ctx));
  ann.connect();
  sub.subscribe();
  await sub.ready(5_000);

  // Two publications before the disconnect, so the position to recover from is not zero.
  const before = [];
  for (let i = 1; i <= 2; i += 1) before.push(await server.publish(channel, { n: i }));
  await until(() => seen.length >= 2, 'the first two publications');

  // Hold back reconnects until the missed publications are in, so they can only come by
  // recovery, then have the server disconnect ann with a reconnect code.
  gate.held = true;
  const connecting = once(ann, 'connecting', { timeout: 5_000 });
  let how;
  try {
    const reply = await server.api('disconnect', { user: 'u1', disconnect: { code: 3011, reason: 'force reconnect' } });
    assert.ok(reply.result !== undefined, `/api/disconnect reply: ${JSON.stringify(reply)}`);
    how = 'server';
  } catch (error) {
    if (!/no HTTP API/.test(error.message)) throw error;
    t.diagnostic('/api/disconnect is missing (404): the client disconnects and connects itself');
    how = 'client';
    ann.disconnect();
  }
  if (how === 'server') {
    const ctx = await connecting;
    assert.equal(ctx.code, 3011, `connecting context after the server's disconnect: ${JSON.stringify(ctx)}`);
    assert.equal(ctx.reason, 'force reconnect');
  }
  assert.notEqual(ann.state, 'connected');

  const missed = [];
  for (let i = 3; i <= 7; i += 1) missed.push(await server.publish(channel, { n: i }));
  assert.notEqual(ann.state, 'connected', 'the five were published while ann was away');

  const resubscribed = once(sub, 'subscribed', { timeout: 8_000 });
  gate.held = false;
  if (how === 'client') ann.connect();
  const ctx = await resubscribed;
  assert.equal(ctx.wasRecovering, true, `subscribed context: ${JSON.stringify(ctx)}`);
  assert.equal(ctx.recovered, true, `subscribed context: ${JSON.stringify(ctx)}`);
  assert.equal(ctx.streamPosition?.epoch, before[0].epoch, 'same epoch');

  await until(() => seen.length >= 7, 'all seven publications', 5_000);
  await new Promise((resolve) => setTimeout(resolve, 300)); // time for a duplicate to show up
  assert.deepEqual(seen.map((p) => p.data.n), [1, 2, 3, 4, 5, 6, 7], 'in order, none missing, none twice');
  assert.deepEqual(seen.map((p) => p.offset), [...before, ...missed].map((r) => r.offset));

  // The five came in the subscribe reply, i.e. by recovery.
  const subscribeReplies = recorder.frames('ann', '<').filter((f) => f.subscribe);
  const last = subscribeReplies.at(-1).subscribe;
  assert.equal(last.recovered, true);
  assert.deepEqual((last.publications ?? []).map((p) => p.data.n), [3, 4, 5, 6, 7]);
  assert.equal(subscribedEvents.length, 2);
});

test('a server-side subscription (token channels) recovers too after /api/disconnect', async (t) => {
  const { recorder, server } = await setup(t, FILE);
  const channel = room('serverside-recovery');
  const gate = new Gate();
  const carl = client(server, recorder, 'carl', {
    token: token('u3', { channels: [channel] }),
    minReconnectDelay: 200,
    maxReconnectDelay: 1_000,
  }, gate);
  const seen = collect(carl);
  const subscribedEvents = [];
  carl.on('subscribed', (ctx) => subscribedEvents.push(ctx));
  const first = once(carl, 'subscribed', { accept: (ctx) => ctx.channel === channel });
  carl.connect();
  await first;

  const before = [await server.publish(channel, { n: 1 })];
  await until(() => seen.length >= 1, 'the first publication');

  gate.held = true;
  const connecting = once(carl, 'connecting');
  await server.api('disconnect', { user: 'u3', disconnect: { code: 3011, reason: 'force reconnect' } });
  assert.equal((await connecting).code, 3011);
  const missed = [];
  for (let i = 2; i <= 4; i += 1) missed.push(await server.publish(channel, { n: i }));

  const again = once(carl, 'subscribed', { accept: (ctx) => ctx.channel === channel, timeout: 8_000 });
  gate.held = false;
  const ctx = await again;
  assert.equal(ctx.wasRecovering, true, `server-side subscribed context: ${JSON.stringify(ctx)}`);
  assert.equal(ctx.recovered, true, `server-side subscribed context: ${JSON.stringify(ctx)}`);
  await until(() => seen.length >= 4, 'all four publications');
  await new Promise((resolve) => setTimeout(resolve, 300));
  assert.deepEqual(seen.map((p) => p.data.n), [1, 2, 3, 4], 'in order, none missing, none twice');
  assert.deepEqual(seen.map((p) => p.offset), [...before, ...missed].map((r) => r.offset));

  // The connect command carried the position, and the reply's subs the missed publications.
  const connect = recorder.frames('carl', '>').filter((f) => f.connect).at(-1).connect;
  assert.equal(connect.subs?.[channel]?.recover, true, `connect command: ${JSON.stringify(connect)}`);
  const reply = recorder.frames('carl', '<').filter((f) => f.connect).at(-1).connect;
  assert.deepEqual((reply.subs?.[channel]?.publications ?? []).map((p) => p.data.n), [2, 3, 4]);
  assert.equal(subscribedEvents.length, 2);
});
