"""The official centrifuge-python SDK against Plexus (memory engine)."""

import asyncio
import json

from centrifuge import Client, ClientState, SubscriptionState

from harness import Events, Relay, publications, room, token, until


async def test_connect_subscribe_receive_presence_history(server, clients, recorder):
    channel = room("py")
    ann_events = Events(recorder, "ann")
    ann = Client(server.ws, events=ann_events, token=token("u1", info={"name": "Ann"}), proxy=None)
    bob = Client(server.ws, events=Events(recorder, "bob"), token=token("u2"), proxy=None)
    clients.extend([ann, bob])

    await ann.connect()
    await ann.ready(timeout=5)
    assert ann.state == ClientState.CONNECTED
    connected = ann_events.of("connected")
    assert len(connected) == 1 and connected[0].client

    sub_events = Events(recorder, "ann/sub")
    sub = ann.new_subscription(channel, events=sub_events)
    await sub.subscribe()
    await sub.ready(timeout=5)
    assert sub.state == SubscriptionState.SUBSCRIBED
    subscribed = sub_events.of("subscribed")[0]
    assert subscribed.recoverable is True, subscribed
    assert subscribed.was_recovering is False
    assert subscribed.stream_position is not None and subscribed.stream_position.epoch, subscribed

    await bob.connect()
    bob_sub = bob.new_subscription(channel, events=Events(recorder, "bob/sub"))
    await bob_sub.subscribe()
    await bob_sub.ready(timeout=5)

    first = await server.publish(channel, {"text": "one"})
    second = await server.publish(channel, {"text": "two"})
    assert first["epoch"] == subscribed.stream_position.epoch
    assert second["offset"] == first["offset"] + 1
    await until(lambda: len(publications(sub_events)) >= 2, "two publications")
    got = publications(sub_events)
    assert [p.data for p in got] == [{"text": "one"}, {"text": "two"}]
    assert [p.offset for p in got] == [first["offset"], second["offset"]]
    assert got[0].info is None, "an API publication has no publisher"

    presence = await sub.presence()
    assert sorted(info.user for info in presence.clients.values()) == ["u1", "u2"], presence
    assert connected[0].client in presence.clients
    ann_info = presence.clients[connected[0].client]
    assert ann_info.conn_info == {"name": "Ann"}
    stats = await sub.presence_stats()
    assert (stats.num_clients, stats.num_users) == (2, 2)

    history = await sub.history(limit=10)
    assert [p.data for p in history.publications] == [{"text": "one"}, {"text": "two"}]
    assert [p.offset for p in history.publications] == [first["offset"], second["offset"]]
    assert history.offset == second["offset"]
    assert history.epoch == first["epoch"]

    await asyncio.sleep(0.2)
    assert len(publications(sub_events)) == 2, "nothing arrived twice"


async def test_recovery_after_api_disconnect(server, clients, recorder):
    channel = room("pyrecover")
    relay = await Relay(server.port).start()
    try:
        events = Events(recorder, "ann")
        ann = Client(relay.ws, events=events, token=token("u1"), proxy=None,
                     min_reconnect_delay=0.2, max_reconnect_delay=1.0)
        clients.append(ann)
        sub_events = Events(recorder, "ann/sub")
        await ann.connect()
        sub = ann.new_subscription(channel, events=sub_events)
        await sub.subscribe()
        await sub.ready(timeout=5)

        before = [await server.publish(channel, {"n": n}) for n in (1, 2)]
        await until(lambda: len(publications(sub_events)) >= 2, "the first two publications")

        # Reconnects are held back until the missed publications are in: they can only come
        # back by recovery.
        relay.held = True
        mark = len(events.seen)
        reply = await server.api("disconnect", {"user": "u1",
                                                "disconnect": {"code": 3011, "reason": "force reconnect"}})
        assert "result" in reply, reply
        connecting = await events.next("connecting", mark, "connecting after the server's disconnect")
        assert (connecting.code, connecting.reason) == (3011, "force reconnect"), connecting

        missed = [await server.publish(channel, {"n": n}) for n in range(3, 8)]
        assert ann.state != ClientState.CONNECTED, "the five were published while ann was away"

        sub_mark = len(sub_events.seen)
        relay.held = False
        resubscribed = await sub_events.next("subscribed", sub_mark, "resubscribed", timeout=8)
        assert resubscribed.was_recovering is True, resubscribed
        assert resubscribed.recovered is True, resubscribed
        assert resubscribed.stream_position.epoch == before[0]["epoch"]

        await until(lambda: len(publications(sub_events)) >= 7, "all seven publications")
        await asyncio.sleep(0.3)  # time for a duplicate to show up
        got = publications(sub_events)
        assert [p.data["n"] for p in got] == [1, 2, 3, 4, 5, 6, 7], "in order, none missing, none twice"
        assert [p.offset for p in got] == [r["offset"] for r in before + missed]

        # The five came in the subscribe reply, i.e. by recovery.
        replies = [f["subscribe"] for f in recorder.received() if "subscribe" in f and "id" in f]
        assert replies[-1].get("recovered") is True, replies[-1]
        assert [p["data"]["n"] for p in replies[-1].get("publications", [])] == [3, 4, 5, 6, 7]
    finally:
        await relay.close()


async def test_protobuf_client_beside_a_json_client(server, clients, recorder):
    """centrifuge-python with use_protobuf=True: binary WebSocket frames, any bytes as data."""
    channel = room("pypb")
    pb_events = Events(recorder, "pb")
    pb = Client(server.ws, events=pb_events, token=token("u1", info={"name": "Ann"}),
                proxy=None, use_protobuf=True)
    js = Client(server.ws, events=Events(recorder, "js"), token=token("u2"), proxy=None)
    clients.extend([pb, js])
    await pb.connect()
    await js.connect()
    await pb.ready(timeout=5)
    await js.ready(timeout=5)

    pb_sub_events = Events(recorder, "pb/sub")
    pb_sub = pb.new_subscription(channel, events=pb_sub_events)
    js_sub_events = Events(recorder, "js/sub")
    js_sub = js.new_subscription(channel, events=js_sub_events)
    for sub in (pb_sub, js_sub):
        await sub.subscribe()
        await sub.ready(timeout=5)
    subscribed = pb_sub_events.of("subscribed")[0]
    assert subscribed.recoverable is True and subscribed.stream_position.epoch, subscribed

    binary = bytes([0, 255, 7, 128])
    await pb_sub.publish(binary)
    await js_sub.publish({"text": "from json"})
    api = await server.publish(channel, {"text": "from api"})
    await until(lambda: len(publications(pb_sub_events)) >= 3, "three publications (protobuf)")
    await until(lambda: len(publications(js_sub_events)) >= 3, "three publications (json)")
    pb_got = publications(pb_sub_events)
    js_got = publications(js_sub_events)
    assert pb_got[0].data == binary, "a Protobuf subscriber gets the bytes unchanged"
    assert js_got[0].data == "AP8HgA==", "a JSON subscriber gets them as base64 in a string"
    # JSON data reaches a Protobuf subscriber as the JSON text's bytes, exactly as published.
    assert [json.loads(p.data) for p in pb_got[1:]] == [{"text": "from json"}, {"text": "from api"}]
    assert [p.data for p in js_got[1:]] == [{"text": "from json"}, {"text": "from api"}]
    assert [p.offset for p in pb_got] == [p.offset for p in js_got]
    assert pb_got[2].offset == api["offset"]
    assert pb_got[0].info.user == "u1" and pb_got[0].info.conn_info == b'{"name":"Ann"}'

    history = await pb_sub.history(limit=10)
    assert [p.data for p in history.publications][0] == binary
    assert history.epoch == api["epoch"]
    stats = await pb_sub.presence_stats()
    assert (stats.num_clients, stats.num_users) == (2, 2)


async def test_delta_compression(server, clients, recorder):
    """delta=FOSSIL: the SDK rebuilds each publication from a Fossil delta Plexus made. In the
    built-in quotes namespace, which allows deltas; its demo publisher adds prices of its own
    while the channel is watched, and the deltas chain through them too."""
    from centrifuge import DeltaType

    channel = "quotes:PYDELTA"
    ann = Client(server.ws, events=Events(recorder, "ann"), token=token("u1"), proxy=None)
    clients.append(ann)
    await ann.connect()
    sub_events = Events(recorder, "ann/sub")
    sub = ann.new_subscription(channel, events=sub_events, delta=DeltaType.FOSSIL)
    await sub.subscribe()
    await sub.ready(timeout=5)

    def doc(n):
        return {"kind": "test", "name": "Ёлка", "n": n, "rows": [{"i": i, "v": n * 10 + i} for i in range(8)]}

    for n in range(1, 7):
        await server.publish(channel, doc(n))

    def ours():
        return [p.data for p in publications(sub_events) if isinstance(p.data, dict) and p.data.get("kind") == "test"]

    await until(lambda: len(ours()) >= 6, "six publications")
    assert ours() == [doc(n) for n in range(1, 7)]
    pushed = [f["push"]["pub"] for f in recorder.received()
              if "push" in f and "pub" in f["push"] and f["push"].get("channel") == channel]
    assert sum(1 for p in pushed if p.get("delta")) >= 5, "publications after the first came as deltas"


async def test_tags_filter(clients, recorder):
    """tags_filter: only publications whose tags match reach the subscription (a namespace
    with allow_tags_filter)."""
    from centrifuge import Filter
    from harness import Server

    server = Server(recorder, config=(
        '[[namespaces]]\nname = "ticks"\nhistory_size = 10\nhistory_ttl = "5m"\n'
        'recover = true\nallow_tags_filter = true\n'))
    try:
        await server.wait_healthy()
        channel = room("pyfilter").replace("chat:", "ticks:", 1)
        ann = Client(server.ws, events=Events(recorder, "ann"), token=token("u1"), proxy=None)
        clients.append(ann)
        await ann.connect()
        sub_events = Events(recorder, "ann/sub")
        tags_filter = Filter.any(Filter.eq("ticker", "BTC"), Filter.gte("size", "100"))
        sub = ann.new_subscription(channel, events=sub_events, tags_filter=tags_filter)
        await sub.subscribe()
        await sub.ready(timeout=5)
        sent = [("BTC", "1", 1), ("ETH", "5", 2), ("SOL", "250", 3), ("BTC", "2", 4), ("ETH", "99.9", 5)]
        for ticker, size, n in sent:
            reply = await server.api("publish", {"channel": channel, "data": {"n": n},
                                                 "tags": {"ticker": ticker, "size": size}})
            assert "result" in reply, reply
        await until(lambda: len(publications(sub_events)) >= 3, "the matching publications")
        await asyncio.sleep(0.3)  # time for anything more to show up
        assert [p.data["n"] for p in publications(sub_events)] == [1, 3, 4]
    finally:
        server.cleanup()
