// centrifuge-js's `getState` (5.8): the application loads its state and the stream position it
// belongs to; the SDK subscribes with recovery from there, asking the server to fail with 112
// rather than go on with a gap (the subscribe `flag` rejectUnrecovered). On 112 the SDK calls
// `getState` again for a fresh state and position.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { client, collect, room, setup, token, until, watch } from './lib/harness.mjs';

const FILE = 'getstate';

test('a position the stream cannot recover from makes the SDK reload the state (112), then it goes on live', async (t) => {
  const { recorder, server } = await setup(t, FILE);
  const channel = room('state');
  const first = await server.publish(channel, { n: 1 });
  const second = await server.publish(channel, { n: 2 });
  assert.equal(second.offset, 2);

  // The application's "database": first a state from another epoch (as after the stream was
  // lost), then the real one, up to offset 2.
  const positions = [
    { offset: 1, epoch: 'not-the-epoch' },
    { offset: second.offset, epoch: first.epoch },
  ];
  let loads = 0;
  const ann = client(server, recorder, 'ann', { token: token('u1') });
  const sub = watch(recorder, 'ann', ann.newSubscription(channel, {
    getState: async () => {
      const position = positions[Math.min(loads, positions.length - 1)];
      loads += 1;
      return position;
    },
    minResubscribeDelay: 50,
    maxResubscribeDelay: 200,
  }));
  const seen = collect(sub);
  const subscribed = [];
  sub.on('subscribed', (ctx) => subscribed.push(ctx));
  ann.connect();
  sub.subscribe();
  await until(() => subscribed.length === 1, 'subscribed', 8_000);
  assert.equal(loads, 2, 'the state was loaded again after 112');
  assert.equal(subscribed[0].recovered, true, JSON.stringify(subscribed[0]));
  assert.equal(seen.length, 0, 'nothing missed after offset 2');

  await server.publish(channel, { n: 3 });
  await until(() => seen.length === 1, 'the live publication');
  assert.deepEqual(seen[0].data, { n: 3 });
  assert.equal(loads, 2);
});

test('a position it can recover from: getState once, the missed publications recovered', async (t) => {
  const { recorder, server } = await setup(t, FILE);
  const channel = room('state');
  const first = await server.publish(channel, { n: 1 });
  await server.publish(channel, { n: 2 });
  await server.publish(channel, { n: 3 });
  let loads = 0;
  const ann = client(server, recorder, 'ann', { token: token('u1') });
  const sub = watch(recorder, 'ann', ann.newSubscription(channel, {
    getState: async () => {
      loads += 1;
      return { offset: first.offset, epoch: first.epoch };
    },
  }));
  const seen = collect(sub);
  ann.connect();
  sub.subscribe();
  await until(() => seen.length === 2, 'the two publications after the state');
  assert.deepEqual(seen.map((ctx) => ctx.data.n), [2, 3]);
  assert.equal(loads, 1);
});

test('cache mode, a channel still empty: the state of its empty stream is taken, not reloaded for ever', async (t) => {
  const config = `
[[namespaces]]
name = "state"
history_size = 1
history_ttl = "1h"
recover = true
force_recovery_mode = "cache"
`;
  const { recorder, server } = await setup(t, FILE, { config });
  const channel = room('value', 'state');
  // The application reads the stream's top position first, as centrifuge-js's docs say.
  const { result: top } = await server.api('history', { channel, limit: 0 });
  assert.equal(top.offset ?? 0, 0);
  let loads = 0;
  const ann = client(server, recorder, 'ann', { token: token('u1') });
  const sub = watch(recorder, 'ann', ann.newSubscription(channel, {
    getState: async () => {
      loads += 1;
      return { offset: 0, epoch: top.epoch };
    },
    minResubscribeDelay: 50,
    maxResubscribeDelay: 200,
  }));
  const seen = collect(sub);
  const subscribed = [];
  sub.on('subscribed', (ctx) => subscribed.push(ctx));
  ann.connect();
  sub.subscribe();
  await until(() => subscribed.length === 1, 'subscribed', 8_000);
  assert.equal(loads, 1, 'getState once');
  await server.publish(channel, { v: 1 });
  await until(() => seen.length === 1, 'the live publication');
  assert.equal(loads, 1);
});
