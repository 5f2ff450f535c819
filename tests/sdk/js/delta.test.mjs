// Delta compression with the official centrifuge-js SDK (`delta: 'fossil'`, as in Centrifugo):
// the SDK rebuilds every publication from Fossil deltas that Plexus makes, in the JSON and the
// Protobuf builds, live and across a reconnect that recovers missed publications.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Centrifuge } from 'centrifuge';
import { Centrifuge as ProtobufCentrifuge } from 'centrifuge/build/protobuf';
import { EventSource } from 'eventsource';
import WebSocket from 'ws';
import {
  Gate, client, collect, once, room, setup, token, until, watch,
} from './lib/harness.mjs';

const FILE = 'delta';
const NAMESPACES = `
[[namespaces]]
name = "prices"
history_size = 100
history_ttl = "1h"
recover = true
allowed_delta_types = ["fossil"]
`;

// A document much like the one before at every update, with text that is not ASCII, so that
// deltas of JSON text must keep whole characters.
const quote = (price) => ({
  symbol: 'BTC-USD',
  name: 'Биткоин — €',
  price,
  bid: price - 3,
  ask: price + 3,
  volume: 1_234_567,
  venues: ['plexus', 'ñandú', '東京'],
  updated: `2026-11-22T10:00:${String(price % 60).padStart(2, '0')}Z`,
});

test('a delta subscriber rebuilds every publication, live and after a recovering reconnect', async (t) => {
  const { recorder, server } = await setup(t, FILE, { config: NAMESPACES });
  const channel = room('btc', 'prices');
  const gate = new Gate();
  const ann = client(server, recorder, 'ann', {
    token: token('ann'),
    minReconnectDelay: 200,
    maxReconnectDelay: 1_000,
  }, gate);
  const bob = client(server, recorder, 'bob', { token: token('bob') });
  const sub = watch(recorder, 'ann', ann.newSubscription(channel, { delta: 'fossil' }));
  const plain = watch(recorder, 'bob', bob.newSubscription(channel));
  const [seen, plainSeen] = [collect(sub), collect(plain)];
  const subscribed = [once(sub, 'subscribed'), once(plain, 'subscribed')];
  for (const c of [ann, bob]) c.connect();
  sub.subscribe();
  plain.subscribe();
  await Promise.all(subscribed);

  const prices = Array.from({ length: 20 }, (_, i) => 50_000 + i * 7);
  for (const price of prices) await server.publish(channel, quote(price));
  await until(() => seen.length >= 20 && plainSeen.length >= 20, 'twenty publications');
  assert.deepEqual(seen.map((p) => p.data), prices.map(quote));
  assert.deepEqual(plainSeen.map((p) => p.data), prices.map(quote));
  const stats = sub.deltaStats();
  assert.equal(stats.numFullPayloads, 1, `only the first whole: ${JSON.stringify(stats)}`);
  assert.equal(stats.numDeltaPayloads, 19, JSON.stringify(stats));
  assert.ok(stats.compressionRatio > 0.5, `bytes saved: ${JSON.stringify(stats)}`);

  // Away while three more are published: recovered, and the deltas go on from there.
  gate.held = true;
  const connecting = once(ann, 'connecting');
  await server.api('disconnect', { user: 'ann', disconnect: { code: 3011, reason: 'go away' } });
  await connecting;
  const missed = [51_000, 51_001, 51_002];
  for (const price of missed) await server.publish(channel, quote(price));
  const resubscribed = once(sub, 'subscribed', { timeout: 8_000 });
  gate.held = false;
  const again = await resubscribed;
  assert.equal(again.recovered, true, JSON.stringify(again));
  const later = [51_010, 51_011];
  for (const price of later) await server.publish(channel, quote(price));
  await until(() => seen.length >= 25, 'the missed and the later publications');
  assert.deepEqual(seen.map((p) => p.data), [...prices, ...missed, ...later].map(quote));
  assert.deepEqual(seen.map((p) => p.offset), Array.from({ length: 25 }, (_, i) => i + 1));
  const after = sub.deltaStats();
  assert.ok(after.numDeltaPayloads >= 20, `deltas after the recovery: ${JSON.stringify(after)}`);
});

test('the Protobuf build rebuilds deltas of bytes', async (t) => {
  const { recorder, server } = await setup(t, FILE, { config: NAMESPACES });
  const channel = room('eth', 'prices');
  const centrifuge = new ProtobufCentrifuge(server.ws, {
    websocket: WebSocket,
    name: 'sdk-test-protobuf-delta',
    token: token('pat'),
  });
  (recorder.clients ??= []).push(centrifuge);
  const sub = watch(recorder, 'pat', centrifuge.newSubscription(channel, { delta: 'fossil' }));
  const seen = collect(sub);
  const subscribed = once(sub, 'subscribed');
  centrifuge.connect();
  sub.subscribe();
  await subscribed;
  const prices = [3_000, 3_001, 3_002, 3_003, 3_004];
  for (const price of prices) await server.publish(channel, quote(price));
  await until(() => seen.length >= prices.length, 'five publications');
  // The Protobuf build hands over data as bytes: here the JSON the API published.
  const decoded = seen.map((p) => JSON.parse(new TextDecoder().decode(p.data)));
  assert.deepEqual(decoded, prices.map(quote));
  const stats = sub.deltaStats();
  assert.equal(stats.numDeltaPayloads, prices.length - 1, JSON.stringify(stats));
});

for (const transport of ['sse', 'http_stream']) {
  test(`${transport}: the fallback transports carry deltas too`, async (t) => {
    const { recorder, server } = await setup(t, FILE, { config: NAMESPACES });
    const channel = room(transport, 'prices');
    const endpoint = transport === 'sse'
      ? `${server.http}/connection/sse`
      : `${server.http}/connection/http_stream`;
    const centrifuge = new Centrifuge([{ transport, endpoint }], {
      eventsource: EventSource,
      fetch,
      readableStream: ReadableStream,
      emulationEndpoint: `${server.http}/emulation`,
      name: `sdk-test-${transport}-delta`,
      token: token('sam'),
    });
    (recorder.clients ??= []).push(centrifuge);
    const sub = watch(recorder, 'sam', centrifuge.newSubscription(channel, { delta: 'fossil' }));
    const seen = collect(sub);
    const subscribed = once(sub, 'subscribed');
    centrifuge.connect();
    sub.subscribe();
    await subscribed;
    const prices = [7_000, 7_001, 7_002, 7_003];
    for (const price of prices) await server.publish(channel, quote(price));
    await until(() => seen.length >= prices.length, 'four publications');
    assert.deepEqual(seen.map((p) => p.data), prices.map(quote));
    assert.equal(sub.deltaStats().numDeltaPayloads, prices.length - 1, JSON.stringify(sub.deltaStats()));
  });
}

test('where the namespace allows no deltas the SDK gets whole publications', async (t) => {
  const { recorder, server } = await setup(t, FILE, { config: NAMESPACES });
  const channel = room('delta');
  const ann = client(server, recorder, 'ann', { token: token('ann') });
  const sub = watch(recorder, 'ann', ann.newSubscription(channel, { delta: 'fossil' }));
  const seen = collect(sub);
  const subscribed = once(sub, 'subscribed');
  ann.connect();
  sub.subscribe();
  await subscribed;
  for (const price of [1, 2, 3]) await server.publish(channel, quote(price));
  await until(() => seen.length >= 3, 'three publications');
  assert.deepEqual(seen.map((p) => p.data), [1, 2, 3].map(quote));
  assert.equal(sub.deltaStats().numDeltaPayloads, 0);
});
