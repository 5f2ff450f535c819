// Several Plexus nodes sharing one Redis (`--engine redis`), driven by the official centrifuge-js
// SDK: delivery, presence and history across nodes; a node killed under a client, which
// reconnects to another node and recovers; and a Redis outage, which no node may survive by
// hiding a gap.
//
// Every test starts its own nodes with a unique `--redis-prefix`, so runs never share keys, and
// removes its keys from the shared Redis (127.0.0.1:6379) afterwards. The outage test runs its
// own `redis-server` child on a free port and kills it; the shared Redis is never stopped.
//
// Skipped when the server refuses `--engine redis` as unknown, or when no Redis / redis-server
// is available.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import net from 'node:net';
import path from 'node:path';
import { API_KEY, EngineUnavailable, Proxy, Recorder, Server, allReady, client, closeAll, collect, freePort, fullHistory, once, readyStatus, room, sleep, token, tryPublish, until, watch } from './lib/harness.mjs';

const FILE = 'cluster';
const SHARED_REDIS_PORT = 6379;
const SHARED_REDIS = `redis://127.0.0.1:${SHARED_REDIS_PORT}`;

/** A key prefix no other run uses. */
function uniquePrefix(what) {
  return `plexus-sdk-${what}-${process.pid}-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
}

/** Whether something accepts TCP connections on `port` (within `timeout` ms). */
function listening(port, timeout = 500) {
  return new Promise((resolve) => {
    const socket = net.connect({ port, host: '127.0.0.1' });
    const done = (ok) => { socket.destroy(); resolve(ok); };
    socket.setTimeout(timeout, () => done(false));
    socket.once('connect', () => done(true));
    socket.once('error', () => done(false));
  });
}

/** One round trip of an inline Redis command (`PING`), answered by `+PONG`. */
function redisPing(port, timeout = 1_000) {
  return new Promise((resolve) => {
    const socket = net.connect({ port, host: '127.0.0.1' });
    let reply = '';
    const done = (ok) => { socket.destroy(); resolve(ok); };
    socket.setTimeout(timeout, () => done(false));
    socket.once('connect', () => socket.write('PING\r\n'));
    socket.on('data', (chunk) => {
      reply += chunk;
      if (reply.includes('\r\n')) done(reply.startsWith('+PONG'));
    });
    socket.once('error', () => done(false));
  });
}

/** Deletes every key under `prefix` from the Redis on `port` (best effort, via redis-cli). */
function dropKeys(port, prefix) {
  const scan = spawnSync('redis-cli', ['-p', String(port), '--scan', '--pattern', `${prefix}:*`], { encoding: 'utf8' });
  if (scan.status !== 0) return;
  const keys = scan.stdout.split('\n').filter((key) => key.length > 0);
  for (let i = 0; i < keys.length; i += 200) {
    spawnSync('redis-cli', ['-p', String(port), 'DEL', ...keys.slice(i, i + 200)], { encoding: 'utf8' });
  }
}

/** A `redis-server` child that keeps nothing on disk, on a port of its own. */
class RedisChild {
  constructor(recorder, port) {
    Object.assign(this, { recorder, port, child: null, exited: null });
    this.url = `redis://127.0.0.1:${port}`;
  }

  async start() {
    const args = ['--port', String(this.port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'];
    this.recorder.add('redis', `$ redis-server ${args.map((a) => (a === '' ? '""' : a)).join(' ')}`);
    const child = spawn('redis-server', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    this.child = child;
    child.stdout.on('data', (chunk) => this.recorder.add('redis:out', chunk));
    child.stderr.on('data', (chunk) => this.recorder.add('redis:err', chunk));
    this.exited = new Promise((resolve) => {
      child.on('exit', (code, signal) => {
        this.recorder.add('redis', `exited: code ${code} signal ${signal}`);
        resolve({ code, signal });
      });
      child.on('error', (error) => {
        this.recorder.add('redis', `spawn error ${error.message}`);
        resolve({ error });
      });
    });
    await until(async () => {
      if (child.exitCode !== null || child.signalCode !== null) throw new Error(`redis-server on ${this.port} exited at start`);
      return redisPing(this.port);
    }, `redis-server on port ${this.port}`, 5_000);
  }

  async kill() {
    const { child } = this;
    if (child && child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await this.exited;
  }
}


/** Whether the shared Redis answers. */
const sharedRedisUp = await redisPing(SHARED_REDIS_PORT);
const redisServerBinary = spawnSync('redis-server', ['--version'], { encoding: 'utf8' }).status === 0;

/**
 * A recorder, and `start(label, options)` for nodes that are all killed (and the recorder saved)
 * when the test ends; `cleanups` run first (LIFO).
 */
function cluster(t) {
  const recorder = new Recorder(`${FILE}--${t.name}`);
  const nodes = [];
  const cleanups = [];
  t.after(async () => {
    closeAll(recorder);
    for (const cleanup of cleanups.reverse()) {
      try {
        await cleanup();
      } catch (error) {
        recorder.add('cleanup', `failed: ${error.message}`);
      }
    }
    await Promise.all(nodes.map((node) => node.cleanup()));
    recorder.save();
  });
  t.diagnostic(`frames and server output: ${path.relative(process.cwd(), recorder.path)}`);
  const start = async (label, options) => {
    const node = await Server.start(recorder, { engine: 'redis', label, ...options });
    nodes.push(node);
    return node;
  };
  return { recorder, start, cleanups };
}

/** Starts the nodes, or skips the test when the binary has no redis engine. */
async function startNodes(t, start, labels, options) {
  try {
    const nodes = [];
    for (const label of labels) nodes.push(await start(label, options));
    return nodes;
  } catch (error) {
    if (error instanceof EngineUnavailable) {
      t.skip(error.message);
      return null;
    }
    throw error;
  }
}


test('three nodes share publications, presence and history through Redis', {
  timeout: 60_000,
  skip: sharedRedisUp ? false : `no Redis at ${SHARED_REDIS}`,
}, async (t) => {
  const { recorder, start, cleanups } = cluster(t);
  const prefix = uniquePrefix('three');
  cleanups.push(() => dropKeys(SHARED_REDIS_PORT, prefix));
  const nodes = await startNodes(t, start, ['A', 'B', 'C'], { redisUrl: SHARED_REDIS, redisPrefix: prefix });
  if (!nodes) return;
  const [a, b, c] = nodes;
  await allReady(nodes, 200, '/ready 200 on the three nodes', 10_000);

  const channel = room('cluster');
  const subscribe = async (node, label, user) => {
    const centrifuge = client(node, recorder, label, { token: token(user) });
    const sub = watch(recorder, label, centrifuge.newSubscription(channel));
    const seen = collect(sub);
    centrifuge.connect();
    sub.subscribe();
    await sub.ready(5_000);
    return { centrifuge, sub, seen };
  };
  const ann = await subscribe(a, 'ann', 'u-ann');
  const bob = await subscribe(b, 'bob', 'u-bob');
  const cat = await subscribe(c, 'cat', 'u-cat');

  // One publication through node A's API, one from an SDK client connected to node A.
  const first = await a.publish(channel, { n: 1, via: 'api' });
  await ann.sub.publish({ n: 2, via: 'sdk' });

  for (const [label, { seen }] of [['ann', ann], ['bob', bob], ['cat', cat]]) {
    await until(() => seen.length >= 2, `${label} to receive both publications`, 5_000);
  }
  await sleep(300); // time for a duplicate to show up
  const history = await fullHistory(a, channel);
  assert.equal(history.epoch, first.epoch, 'one epoch');
  assert.deepEqual(history.publications.map((p) => p.data), [{ n: 1, via: 'api' }, { n: 2, via: 'sdk' }]);
  const expected = history.publications.map((p) => ({ data: p.data, offset: p.offset }));
  assert.equal(expected[0].offset, first.offset);
  for (const [label, { seen }] of [['ann', ann], ['bob', bob], ['cat', cat]]) {
    assert.deepEqual(seen.map((p) => ({ data: p.data, offset: p.offset })), expected, `${label} (node ${{ ann: 'A', bob: 'B', cat: 'C' }[label]}) saw both once, in order`);
  }
  // The SDK publication carries its publisher's info wherever it is delivered.
  assert.equal(bob.seen[1].info?.user, 'u-ann', `info of the SDK publication on node B: ${JSON.stringify(bob.seen[1])}`);
  assert.equal(cat.seen[1].info?.client, ann.centrifuge.clientId);

  // Presence asked of node A lists the clients of every node.
  const ids = [ann, bob, cat].map(({ centrifuge }) => centrifuge.clientId);
  assert.ok(ids.every(Boolean), `client ids: ${JSON.stringify(ids)}`);
  const { result: presence } = await a.api('presence', { channel });
  assert.deepEqual(Object.keys(presence.presence).sort(), [...ids].sort(), `presence on A: ${JSON.stringify(presence)}`);
  assert.deepEqual(
    Object.values(presence.presence).map((p) => p.user).sort(),
    ['u-ann', 'u-bob', 'u-cat'],
  );
  for (const node of [b, c]) {
    const { result } = await node.api('presence', { channel });
    assert.deepEqual(Object.keys(result.presence).sort(), [...ids].sort(), `presence on ${node.port}`);
  }
  const { result: stats } = await a.api('presence_stats', { channel });
  assert.deepEqual(stats, { num_clients: 3, num_users: 3 });

  // History is the same from every node.
  for (const node of [b, c]) {
    assert.deepEqual(await fullHistory(node, channel), history, `history on node ${node.port} equals node A's`);
  }
});

test('a client whose node is SIGKILLed reconnects to another node and recovers every acknowledged publication once', {
  timeout: 60_000,
  skip: sharedRedisUp ? false : `no Redis at ${SHARED_REDIS}`,
}, async (t) => {
  const { recorder, start, cleanups } = cluster(t);
  const prefix = uniquePrefix('kill');
  cleanups.push(() => dropKeys(SHARED_REDIS_PORT, prefix));
  const nodes = await startNodes(t, start, ['A', 'B', 'C'], { redisUrl: SHARED_REDIS, redisPrefix: prefix });
  if (!nodes) return;
  const [a, b, c] = nodes;
  await allReady(nodes, 200, '/ready 200 on the three nodes', 10_000);

  const proxy = await new Proxy(recorder, a.port).listen();
  cleanups.push(() => proxy.close());
  const channel = room('X');
  const ann = client({ ws: `ws://127.0.0.1:${proxy.port}/connection/websocket` }, recorder, 'ann', {
    token: token('u-ann'),
    minReconnectDelay: 100,
    maxReconnectDelay: 500,
  });
  const sub = watch(recorder, 'ann', ann.newSubscription(channel));
  const seen = collect(sub);
  const subscribedEvents = [];
  sub.on('subscribed', (ctx) => subscribedEvents.push(ctx));
  ann.connect();
  sub.subscribe();
  await sub.ready(5_000);
  const firstClient = ann.clientId;

  // Publish through node C every 50 ms, keeping what was acknowledged.
  const acks = [];
  let publishing = true;
  const failures = [];
  const publisher = (async () => {
    for (let n = 1; publishing; n += 1) {
      try {
        const ack = await c.publish(channel, { n });
        acks.push({ n, ...ack });
      } catch (error) {
        failures.push(`${n}: ${error.message}`);
      }
      await sleep(50);
    }
  })();
  cleanups.push(async () => { publishing = false; await publisher; });

  await until(() => acks.length >= 10 && seen.length >= 5, 'ten acknowledged publications, five received', 10_000);
  const resubscribed = once(sub, 'subscribed', { timeout: 15_000 });
  await a.kill('SIGKILL');
  recorder.add('test', `node A killed after ${acks.length} acknowledged publications, ${seen.length} received`);
  proxy.switchTo(b.port);

  const ctx = await resubscribed;
  recorder.add('test', `resubscribed after ${acks.length} acknowledged publications`);
  assert.notEqual(ann.clientId, firstClient, 'a new connection');
  assert.equal(ctx.wasRecovering, true, `subscribed context: ${JSON.stringify(ctx)}`);
  assert.equal(ctx.recovered, true, `subscribed context: ${JSON.stringify(ctx)}`);
  assert.equal(ctx.streamPosition?.epoch, acks[0].epoch, 'same epoch');

  // Keep publishing for a while on the new node, then stop.
  const resumedAt = acks.length;
  await until(() => acks.length >= resumedAt + 10, 'ten more acknowledged publications', 10_000);
  publishing = false;
  await publisher;
  assert.deepEqual(failures, [], 'no publish through node C failed');
  const last = acks.at(-1);
  await until(() => seen.length > 0 && seen.at(-1).offset >= last.offset, `the client to reach offset ${last.offset}`, 5_000)
    .catch(() => {}); // the exact comparison below says what is missing
  await sleep(300); // time for a duplicate to show up

  assert.deepEqual(seen.map((p) => p.data.n), acks.map((ack) => ack.n), 'every acknowledged publication once, in order');
  assert.deepEqual(seen.map((p) => p.offset), acks.map((ack) => ack.offset));
  const history = await fullHistory(b, channel);
  assert.deepEqual(
    seen.map((p) => ({ data: p.data, offset: p.offset })),
    history.publications.map((p) => ({ data: p.data, offset: p.offset })),
    'what the client saw is the history',
  );
  assert.equal(subscribedEvents.length, 2);
});

/**
 * The outage both Redis tests go through: a `redis-server` child, nodes A, B and C on it, `ann`
 * on node A subscribed to a channel with history; three publications through node C; Redis
 * killed for a while (checked: every node keeps running, `/ready` turns 503, `/api/publish`
 * fails fast on every node); Redis restarted empty on the same port (checked: `/ready` back to
 * 200 by itself); then five publications through node C, acknowledged in a new epoch.
 */
async function outage(t, what) {
  const { recorder, start, cleanups } = cluster(t);
  const redisPort = await freePort();
  const redis = new RedisChild(recorder, redisPort);
  cleanups.push(() => redis.kill());
  await redis.start();
  const nodes = await startNodes(t, start, ['A', 'B', 'C'], { redisUrl: redis.url, redisPrefix: uniquePrefix(what) });
  if (!nodes) return null;
  const [a, , c] = nodes;
  await allReady(nodes, 200, '/ready 200 on the three nodes', 10_000);

  const channel = room(what);
  const ann = client(a, recorder, 'ann', {
    token: token('u-ann'),
    minReconnectDelay: 100,
    maxReconnectDelay: 1_000,
  });
  const sub = watch(recorder, 'ann', ann.newSubscription(channel));
  const seen = collect(sub);
  const subscribedEvents = [];
  sub.on('subscribed', (ctx) => subscribedEvents.push(ctx));
  ann.connect();
  sub.subscribe();
  await sub.ready(5_000);

  const before = [];
  for (let n = 1; n <= 3; n += 1) before.push({ n, ...(await c.publish(channel, { n })) });
  await until(() => seen.length >= 3, 'the three publications before the outage', 5_000);

  // Redis goes away for a while.
  await redis.kill();
  recorder.add('test', 'redis killed');
  const downAt = Date.now();
  await allReady(nodes, 503, '/ready 503 on every node while Redis is down', 10_000);
  for (const node of nodes) {
    const failed = await tryPublish(node, channel, { n: 'during' }, 15_000);
    assert.ok(!failed.error, `/api/publish on node ${node.port} answered during the outage (after ${failed.ms} ms): ${failed.error?.message}`);
    assert.ok(failed.ms <= 6_500, `/api/publish on node ${node.port} answered within ~6 s during the outage, took ${failed.ms} ms`);
    assert.ok(
      failed.status >= 400 || failed.body?.error,
      `/api/publish on node ${node.port} during the outage is an error: ${failed.status} ${JSON.stringify(failed.body)}`,
    );
    assert.equal(failed.body?.result, undefined, 'no result during the outage');
  }
  await sleep(Math.max(0, 1_500 - (Date.now() - downAt)));
  assert.ok((await Promise.all(nodes.map(readyStatus))).every((s) => s === 503), '/ready still 503');
  for (const node of nodes) {
    assert.equal(node.child.exitCode, null, `node ${node.port} still runs`);
    assert.equal(node.child.signalCode, null, `node ${node.port} still runs`);
  }

  // Redis comes back, empty, on the same port.
  const outageSeen = seen.length;
  const restartedAt = Date.now();
  await redis.start();
  recorder.add('test', 'redis restarted');
  await allReady(nodes, 200, '/ready 200 on every node once Redis is back', 15_000);
  t.diagnostic(`nodes ready ${Date.now() - restartedAt} ms after Redis restarted`);

  // A second client on node A, subscribed only now: what node A delivers since the restart.
  const dan = client(a, recorder, 'dan', { token: token('u-dan') });
  const danSub = watch(recorder, 'dan', dan.newSubscription(channel));
  const danSeen = collect(danSub);
  dan.connect();
  danSub.subscribe();
  await danSub.ready(5_000);

  const after = [];
  for (let n = 4; n <= 8; n += 1) {
    after.push({ n, ...(await c.publish(channel, { n })) });
    await sleep(50);
  }
  assert.equal(new Set(after.map((ack) => ack.epoch)).size, 1, 'one epoch after the restart');
  assert.notEqual(after[0].epoch, before[0].epoch, 'Redis kept nothing: the stream has a new epoch');
  await until(() => seen.some((p) => p.data.n === 8), 'the last publication at the client', 10_000).catch(() => {});
  await until(() => danSeen.some((p) => p.data.n === 8), 'the last publication at dan', 5_000).catch(() => {});
  await sleep(500); // time for a duplicate to show up
  recorder.add('test', `the client saw ${JSON.stringify(seen.map((p) => [p.data.n, p.offset]))} ([n, offset]); subscribed events ${JSON.stringify(subscribedEvents)}`);
  return { recorder, nodes, channel, ann, seen, danSeen, subscribedEvents, before, after, outageSeen };
}

test('a Redis outage: nodes stay up, /ready goes 503 and back, publishing fails fast and resumes', {
  timeout: 90_000,
  skip: redisServerBinary ? false : 'no redis-server binary',
}, async (t) => {
  const run = await outage(t, 'outage');
  if (!run) return;
  const { nodes: [a, b], channel, seen, danSeen, after } = run;
  // A client that subscribed on node A after the restart gets every publication since, once.
  assert.deepEqual(
    danSeen.map((p) => ({ n: p.data.n, offset: p.offset })),
    after.map((ack) => ({ n: ack.n, offset: ack.offset })),
    'dan (subscribed on node A after the restart) saw every publication since, once, in order',
  );
  // Publishing works again from every node (C above), and reaches the client on node A.
  for (const [i, node] of [a, b].entries()) {
    const n = 9 + i;
    const ack = await node.publish(channel, { n });
    assert.equal(ack.epoch, run.after[0].epoch);
    await until(() => seen.some((p) => p.data.n === n), `publication ${n} through node ${node.port} at the client`, 5_000);
    await until(() => danSeen.some((p) => p.data.n === n), `publication ${n} through node ${node.port} at dan`, 5_000);
  }
  const history = await fullHistory(b, channel);
  assert.deepEqual(history.publications.map((p) => p.data.n), [4, 5, 6, 7, 8, 9, 10], 'history since the restart');
});

// After Redis restarts empty, the channel's stream starts again in a new epoch at offset 1, while
// `ann`'s connection to node A never broke. When node A's Redis subscriber reconnects, the engine
// tells the hub deliveries may have been lost, and every protocol subscriber there gets an
// unsubscribe push 2500 "insufficient state": the SDK resubscribes with its old position and is
// told `recovered: false` (another epoch) instead of silently skipping offsets it thinks it has.
test('a Redis outage that loses history never leaves a silent gap at a subscribed client', {
  timeout: 90_000,
  skip: redisServerBinary ? false : 'no redis-server binary',
}, async (t) => {
  const run = await outage(t, 'gap');
  if (!run) return;
  const { seen, subscribedEvents, before, after, outageSeen } = run;
  const all = seen.map((p) => p.data.n);
  const got = seen.slice(outageSeen).map((p) => p.data.n);

  // Never twice, never out of order.
  assert.deepEqual(all, [...new Set(all)], `no publication twice: ${JSON.stringify(all)}`);
  assert.deepEqual(all, [...all].sort((x, y) => x - y), `in order: ${JSON.stringify(all)}`);
  assert.deepEqual(all.slice(0, 3), [1, 2, 3]);

  // A resubscription after the restart must not claim to have recovered across the new epoch.
  const later = subscribedEvents.slice(1);
  for (const ctx of later.filter((c) => c.wasRecovering && c.recovered)) {
    assert.notEqual(ctx.streamPosition?.epoch, before[0].epoch, `recovered: true across the epoch change: ${JSON.stringify(ctx)}`);
  }
  // Whatever acknowledged after the restart is missing must have been announced by
  // recovered: false.
  const missing = after.map((ack) => ack.n).filter((n) => !got.includes(n));
  if (missing.length > 0) {
    assert.ok(
      later.some((ctx) => ctx.wasRecovering && !ctx.recovered),
      `acknowledged after the restart but never delivered: n ${JSON.stringify(missing)} (offsets ${JSON.stringify(after.filter((ack) => missing.includes(ack.n)).map((ack) => ack.offset))} of epoch ${after[0].epoch}), and no subscribed event said recovered: false; the client saw n ${JSON.stringify(all)}`,
    );
  }
  // If the subscription never broke, the client's position must be in the new epoch by now.
  if (later.length === 0) {
    assert.equal(
      run.recorder.frames('ann', '<').filter((f) => f.push?.pub).at(-1)?.push.pub.offset,
      after.at(-1).offset,
      'the last push is the last publication',
    );
    assert.deepEqual(got, after.map((ack) => ack.n), 'a subscription that never broke got every publication since the restart');
  }
});

test('delta compression and tags filters across nodes: a publication through node A reaches node B as a delta, or not at all', {
  timeout: 60_000,
  skip: sharedRedisUp ? false : `no Redis at ${SHARED_REDIS}`,
}, async (t) => {
  const { recorder, start, cleanups } = cluster(t);
  const prefix = uniquePrefix('delta');
  cleanups.push(() => dropKeys(SHARED_REDIS_PORT, prefix));
  const config = `
[[namespaces]]
name = "prices"
history_size = 100
history_ttl = "1h"
recover = true
allowed_delta_types = ["fossil"]
allow_tags_filter = true
`;
  const nodes = await startNodes(t, start, ['A', 'B'], { redisUrl: SHARED_REDIS, redisPrefix: prefix, config });
  if (!nodes) return;
  const [a, b] = nodes;
  await allReady(nodes, 200, '/ready 200 on both nodes', 10_000);

  const channel = room('quotes', 'prices');
  const subscribe = async (label, options) => {
    const centrifuge = client(b, recorder, label, { token: token(`u-${label}`) });
    const sub = watch(recorder, label, centrifuge.newSubscription(channel, options));
    const seen = collect(sub);
    centrifuge.connect();
    sub.subscribe();
    await sub.ready(5_000);
    return { sub, seen };
  };
  const deltas = await subscribe('dee', { delta: 'fossil' });
  const filtered = await subscribe('fay', { tagsFilter: { key: 'venue', cmp: 'eq', val: 'east' } });
  const quote = (n) => ({ symbol: 'BTC-USD', price: 50_000 + n, bid: 49_990 + n, ask: 50_010 + n, venues: ['east', 'west'] });
  for (let n = 1; n <= 10; n++) {
    const { error } = await a.api('publish', { channel, data: quote(n), tags: { venue: n % 2 ? 'east' : 'west' } });
    assert.equal(error, undefined, JSON.stringify(error));
  }
  await until(() => deltas.seen.length >= 10 && filtered.seen.length >= 5, 'the publications on node B', 5_000);
  await sleep(300);
  assert.deepEqual(deltas.seen.map((p) => p.data), Array.from({ length: 10 }, (_, i) => quote(i + 1)));
  assert.equal(deltas.sub.deltaStats().numDeltaPayloads, 9, JSON.stringify(deltas.sub.deltaStats()));
  assert.deepEqual(filtered.seen.map((p) => p.data.price - 50_000), [1, 3, 5, 7, 9]);
});
