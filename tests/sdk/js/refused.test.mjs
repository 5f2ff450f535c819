// What the server refuses, as the official centrifuge-js SDK sees it.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  client, once, room, setup, subscriptionToken, token, until, watch,
} from './lib/harness.mjs';

const FILE = 'refused';

test('a token signed with the wrong secret ends disconnected with 3500', async (t) => {
  const { recorder, server } = await setup(t, FILE);
  const mallory = client(server, recorder, 'mallory', {
    token: token('u1', { secret: 'not-the-server-secret' }),
    minReconnectDelay: 100,
    maxReconnectDelay: 200,
  });
  let connected = false;
  mallory.on('connected', () => { connected = true; });
  const disconnected = once(mallory, 'disconnected');
  mallory.connect();
  const ctx = await disconnected;
  assert.equal(ctx.code, 3500, `disconnected context: ${JSON.stringify(ctx)}`);
  // It stays disconnected: 3500 is not a reconnect code.
  await new Promise((resolve) => setTimeout(resolve, 600));
  assert.equal(mallory.state, 'disconnected');
  assert.equal(connected, false);
  const connects = recorder.frames('mallory', '>').filter((f) => f.connect);
  assert.equal(connects.length, 1, 'exactly one connect attempt');
});

test('an expired token makes the SDK call getToken, and the new token connects', async (t) => {
  const { recorder, server } = await setup(t, FILE);
  const past = Math.floor(Date.now() / 1000) - 60;
  let calls = 0;
  const dana = client(server, recorder, 'dana', {
    token: token('u4', { exp: past }),
    getToken: async () => {
      calls += 1;
      return token('u4', { exp: Math.floor(Date.now() / 1000) + 3600 });
    },
    minReconnectDelay: 100,
    maxReconnectDelay: 500,
  });
  const connected = once(dana, 'connected', { timeout: 8_000 });
  dana.connect();
  const ctx = await connected;
  assert.equal(typeof ctx.client, 'string');
  assert.equal(calls, 1, 'getToken called once');
  assert.equal(dana.state, 'connected');
  // The server answered the first connect with error 109 (token expired), not a disconnect.
  const replies = recorder.frames('dana', '<').filter((f) => f.error);
  assert.equal(replies[0]?.error?.code, 109, `first error reply: ${JSON.stringify(replies[0])}`);
});

test('subscribing to an unknown namespace fails with 102', async (t) => {
  const { recorder, server } = await setup(t, FILE);
  const erin = client(server, recorder, 'erin', { token: token('u5') });
  erin.connect();
  await erin.ready(5_000);
  const sub = watch(recorder, 'erin', erin.newSubscription('nosuchns:room'));
  const unsubscribed = once(sub, 'unsubscribed');
  sub.subscribe();
  const ctx = await unsubscribed;
  assert.equal(ctx.code, 102, `unsubscribed context: ${JSON.stringify(ctx)}`);
  assert.equal(sub.state, 'unsubscribed');
  await assert.rejects(sub.ready(1_000));
  assert.equal(erin.state, 'connected', 'a refused subscription leaves the connection up');
});

test("subscribing to another user's channel, or with a token for another channel, fails with 103", async (t) => {
  const { recorder, server } = await setup(t, FILE);
  const erin = client(server, recorder, 'erin', { token: token('u5') });
  erin.connect();
  await erin.ready(5_000);

  // A user-limited channel for u7 and u8 only.
  const limited = watch(recorder, 'erin', erin.newSubscription(`${room('dm')}#u7,u8`));
  const refused = once(limited, 'unsubscribed');
  limited.subscribe();
  const ctx = await refused;
  assert.equal(ctx.code, 103, `user-limited channel: ${JSON.stringify(ctx)}`);

  // Her own user-limited channel is fine.
  const own = watch(recorder, 'erin', erin.newSubscription(`${room('dm')}#u5,u7`));
  own.subscribe();
  await own.ready(5_000);

  // A subscription token for another channel.
  const channel = room('private');
  const jwtFor = (ch) => subscriptionToken('u5', ch);
  const wrong = watch(recorder, 'erin', erin.newSubscription(channel, { token: jwtFor(`${channel}-other`) }));
  const wrongRefused = once(wrong, 'unsubscribed');
  wrong.subscribe();
  assert.equal((await wrongRefused).code, 103, 'subscription token for another channel');
  const right = watch(recorder, 'erin', erin.newSubscription(`${channel}-ok`, { token: jwtFor(`${channel}-ok`) }));
  right.subscribe();
  await right.ready(5_000);
  await until(() => erin.state === 'connected', 'erin still connected');
});
