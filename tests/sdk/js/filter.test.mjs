// Publication filtering by tags with the official centrifuge-js SDK (`tagsFilter`, as in
// Centrifugo): only publications whose tags match reach the subscription, live and in a
// recovering resubscribe, in the JSON and the Protobuf builds; a namespace without
// `allow_tags_filter` refuses the filter.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Centrifuge as ProtobufCentrifuge } from 'centrifuge/build/protobuf';
import WebSocket from 'ws';
import {
  Gate, client, collect, once, room, setup, token, until, watch,
} from './lib/harness.mjs';

const FILE = 'filter';
const NAMESPACES = `
[[namespaces]]
name = "ticks"
history_size = 100
history_ttl = "1h"
recover = true
allow_tags_filter = true
`;

// Goals, and shots with a high expected-goals value: Centrifugo's own example.
const TAGS_FILTER = {
  op: 'or',
  nodes: [
    { key: 'event', cmp: 'eq', val: 'goal' },
    { op: 'and', nodes: [{ key: 'event', cmp: 'eq', val: 'shot' }, { key: 'xG', cmp: 'gte', val: '0.8' }] },
  ],
};

const EVENTS = [
  { n: 1, tags: { event: 'shot', xG: '0.12' } },
  { n: 2, tags: { event: 'goal' } },
  { n: 3, tags: { event: 'corner' } },
  { n: 4, tags: { event: 'shot', xG: '0.83' } },
  { n: 5 },
  { n: 6, tags: { event: 'goal', xG: '0.05' } },
];
const MATCHING = [2, 4, 6];

async function publishEvents(server, channel, events) {
  for (const { n, tags } of events) {
    const { result, error } = await server.api('publish', { channel, data: { n }, ...(tags ? { tags } : {}) });
    assert.ok(result && !error, JSON.stringify(error));
  }
}

test('a subscription with tagsFilter gets only matching publications, live and recovered', async (t) => {
  const { recorder, server } = await setup(t, FILE, { config: NAMESPACES });
  const channel = room('match', 'ticks');
  const gate = new Gate();
  const ann = client(server, recorder, 'ann', {
    token: token('ann'),
    minReconnectDelay: 200,
    maxReconnectDelay: 1_000,
  }, gate);
  const sub = watch(recorder, 'ann', ann.newSubscription(channel, { tagsFilter: TAGS_FILTER }));
  const seen = collect(sub);
  const subscribed = once(sub, 'subscribed');
  ann.connect();
  sub.subscribe();
  await subscribed;
  await publishEvents(server, channel, EVENTS);
  await until(() => seen.length >= MATCHING.length, 'the matching publications');
  // The tags come with each publication, as published.
  assert.deepEqual(seen.map((p) => p.data.n), MATCHING);
  assert.deepEqual(seen[0].tags, { event: 'goal' });

  // Away while more are published: the resubscribe recovers only the matching ones.
  gate.held = true;
  const connecting = once(ann, 'connecting');
  await server.api('disconnect', { user: 'ann', disconnect: { code: 3011, reason: 'go away' } });
  await connecting;
  await publishEvents(server, channel, EVENTS.map(({ n, tags }) => ({ n: n + 10, tags })));
  const resubscribed = once(sub, 'subscribed', { timeout: 8_000 });
  gate.held = false;
  const again = await resubscribed;
  assert.equal(again.recovered, true, JSON.stringify(again));
  await until(() => seen.length >= 2 * MATCHING.length, 'the matching missed ones');
  await new Promise((resolve) => setTimeout(resolve, 200)); // time for anything more to show up
  assert.deepEqual(seen.map((p) => p.data.n), [...MATCHING, ...MATCHING.map((n) => n + 10)]);
});

test('the Protobuf build filters too', async (t) => {
  const { recorder, server } = await setup(t, FILE, { config: NAMESPACES });
  const channel = room('pb', 'ticks');
  const centrifuge = new ProtobufCentrifuge(server.ws, {
    websocket: WebSocket,
    name: 'sdk-test-protobuf-filter',
    token: token('pat'),
  });
  (recorder.clients ??= []).push(centrifuge);
  const sub = watch(recorder, 'pat', centrifuge.newSubscription(channel, { tagsFilter: TAGS_FILTER }));
  const seen = collect(sub);
  const subscribed = once(sub, 'subscribed');
  centrifuge.connect();
  sub.subscribe();
  await subscribed;
  await publishEvents(server, channel, EVENTS);
  await until(() => seen.length >= MATCHING.length, 'the matching publications');
  await new Promise((resolve) => setTimeout(resolve, 200));
  const decoded = seen.map((p) => JSON.parse(new TextDecoder().decode(p.data)).n);
  assert.deepEqual(decoded, MATCHING);
});

test('a namespace without allow_tags_filter refuses the filter (107)', async (t) => {
  const { recorder, server } = await setup(t, FILE, { config: NAMESPACES });
  const ann = client(server, recorder, 'ann', { token: token('ann') });
  const sub = watch(recorder, 'ann', ann.newSubscription(room('nofilter'), { tagsFilter: TAGS_FILTER }));
  // 107 is not temporary: the SDK gives the subscription up.
  const unsubscribed = once(sub, 'unsubscribed');
  ann.connect();
  sub.subscribe();
  const ctx = await unsubscribed;
  assert.equal(ctx.code, 107, JSON.stringify(ctx));
});
