// The official centrifuge-js SDK against Plexus (memory engine): connect, subscribe, publish,
// presence, history, join/leave and server-side subscriptions. Each test has its own server.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { client, collect, once, room, setup, token, until, watch } from './lib/harness.mjs';

const FILE = 'basic';

test('publications from an SDK client and from the API arrive; presence and history agree', async (t) => {
  const { recorder, server } = await setup(t, FILE);
  const channel = room('basic');

  const ann = client(server, recorder, 'ann', { token: token('u1', { info: { name: 'Ann' } }) });
  const bob = client(server, recorder, 'bob', { token: token('u2', { info: { name: 'Bob' } }) });
  const annSub = watch(recorder, 'ann', ann.newSubscription(channel));
  const bobSub = watch(recorder, 'bob', bob.newSubscription(channel));
  const annSeen = collect(annSub);
  const bobSeen = collect(bobSub);

  const annSubscribed = once(annSub, 'subscribed');
  const bobSubscribed = once(bobSub, 'subscribed');
  ann.connect();
  bob.connect();
  await ann.ready(5_000);
  await bob.ready(5_000);
  annSub.subscribe();
  bobSub.subscribe();
  const first = await annSubscribed;
  await bobSubscribed;
  assert.equal(first.channel, channel);
  assert.equal(first.recoverable, true, 'chat has recovery: the subscription is recoverable');
  assert.equal(first.positioned, true);
  assert.equal(first.wasRecovering, false);
  assert.ok(first.streamPosition && typeof first.streamPosition.epoch === 'string' && first.streamPosition.epoch.length > 0,
    `a stream position with an epoch: ${JSON.stringify(first.streamPosition)}`);

  // Published by an SDK client: both subscribers get it, with the publisher's info.
  await bobSub.publish({ text: 'from bob' });
  await until(() => annSeen.length >= 1 && bobSeen.length >= 1, 'the client publication at both subscribers');
  for (const seen of [annSeen, bobSeen]) {
    assert.deepEqual(seen[0].data, { text: 'from bob' });
    assert.equal(seen[0].channel, channel);
    assert.equal(seen[0].info?.user, 'u2', `publisher info: ${JSON.stringify(seen[0].info)}`);
    assert.deepEqual(seen[0].info?.connInfo, { name: 'Bob' });
    assert.equal(typeof seen[0].offset, 'number');
  }

  // Published through the server API, with tags.
  const { result: published } = await server.api('publish', {
    channel, data: { text: 'from api' }, tags: { kind: 'notice', lang: 'en' },
  });
  assert.equal(typeof published?.offset, 'number', `/api/publish result: ${JSON.stringify(published)}`);
  assert.equal(published.epoch, first.streamPosition.epoch, 'the API reports the epoch the subscriber got');
  await until(() => annSeen.length >= 2 && bobSeen.length >= 2, 'the API publication at both subscribers');
  for (const seen of [annSeen, bobSeen]) {
    assert.deepEqual(seen.map((p) => p.data), [{ text: 'from bob' }, { text: 'from api' }]);
    assert.equal(seen[1].offset, published.offset);
    assert.equal(seen[1].offset, seen[0].offset + 1, 'offsets are consecutive');
    assert.equal(seen[1].info, undefined, 'an API publication has no publisher');
    assert.deepEqual(seen[1].tags, { kind: 'notice', lang: 'en' }, 'the tags reach the SDK');
    assert.equal(seen[0].tags, undefined, 'a client publication has none');
  }

  // Presence lists both connections, with their users and connection info.
  const presence = await annSub.presence();
  const clients = Object.values(presence.clients);
  assert.equal(clients.length, 2, `presence: ${JSON.stringify(presence)}`);
  assert.deepEqual(clients.map((c) => c.user).sort(), ['u1', 'u2']);
  assert.ok(presence.clients[ann.clientId], `ann's client id ${ann.clientId} is a key of presence`);
  const bobEntry = clients.find((c) => c.user === 'u2');
  assert.deepEqual(bobEntry.connInfo, { name: 'Bob' });
  const stats = await bobSub.presenceStats();
  assert.deepEqual(stats, { numClients: 2, numUsers: 2 });

  // History: both publications, oldest first, with the offsets the subscribers saw.
  const history = await annSub.history({ limit: 10 });
  assert.deepEqual(history.publications.map((p) => p.data), [{ text: 'from bob' }, { text: 'from api' }]);
  assert.deepEqual(history.publications.map((p) => p.offset), annSeen.map((p) => p.offset));
  assert.equal(history.offset, published.offset, 'history reports the top offset');
  assert.equal(history.epoch, published.epoch);
  assert.equal(history.publications[0].info?.user, 'u2');
  assert.deepEqual(history.publications[1].tags, { kind: 'notice', lang: 'en' }, 'history keeps the tags');

  // Nothing arrived twice.
  assert.equal(annSeen.length, 2);
  assert.equal(bobSeen.length, 2);
});

test('join and leave events arrive', async (t) => {
  const { recorder, server } = await setup(t, FILE);
  const channel = room('joinleave');

  const ann = client(server, recorder, 'ann', { token: token('u1') });
  const annSub = watch(recorder, 'ann', ann.newSubscription(channel, { joinLeave: true }));
  const joins = [];
  const leaves = [];
  // Only bob's comings and goings: whether a subscriber hears of its own join is left open.
  annSub.on('join', (ctx) => { if (ctx.info.user === 'u2') joins.push(ctx); });
  annSub.on('leave', (ctx) => { if (ctx.info.user === 'u2') leaves.push(ctx); });
  ann.connect();
  annSub.subscribe();
  await annSub.ready(5_000);

  const bob = client(server, recorder, 'bob', { token: token('u2', { info: { name: 'Bob' } }) });
  const bobSub = watch(recorder, 'bob', bob.newSubscription(channel, { joinLeave: true }));
  bob.connect();
  bobSub.subscribe();
  await bobSub.ready(5_000);

  await until(() => joins.length >= 1, "bob's join at ann");
  assert.equal(joins[0].channel, channel);
  assert.equal(joins[0].info.user, 'u2');
  assert.equal(joins[0].info.client, bob.clientId);
  assert.deepEqual(joins[0].info.connInfo, { name: 'Bob' });

  // Leaving by unsubscribing.
  bobSub.unsubscribe();
  await until(() => leaves.length >= 1, "bob's leave (unsubscribe) at ann");
  assert.equal(leaves[0].info.user, 'u2');
  assert.equal(leaves[0].info.client, bob.clientId);

  // Joining again, then leaving by disconnecting.
  bobSub.subscribe();
  await until(() => joins.length >= 2, "bob's second join at ann");
  bob.disconnect();
  await until(() => leaves.length >= 2, "bob's leave (disconnect) at ann");
  assert.equal(leaves[1].info.user, 'u2');

  assert.equal(joins.length, 2, 'no extra joins');
  assert.equal(leaves.length, 2, 'no extra leaves');
});

test("server-side subscription from the token's channels claim", async (t) => {
  const { recorder, server } = await setup(t, FILE);
  const channel = room('serverside');

  const carl = client(server, recorder, 'carl', { token: token('u3', { channels: [channel] }) });
  const subscribed = once(carl, 'subscribed', { accept: (ctx) => ctx.channel === channel });
  const seen = collect(carl);
  carl.connect();
  const ctx = await subscribed;
  assert.equal(ctx.recoverable, true, `server-side subscribed context: ${JSON.stringify(ctx)}`);
  assert.ok(ctx.streamPosition?.epoch, 'a stream position');

  const one = await server.publish(channel, { n: 1 });
  const two = await server.publish(channel, { n: 2 });
  await until(() => seen.length >= 2, 'two publications on the client');
  assert.deepEqual(seen.map((p) => p.channel), [channel, channel]);
  assert.deepEqual(seen.map((p) => p.data), [{ n: 1 }, { n: 2 }]);
  assert.deepEqual(seen.map((p) => p.offset), [one.offset, two.offset]);
  assert.equal(carl.getSubscription(channel), null, 'no client-side subscription was made');
});
