// Cache recovery mode (`force_recovery_mode = "cache"`, as Centrifugo's): a subscriber gets the
// channel's latest publication at once, as its first `publication` event, and after a
// reconnect only the latest again: channels as live values (a quote, a score, a status).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  Gate, client, collect, once, room, setup, token, until, watch,
} from './lib/harness.mjs';

const FILE = 'cache';
const NAMESPACES = `
[[namespaces]]
name = "state"
history_size = 1
history_ttl = "1h"
recover = true
force_recovery_mode = "cache"
allow_subscribe_for_anonymous = true
`;

test('a subscriber gets the latest value first, and only the latest after a reconnect', async (t) => {
  const { recorder, server } = await setup(t, FILE, { config: NAMESPACES });
  const channel = room('price', 'state');
  for (const price of [101, 102, 103]) await server.publish(channel, { price });

  const gate = new Gate();
  const ann = client(server, recorder, 'ann', {
    token: token('ann'),
    minReconnectDelay: 200,
    maxReconnectDelay: 1_000,
  }, gate);
  // `since: {}` asks for recovery from no position, as Centrifugo's docs say.
  const sub = watch(recorder, 'ann', ann.newSubscription(channel, { since: {} }));
  const seen = collect(sub);
  const subscribed = once(sub, 'subscribed');
  ann.connect();
  sub.subscribe();
  const ctx = await subscribed;
  assert.equal(ctx.wasRecovering, true, JSON.stringify(ctx));
  assert.equal(ctx.recovered, true, JSON.stringify(ctx));
  await until(() => seen.length >= 1, 'the latest value');
  assert.deepEqual(seen.map((p) => p.data.price), [103], 'the latest only');

  await server.publish(channel, { price: 104 });
  await until(() => seen.length >= 2, 'a live update');

  // Away while three more come: back, it gets only the newest.
  gate.held = true;
  const connecting = once(ann, 'connecting');
  await server.api('disconnect', { user: 'ann', disconnect: { code: 3011, reason: 'go away' } });
  await connecting;
  for (const price of [105, 106, 107]) await server.publish(channel, { price });
  const resubscribed = once(sub, 'subscribed', { timeout: 8_000 });
  gate.held = false;
  const again = await resubscribed;
  assert.equal(again.recovered, true, JSON.stringify(again));
  await until(() => seen.length >= 3, 'the newest value after the reconnect');
  await new Promise((resolve) => setTimeout(resolve, 300)); // time for anything more to show up
  assert.deepEqual(seen.map((p) => p.data.price), [103, 104, 107]);
});

test('an empty channel recovers nothing; a client that has the latest gets nothing again', async (t) => {
  const { recorder, server } = await setup(t, FILE, { config: NAMESPACES });
  const gate = new Gate();
  const bob = client(server, recorder, 'bob', {
    token: token('bob'),
    minReconnectDelay: 200,
    maxReconnectDelay: 1_000,
  }, gate);
  bob.connect();
  await bob.ready(5_000);
  const empty = watch(recorder, 'bob', bob.newSubscription(room('nothing', 'state'), { since: {} }));
  const nothing = collect(empty);
  const subscribed = once(empty, 'subscribed');
  empty.subscribe();
  const ctx = await subscribed;
  assert.equal(ctx.wasRecovering, true, JSON.stringify(ctx));
  assert.equal(ctx.recovered, false, `nothing to give: ${JSON.stringify(ctx)}`);

  const channel = room('status', 'state');
  await server.publish(channel, { status: 'up' });
  const sub = watch(recorder, 'bob', bob.newSubscription(channel, { since: {} }));
  const seen = collect(sub);
  sub.subscribe();
  await until(() => seen.length >= 1, 'the latest value');
  // Reconnected with nothing new: recovered, and no second copy of the value it has.
  gate.held = true;
  const connecting = once(bob, 'connecting');
  await server.api('disconnect', { user: 'bob', disconnect: { code: 3011, reason: 'go away' } });
  await connecting;
  const resubscribed = once(sub, 'subscribed', { timeout: 8_000 });
  gate.held = false;
  const again = await resubscribed;
  assert.equal(again.wasRecovering, true, JSON.stringify(again));
  assert.equal(again.recovered, true, JSON.stringify(again));
  await new Promise((resolve) => setTimeout(resolve, 300));
  assert.deepEqual(seen.map((p) => p.data.status), ['up']);
  assert.equal(nothing.length, 0);
});
