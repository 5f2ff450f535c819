// Expiring tokens refreshed by the official centrifuge-js SDK. The SDK sends `refresh` and
// `sub_refresh` when the `ttl` it was given runs out, that is at the expiry itself, so the
// server must give it time (`expired_close_delay`, as Centrifugo's) instead of closing first.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  client, once, room, setup, sleep, subscriptionToken, token, until, watch,
} from './lib/harness.mjs';

const FILE = 'refresh';
const inTwoSeconds = () => Math.floor(Date.now() / 1000) + 2;

test('a connection token that expires every 2 s is refreshed in place: same client, no reconnect', async (t) => {
  const { recorder, server } = await setup(t, FILE);
  let calls = 0;
  const ann = client(server, recorder, 'ann', {
    token: token('ann', { exp: inTwoSeconds() }),
    getToken: async () => {
      calls += 1;
      return token('ann', { exp: inTwoSeconds() });
    },
  });
  const events = [];
  ann.on('connecting', (ctx) => events.push(`connecting ${ctx.code}`));
  ann.on('disconnected', (ctx) => events.push(`disconnected ${ctx.code}`));
  ann.connect();
  const { client: id } = await once(ann, 'connected');
  events.length = 0; // the first connecting
  const channel = room('fresh');
  const sub = watch(recorder, 'ann', ann.newSubscription(channel));
  sub.subscribe();
  await sub.ready(5_000);

  await sleep(6_500);
  assert.deepEqual(events, [], 'neither closed nor reconnected');
  assert.equal(ann.state, 'connected');
  assert.equal(ann.clientId, id, 'the same connection throughout');
  assert.ok(calls >= 2, `getToken called ${calls} times`);
  const count = (direction) => recorder.frames('ann', direction).filter((f) => f.refresh).length;
  assert.ok(count('>') >= 2, `${count('>')} refresh commands`);
  await until(() => count('<') === count('>'), 'every refresh answered with a result');

  const delivered = once(sub, 'publication');
  await server.publish(channel, { still: 'here' });
  assert.deepEqual((await delivered).data, { still: 'here' });
});

test('a subscription token that expires every 2 s is refreshed in place: no unsubscribe', async (t) => {
  const { recorder, server } = await setup(t, FILE);
  const bob = client(server, recorder, 'bob', { token: token('bob') });
  bob.connect();
  await bob.ready(5_000);
  const channel = room('subfresh');
  let calls = 0;
  const sub = watch(recorder, 'bob', bob.newSubscription(channel, {
    getToken: async () => {
      calls += 1;
      return subscriptionToken('bob', channel, { exp: inTwoSeconds() });
    },
  }));
  const events = [];
  sub.on('unsubscribed', (ctx) => events.push(`unsubscribed ${ctx.code}`));
  sub.on('subscribing', (ctx) => events.push(`subscribing ${ctx.code}`));
  sub.subscribe();
  await sub.ready(5_000);
  events.length = 0; // the first subscribing

  await sleep(6_500);
  assert.deepEqual(events, [], 'neither ended nor resubscribed');
  assert.equal(sub.state, 'subscribed');
  assert.ok(calls >= 3, `getToken called ${calls} times`);
  const count = (direction) => recorder.frames('bob', direction).filter((f) => f.sub_refresh).length;
  assert.ok(count('>') >= 2, `${count('>')} sub_refresh commands`);
  await until(() => count('<') === count('>'), 'every sub_refresh answered with a result');
  const delivered = once(sub, 'publication');
  await server.publish(channel, 'still');
  assert.equal((await delivered).data, 'still');
});

test('a token that is not refreshed still ends the connection after the delay (3005)', async (t) => {
  const { recorder, server } = await setup(t, FILE, { args: ['--expired-close-delay', '2s'] });
  const exp = Math.floor(Date.now() / 1000) + 1;
  const cal = client(server, recorder, 'cal', {
    token: token('cal', { exp }),
    // A token source that never answers: the SDK keeps waiting, the server does not.
    getToken: () => new Promise(() => {}),
  });
  const closed = [];
  cal.on('connecting', (ctx) => closed.push(ctx));
  cal.connect();
  await once(cal, 'connected');
  closed.length = 0; // the first connecting
  // Past the token's expiry, within the delay: still connected.
  await sleep(Math.max(0, (exp + 0.5) * 1000 - Date.now()));
  assert.equal(cal.state, 'connected');
  assert.deepEqual(closed, [], 'not closed at the expiry itself');
  // After the delay: closed with 3005.
  await until(() => closed.length > 0, 'the close after the delay', 8_000);
  assert.equal(closed[0].code, 3005, `connecting context: ${JSON.stringify(closed[0])}`);
});
