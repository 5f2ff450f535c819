//! Several nodes on one broker, Redis (`engine = "redis"`) and NATS (`engine = "nats"`), run
//! through one scenario (`three_nodes_agree`): a message sent on one node reaches subscribers on
//! the others, and presence, history, `/emulation` routing and `info` agree on every node. Uses
//! the Redis at `PLEXUS_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`) and the NATS at
//! `PLEXUS_TEST_NATS_URL`, under a prefix of the test's own, removed at the end.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use plexus_server::config::EngineKind;
use plexus_server::{Config, ServerHandle};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::emulation::{connect, emulate, Kind};
use crate::util::*;

fn redis_url() -> String {
    std::env::var("PLEXUS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn redis_config(prefix: &str) -> Config {
    Config {
        engine: EngineKind::Redis,
        redis_url: redis_url(),
        redis_prefix: prefix.to_owned(),
        ..Config::for_tests()
    }
}

/// `POST /api/{method}` with the test key; returns the `result` (failing on an `error`).
async fn api(server: &ServerHandle, method: &str, body: Value) -> Value {
    api_result(server, method, body).await
}

/// A raw `/chat/r` client, known to be subscribed: its own `hello` came back.
async fn raw_member(server: &ServerHandle, hello: &str) -> Ws {
    let mut socket = ws(server, "/chat/r").await;
    send_text(&mut socket, hello).await;
    assert_eq!(next_text(&mut socket).await, hello);
    socket
}

/// `info` on every node lists the three nodes (from their heartbeats).
async fn info_lists_every_node(nodes: [&ServerHandle; 3]) {
    let started = std::time::Instant::now();
    for node in nodes {
        loop {
            let info = api(node, "info", json!({})).await;
            if info["nodes"].as_array().unwrap().len() == 3 {
                break;
            }
            assert!(started.elapsed() < TIMEOUT, "{info}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// An HTTP-streaming client of node `a` whose commands come through node `b`'s `/emulation`
/// (as behind a load balancer) still subscribes, and hears a publication made on node `c`.
async fn emulation_through_another_node(a: &ServerHandle, b: &ServerHandle, c: &ServerHandle) {
    let (mut client, session, node) = connect(a, Kind::HttpStream, "emu").await;
    let info = api(a, "info", json!({})).await;
    assert!(
        info["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|listed| listed["uid"] == node.as_str()),
        "{info}"
    );
    let channel = "chat:emu-cluster";
    let subscribe = json!({"id": 2, "subscribe": {"channel": channel}}).to_string();
    assert_eq!(emulate(b, &session, &node, &subscribe).await, 200);
    let reply = client.reply().await;
    assert_eq!(reply["id"], 2, "{reply}");
    assert!(reply.get("subscribe").is_some(), "{reply}");
    api(
        c,
        "publish",
        json!({"channel": channel, "data": {"text": "to a stream"}}),
    )
    .await;
    let push = client.reply().await;
    assert_eq!(push["push"]["channel"], channel, "{push}");
    assert_eq!(push["push"]["pub"]["data"], json!({"text": "to a stream"}));
    // A session that its named node does not have is still unknown there.
    assert_eq!(emulate(a, "no-such-session", &node, "{}").await, 404);
}

/// Deletes every key under `prefix` (best effort), over a hand-written RESP request.
async fn remove_keys(prefix: &str) {
    let address = redis_url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let Ok(mut redis) = TcpStream::connect(address).await else {
        return;
    };
    let script = "for _, key in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('DEL', key) end";
    let pattern = format!("{prefix}:*");
    let mut request = String::from("*4\r\n");
    for part in ["EVAL", script, "0", &pattern] {
        request.push_str(&format!("${}\r\n{part}\r\n", part.len()));
    }
    let _ = redis.write_all(request.as_bytes()).await;
    let mut reply = [0u8; 64];
    let _ = tokio::time::timeout(TIMEOUT, redis.read(&mut reply)).await;
}

/// A unique key prefix (or NATS stream prefix) for one test run.
fn unique_prefix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("plexus-cluster-{}-{nanos}", std::process::id())
}

/// Three nodes configured by `config` (given the prefix) on one broker: raw rooms, the API,
/// presence, history, leaving, `/emulation` through another node and `info` all agree across
/// nodes.
async fn three_nodes_agree(engine: &str, prefix: &str, config: impl Fn(&str) -> Config) {
    let a = start(config(prefix)).await;
    let b = start(config(prefix)).await;
    let c = start(config(prefix)).await;
    assert_eq!(a.engine(), engine);

    let mut on_b = raw_member(&b, "b is here").await;
    let mut on_c = raw_member(&c, "c is here").await;
    assert_eq!(next_text(&mut on_b).await, "c is here");

    // A raw client on node A talks; B and C hear it, in the same order as A itself.
    let mut on_a = ws(&a, "/chat/r").await;
    send_text(&mut on_a, "hello from a").await;
    send_text(&mut on_a, "and again").await;
    for socket in [&mut on_a, &mut on_b, &mut on_c] {
        assert_eq!(next_text(socket).await, "hello from a");
        assert_eq!(next_text(socket).await, "and again");
    }

    // The server API of node C publishes to everyone too; retried through node B with its
    // idempotency key, it is not published again (history below has it once).
    let keyed = json!({"channel": "chat:r", "data": "from the api", "idempotency_key": "once"});
    let published = api(&c, "publish", keyed.clone()).await;
    assert_eq!(published["offset"], 5, "{published}");
    assert_eq!(
        api(&b, "publish", keyed).await,
        published,
        "the retry's answer"
    );
    for socket in [&mut on_a, &mut on_b, &mut on_c] {
        assert_eq!(next_text(socket).await, r#""from the api""#);
    }

    // Presence of a native client on A lists the clients of every node.
    let (mut ann, ann_id) = native(&a, "ann").await;
    let reply = command(&mut ann, 2, json!({"subscribe": {"channel": "chat:r"}})).await;
    assert!(reply.get("error").is_none(), "{reply}");
    let reply = command(&mut ann, 3, json!({"presence": {"channel": "chat:r"}})).await;
    let clients = reply["presence"]["presence"].as_object().unwrap();
    assert_eq!(clients.len(), 4, "raw on A, B and C, and ann: {reply}");
    assert_eq!(clients[&ann_id], json!({"user": "ann", "client": ann_id}));
    for node in [&a, &b, &c] {
        let presence = api(node, "presence", json!({"channel": "chat:r"})).await;
        assert_eq!(presence["presence"].as_object().unwrap(), clients);
    }

    // New info for ann, through node C's API: her presence entry shows it on every node.
    let refresh = json!({"user": "ann", "expire_at": 0, "info": {"name": "Ann B."}});
    assert_eq!(api(&c, "refresh", refresh).await, json!({}));
    let started = std::time::Instant::now();
    for node in [&b, &a, &c] {
        loop {
            let presence = api(node, "presence", json!({"channel": "chat:r"})).await;
            if presence["presence"][&ann_id]["conn_info"] == json!({"name": "Ann B."}) {
                break;
            }
            assert!(started.elapsed() < TIMEOUT, "{presence}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // One history, the same from every node.
    let history = api(&b, "history", json!({"channel": "chat:r", "limit": -1})).await;
    let texts: Vec<&Value> = history["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|publication| &publication["data"])
        .collect();
    assert_eq!(
        texts,
        [
            "b is here",
            "c is here",
            "hello from a",
            "and again",
            "from the api"
        ]
    );
    assert_eq!(history["offset"], 5);
    assert_eq!(history["epoch"], published["epoch"]);
    for node in [&a, &c] {
        let same = api(node, "history", json!({"channel": "chat:r", "limit": -1})).await;
        assert_eq!(same, history);
    }

    // The same keyed publish sent to all three nodes at once is published once.
    let racing = json!({"channel": "chat:race", "data": "once", "idempotency_key": "race"});
    let answers = futures_util::future::join_all(
        [&a, &b, &c].map(|node| api(node, "publish", racing.clone())),
    )
    .await;
    assert!(
        answers.iter().all(|answer| *answer == answers[0]),
        "{answers:?}"
    );
    assert_eq!(answers[0]["offset"], 1, "{answers:?}");
    let raced = api(&a, "history", json!({"channel": "chat:race", "limit": -1})).await;
    assert_eq!(
        raced["publications"].as_array().unwrap().len(),
        1,
        "{raced}"
    );

    // A client that leaves node C is gone from presence everywhere.
    drop(on_c);
    let started = std::time::Instant::now();
    loop {
        let presence = api(&a, "presence", json!({"channel": "chat:r"})).await;
        if presence["presence"].as_object().unwrap().len() == 3 {
            break;
        }
        assert!(started.elapsed() < TIMEOUT, "{presence}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    emulation_through_another_node(&a, &b, &c).await;
    info_lists_every_node([&a, &b, &c]).await;

    // `channels` asks every node: the raw clients on A and B, and ann on A; none on C.
    for node in [&a, &b, &c] {
        let channels = api(node, "channels", json!({"pattern": "chat:r*"})).await;
        assert_eq!(
            channels,
            json!({"channels": {"chat:r": {"num_clients": 3}}})
        );
    }
    // A node gone before its heartbeat expired delays the answer (the survey's timeout), not
    // spoils it.
    c.shutdown().await;
    let channels = api(&a, "channels", json!({"pattern": "chat:r*"})).await;
    assert_eq!(
        channels,
        json!({"channels": {"chat:r": {"num_clients": 3}}})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_share_rooms_presence_and_history() {
    let prefix = unique_prefix();
    three_nodes_agree("redis", &prefix, redis_config).await;
    remove_keys(&prefix).await;
}

/// When a channel's stream begins again under a subscriber (its Redis keys expired or were
/// deleted: a new epoch, offsets from 1), the subscriber is not left waiting for offsets past
/// the ones it had: it is unsubscribed with 2500 and, resubscribing from its position, learns
/// that it was not recovered and gets the new epoch.
#[tokio::test]
async fn a_stream_that_begins_again_sends_its_subscribers_to_resubscribe() {
    let prefix = unique_prefix();
    let server = start(redis_config(&prefix)).await;
    let channel = "chat:begins-again";
    let (mut socket, _) = native(&server, "ann").await;
    let reply = command(&mut socket, 2, json!({"subscribe": {"channel": channel}})).await;
    let epoch = reply["subscribe"]["epoch"].as_str().unwrap().to_owned();
    for n in 1..=3 {
        api(
            &server,
            "publish",
            json!({"channel": channel, "data": {"n": n}}),
        )
        .await;
        let push = next_json(&mut socket).await;
        assert_eq!(push["push"]["pub"]["offset"], n, "{push}");
    }
    remove_keys(&prefix).await;
    let result = api(
        &server,
        "publish",
        json!({"channel": channel, "data": {"n": 4}}),
    )
    .await;
    assert_eq!(result["offset"], 1, "a new stream: {result}");
    assert_ne!(result["epoch"], epoch.as_str(), "{result}");
    let push = next_json(&mut socket).await;
    assert_eq!(push["push"]["channel"], channel, "{push}");
    assert_eq!(push["push"]["unsubscribe"]["code"], 2500, "{push}");
    let reply = command(
        &mut socket,
        3,
        json!({"subscribe": {"channel": channel, "recover": true, "epoch": epoch, "offset": 3}}),
    )
    .await;
    assert_eq!(reply["subscribe"]["was_recovering"], true, "{reply}");
    assert!(
        reply["subscribe"].get("recovered").is_none(),
        "not recovered: {reply}"
    );
    assert_eq!(reply["subscribe"]["epoch"], result["epoch"], "{reply}");
    remove_keys(&prefix).await;
}

/// A redis-server of the test's own that speaks only TLS and only to clients with a
/// certificate from its CA, on a free port; killed when dropped.
struct TlsRedis {
    child: std::process::Child,
    port: u16,
    pki: plexus_core::conformance::TestPki,
}

impl TlsRedis {
    fn start(dir: &std::path::Path) -> TlsRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pki = plexus_core::conformance::TestPki::new();
        let (ca, cert, key) = pki.write_server_files(dir);
        let child = std::process::Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .arg("--tls-cert-file")
            .arg(&cert)
            .arg("--tls-key-file")
            .arg(&key)
            .arg("--tls-ca-cert-file")
            .arg(&ca)
            .args(["--tls-auth-clients", "yes", "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server runs");
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < TIMEOUT, "redis-server listens");
            std::thread::sleep(Duration::from_millis(20));
        }
        TlsRedis { child, port, pki }
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The same over `rediss://` with client certificates: the nodes trust the Redis's CA
/// through `redis_tls_ca` and show their own certificate (`redis_tls_cert`, `redis_tls_key`);
/// the Redis takes nothing but TLS from a client it can verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_on_a_tls_redis() {
    let dir = tempfile::tempdir().unwrap();
    let redis = TlsRedis::start(dir.path());
    let config = |prefix: &str| Config {
        redis_url: format!("rediss://localhost:{}", redis.port),
        redis_tls_ca: Some(redis.pki.ca.clone()),
        redis_tls_client: Some((redis.pki.client_cert.clone(), redis.pki.client_key.clone())),
        ..redis_config(prefix)
    };
    three_nodes_agree("redis", &unique_prefix(), config).await;
}

/// A Redis Cluster of the test's own: three masters on free ports (bus ports named, so they
/// need not be port + 10000), created with `redis-cli --cluster create`; killed when dropped.
struct RedisCluster {
    nodes: Vec<std::process::Child>,
    ports: Vec<u16>,
}

impl RedisCluster {
    fn start(dir: &std::path::Path) -> RedisCluster {
        let free = RedisCluster::free_port;
        let ports: Vec<u16> = (0..3).map(|_| free()).collect();
        let mut cluster = RedisCluster {
            nodes: Vec::new(),
            ports: ports.clone(),
        };
        for port in &ports {
            cluster.nodes.push(RedisCluster::node(dir, *port, free()));
        }
        let created = std::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(ports.iter().map(|port| format!("127.0.0.1:{port}")))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli runs");
        assert!(created.status.success(), "{created:?}");
        for port in &ports {
            let started = std::time::Instant::now();
            loop {
                let info = std::process::Command::new("redis-cli")
                    .args(["-p", &port.to_string(), "cluster", "info"])
                    .output()
                    .expect("redis-cli runs");
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(started.elapsed() < TIMEOUT, "the cluster is ok on {port}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        cluster
    }
}

impl RedisCluster {
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// A cluster-enabled redis-server on `port`, listening.
    fn node(dir: &std::path::Path, port: u16, bus_port: u16) -> std::process::Child {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                &bus_port.to_string(),
            ])
            .arg("--cluster-config-file")
            .arg(dir.join(format!("nodes-{port}.conf")))
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server runs");
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < TIMEOUT, "redis-server listens");
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    /// Adds a master with no slots (as `redis-cli --cluster add-node` does, before a
    /// resharding gives it some); returns its port once the cluster knows it.
    fn add_master(&mut self, dir: &std::path::Path) -> u16 {
        let (port, bus_port) = (RedisCluster::free_port(), RedisCluster::free_port());
        self.nodes.push(RedisCluster::node(dir, port, bus_port));
        let meet = redis_cli(
            self.ports[0],
            &[
                "cluster",
                "meet",
                "127.0.0.1",
                &port.to_string(),
                &bus_port.to_string(),
            ],
        );
        assert_eq!(meet, "OK");
        let id = redis_cli(port, &["cluster", "myid"]);
        let started = std::time::Instant::now();
        while !self.ports.iter().all(|&known| {
            redis_cli(known, &["cluster", "nodes"])
                .lines()
                .any(|line| line.starts_with(&id) && line.contains("connected"))
        }) {
            assert!(started.elapsed() < TIMEOUT, "the cluster meets {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        while !redis_cli(port, &["cluster", "info"]).contains("cluster_state:ok") {
            assert!(started.elapsed() < TIMEOUT, "the cluster is ok on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        self.ports.push(port);
        port
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for child in &mut self.nodes {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The same on a Redis Cluster (`redis_cluster`): each node is given another master first, so
/// their pub/sub connections go to different cluster nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_on_a_redis_cluster() {
    on_a_redis_cluster(false).await;
}

/// The same with sharded pub/sub (Redis 7's `SSUBSCRIBE`/`SPUBLISH`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_on_a_redis_cluster_with_sharded_pubsub() {
    on_a_redis_cluster(true).await;
}

async fn on_a_redis_cluster(sharded: bool) {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisCluster::start(dir.path());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let config = |prefix: &str| {
        let first = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut seeds: Vec<String> = redis
            .ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        let count = seeds.len();
        seeds.rotate_left(first % count);
        Config {
            // Nothing listens here: everything must go through the cluster's nodes.
            redis_url: "redis://127.0.0.1:1".into(),
            redis_cluster: Some(seeds),
            redis_cluster_sharded_pubsub: sharded,
            ..redis_config(prefix)
        }
    };
    three_nodes_agree("redis", &unique_prefix(), config).await;
}

/// `redis-cli -p PORT ARGS…` (not following redirections): its output, trimmed.
fn redis_cli(port: u16, args: &[&str]) -> String {
    let output = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Publishing keeps working while a channel's slot moves to another master, as
/// `redis-cli --cluster reshard` moves it: while the slot is migrating and its keys are
/// already on the new master (`ASK`, followed with `ASKING`), and once it belongs there but
/// this node's map still says otherwise (`MOVED`). The channel's history is whole: one stream,
/// offsets 1 to 5.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publishing_follows_a_channel_whose_slot_moves_to_another_master() {
    slot_moves(false).await;
}

/// The same with sharded pub/sub, whose `SPUBLISH` the publish script runs on the new
/// master, and the slot moved to a master added for it (scaling out): one no map lists
/// until the move is done, which `ASK` names first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publishing_follows_a_moving_slot_to_a_new_master_with_sharded_pubsub() {
    slot_moves(true).await;
}

async fn slot_moves(to_a_new_master: bool) {
    let sharded = to_a_new_master;
    let dir = tempfile::tempdir().unwrap();
    let mut redis = RedisCluster::start(dir.path());
    let seeds = redis
        .ports
        .iter()
        .map(|port| format!("127.0.0.1:{port}"))
        .collect();
    let prefix = unique_prefix();
    let server = start(Config {
        redis_url: "redis://127.0.0.1:1".into(),
        redis_cluster: Some(seeds),
        redis_cluster_sharded_pubsub: sharded,
        ..redis_config(&prefix)
    })
    .await;
    let channel = "chat:moving";
    let (mut subscriber, _) = native(&server, "ann").await;
    let reply = command(
        &mut subscriber,
        2,
        json!({"subscribe": {"channel": channel}}),
    )
    .await;
    let epoch = reply["subscribe"]["epoch"].as_str().unwrap().to_owned();
    let publish = async |n: u32| {
        let body = json!({"channel": channel, "data": {"n": n}});
        api_call(&server, "publish", body).await
    };
    for n in 1..=2 {
        let reply = publish(n).await;
        assert_eq!(reply["result"]["offset"], n, "{reply}");
    }

    // Who holds the slot (the others answer MOVED), and where it goes.
    let slot = redis_cli(redis.ports[0], &["cluster", "keyslot", channel]);
    let key = format!("{{{channel}}}probe");
    let from = *redis
        .ports
        .iter()
        .find(|&&port| redis_cli(port, &["set", &key, "x"]) == "OK")
        .expect("an owner");
    redis_cli(from, &["del", &key]);
    let to = if to_a_new_master {
        redis.add_master(dir.path())
    } else {
        *redis.ports.iter().find(|&&port| port != from).unwrap()
    };
    let others: Vec<u16> = redis.ports.clone();
    let id = |port: u16| redis_cli(port, &["cluster", "myid"]);
    let (from_id, to_id) = (id(from), id(to));
    assert_eq!(
        redis_cli(to, &["cluster", "setslot", &slot, "importing", &from_id]),
        "OK"
    );
    assert_eq!(
        redis_cli(from, &["cluster", "setslot", &slot, "migrating", &to_id]),
        "OK"
    );
    let reply = publish(3).await;
    assert_eq!(reply["result"]["offset"], 3, "keys not moved yet: {reply}");

    // Move the channel's stream alone: its keys are split between the masters, and the
    // publish script meets TRYAGAIN until the rest follows, which it does 150 ms later; then
    // the old master answers ASK for them.
    let keys = redis_cli(from, &["cluster", "getkeysinslot", &slot, "100"]);
    let (stream, rest): (Vec<&str>, Vec<&str>) =
        keys.lines().partition(|key| key.contains(":stream:"));
    assert_eq!(stream.len(), 1, "{keys}");
    assert!(!rest.is_empty(), "{keys}");
    let port = to.to_string();
    let migrate = |keys: &[&str]| {
        let mut migrate = vec!["migrate", "127.0.0.1", &port, "", "0", "5000", "keys"];
        migrate.extend(keys.iter().copied());
        assert_eq!(redis_cli(from, &migrate), "OK", "{keys:?}");
    };
    migrate(&stream);
    let (reply, ()) = tokio::join!(publish(4), async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        migrate(&rest);
    });
    assert_eq!(
        reply["result"]["offset"], 4,
        "through TRYAGAIN and ASK: {reply}"
    );

    // The slot is the new master's: the old one answers MOVED until this node reads the map
    // again (it did after the ASK, 100 ms later, while the old master still held the slot).
    tokio::time::sleep(Duration::from_millis(400)).await;
    for port in &others {
        redis_cli(*port, &["cluster", "setslot", &slot, "node", &to_id]);
    }
    let reply = publish(5).await;
    assert_eq!(reply["result"]["offset"], 5, "through MOVED: {reply}");

    let history = api_call(&server, "history", json!({"channel": channel, "limit": -1})).await;
    let offsets: Vec<&Value> = history["result"]["publications"]
        .as_array()
        .unwrap_or_else(|| panic!("{history}"))
        .iter()
        .map(|p| &p["offset"])
        .collect();
    assert_eq!(offsets, [1, 2, 3, 4, 5], "{history}");
    // Each kind of answer was met and followed.
    let (_, metrics) = http_request(&server, "GET", "/metrics", "", "").await;
    for name in ["moved", "asked", "tried_again"] {
        let line = format!("plexus_redis_cluster_{name}_total ");
        let count: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .unwrap_or_else(|| panic!("{line} in {metrics}"))
            .trim()
            .parse()
            .unwrap();
        assert!(count >= 1.0, "{name}: {count}");
    }

    // The subscriber gets all five, live or (told to resubscribe, 2500, when its channel's
    // pub/sub moved to the new master) recovered.
    let mut got: Vec<u64> = Vec::new();
    let mut id = 3;
    while got.len() < 5 {
        let message = next_json(&mut subscriber).await;
        if let Some(publication) = message["push"].get("pub") {
            got.push(publication["offset"].as_u64().unwrap());
        } else if message["push"]["unsubscribe"]["code"] == 2500 {
            let offset = got.last().copied().unwrap_or(0);
            let recover = json!({"subscribe": {"channel": channel, "recover": true,
                "epoch": epoch, "offset": offset}});
            // Until this node read the new map, a subscribe may fail as temporary (with
            // sharded pub/sub the old master answers MOVED): the SDKs try again.
            let reply = loop {
                let reply = command(&mut subscriber, id, recover.clone()).await;
                id += 1;
                if reply["error"]["temporary"] != true {
                    break reply;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            assert_eq!(reply["subscribe"]["recovered"], true, "{reply}");
            for publication in reply["subscribe"]["publications"]
                .as_array()
                .into_iter()
                .flatten()
            {
                got.push(publication["offset"].as_u64().unwrap());
            }
        }
    }
    assert_eq!(got, [1, 2, 3, 4, 5]);
    remove_keys(&prefix).await;
}

/// Several nodes on one NATS (`engine = "nats"`, JetStream at `PLEXUS_TEST_NATS_URL`, default
/// `nats://127.0.0.1:4222`) under a prefix of the test's own, whose streams and bucket are
/// deleted at the end.
mod on_nats {
    use std::sync::Arc;
    use std::time::Duration;

    use plexus_core::{Deliver, Delivery, NodeCommand};
    use plexus_engine_nats::{NatsEngine, NatsOptions};
    use plexus_server::config::EngineKind;
    use plexus_server::Config;

    use super::{three_nodes_agree, unique_prefix};

    fn nats_url() -> String {
        std::env::var("PLEXUS_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
    }

    fn nats_config(prefix: &str) -> Config {
        Config {
            engine: EngineKind::Nats,
            nats_url: nats_url(),
            nats_prefix: prefix.to_owned(),
            ..Config::for_tests()
        }
    }

    struct Nowhere;

    impl Deliver for Nowhere {
        fn deliver(&self, _: Delivery) {}
        fn command(&self, _: &NodeCommand) {}
    }

    /// Deletes the prefix's streams and bucket (best effort).
    async fn remove_streams(prefix: &str) {
        let engine = NatsEngine::new(NatsOptions::new(nats_url(), prefix), Arc::new(Nowhere))
            .expect("valid options");
        for _ in 0..100 {
            if engine.is_ready() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = engine.destroy().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn three_nats_nodes_share_rooms_presence_and_history() {
        let prefix = unique_prefix();
        three_nodes_agree("nats", &prefix, nats_config).await;
        remove_streams(&prefix).await;
    }
}
