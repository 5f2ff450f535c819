//! Redis Cluster: the conformance suite on a cluster of three masters found from one seed,
//! plain and TLS only;
//! channels spread over every master while two engines, subscribed through different nodes,
//! share deliveries; a master killed, its replica promoted, the same engine going on with
//! the history that was replicated, by itself; and a slot moved to another master.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use plexus_core::conformance::Recorder;
use plexus_core::{Engine, HistoryQuery, HistoryRetention, Publication, StreamPosition};
use plexus_engine_redis::{RedisEngine, RedisEngineError, RedisOptions};

use common::RedisServer;

const RETENTION: HistoryRetention = HistoryRetention {
    size: 100,
    ttl: Duration::from_secs(600),
};

fn prefix() -> String {
    plexus_core::conformance::unique_prefix("plexus-cluster")
}

fn options(seeds: &[u16], prefix: &str) -> RedisOptions {
    RedisOptions {
        cluster: Some(
            seeds
                .iter()
                .map(|port| format!("127.0.0.1:{port}"))
                .collect(),
        ),
        timeout: Duration::from_secs(2),
        history_meta_ttl: Duration::from_secs(120),
        ..RedisOptions::new("redis://127.0.0.1", prefix)
    }
}

/// The same with sharded pub/sub or not.
fn sharded(options: RedisOptions, sharded: bool) -> RedisOptions {
    RedisOptions {
        sharded_pubsub: sharded,
        ..options
    }
}

/// How many of this engine's subscriptions to `channel` the node on `port` holds, classic or
/// sharded.
fn subscriptions(port: u16, prefix: &str, channel: &str, sharded: bool) -> String {
    if sharded {
        let name = format!("{prefix}:pub:{{{channel}}}");
        redis_cli(port, &["pubsub", "shardnumsub", &name])
    } else {
        redis_cli(
            port,
            &["pubsub", "numsub", &format!("{prefix}:pub:{channel}")],
        )
    }
}

fn publication(channel: &str, text: &str) -> Publication {
    plexus_core::conformance::text_publication(channel, text)
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_engine_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let (_nodes, ports) = RedisServer::start_cluster(3, 0, dir.path());
    // One seed: the other masters come from its slot map.
    let factory = |deliver| {
        Arc::new(RedisEngine::new(options(&ports[..1], &prefix()), deliver).unwrap())
            as Arc<dyn Engine>
    };
    plexus_core::conformance::check_engine(&factory).await;
}

/// With sharded pub/sub: publications stay on their channel's master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_engine_conforms_with_sharded_pubsub() {
    let dir = tempfile::tempdir().unwrap();
    let (_nodes, ports) = RedisServer::start_cluster(3, 0, dir.path());
    let factory = |deliver| {
        let options = sharded(options(&ports[..1], &prefix()), true);
        Arc::new(RedisEngine::new(options, deliver).unwrap()) as Arc<dyn Engine>
    };
    plexus_core::conformance::check_engine(&factory).await;
}

/// The same over TLS only (clients, cluster bus), trusting the nodes' CA through `tls_ca`,
/// with classic and with sharded pub/sub.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_engine_conforms_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (_nodes, ports, ca) = RedisServer::start_tls_cluster(3, dir.path());
    for mode in [false, true] {
        let factory = |deliver| {
            let options = RedisOptions {
                url: "rediss://127.0.0.1".into(),
                tls_ca: Some(ca.clone().into_bytes()),
                ..sharded(options(&ports[..1], &prefix()), mode)
            };
            Arc::new(RedisEngine::new(options, deliver).unwrap()) as Arc<dyn Engine>
        };
        plexus_core::conformance::check_engine(&factory).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_spread_over_the_masters_and_nodes_share_deliveries() {
    spread(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_channels_spread_over_the_masters_and_nodes_share_deliveries() {
    spread(true).await;
}

async fn spread(mode: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (_nodes, ports) = RedisServer::start_cluster(3, 0, dir.path());
    let prefix = prefix();
    // Each engine's pub/sub connection goes to its first seed: different cluster nodes.
    let recorder = Arc::new(Recorder::default());
    let one = RedisEngine::new(sharded(options(&[ports[0]], &prefix), mode), recorder).unwrap();
    let hub = Arc::new(Recorder::default());
    let seeds = [ports[2], ports[1]];
    let two = RedisEngine::new(sharded(options(&seeds, &prefix), mode), hub.clone()).unwrap();
    let channels: Vec<String> = (0..30).map(|i| format!("chat:room-{i}")).collect();
    for channel in &channels {
        two.watch(channel, true).await.unwrap();
    }
    for (i, channel) in channels.iter().enumerate() {
        let position = one
            .publish(publication(channel, &format!("m{i}")), Some(RETENTION))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(position.offset, 1, "{channel}");
    }
    let started = Instant::now();
    while hub.publications().len() < channels.len() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "deliveries through another node: {:?}",
            hub.publications()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut texts: Vec<String> = hub
        .publications()
        .into_iter()
        .map(|(text, _)| text)
        .collect();
    texts.sort();
    let mut expected: Vec<String> = (0..30).map(|i| format!("m{i}")).collect();
    expected.sort();
    assert_eq!(texts, expected);
    // Every master holds some of the channels' keys, and a channel's keys share its slot.
    for port in &ports {
        let keys: u64 = redis_cli(*port, &["dbsize"]).parse().unwrap();
        assert!(keys > 0, "no keys on the master on {port}");
    }
    let stream = redis_cli(
        ports[0],
        &[
            "cluster",
            "keyslot",
            &format!("{prefix}:stream:{{chat:room-7}}"),
        ],
    );
    let meta = redis_cli(
        ports[0],
        &[
            "cluster",
            "keyslot",
            &format!("{prefix}:meta:{{chat:room-7}}"),
        ],
    );
    assert_eq!(stream, meta);
    // Node two reads each channel from the master that holds it, not through the cluster bus
    // (and not the other kind of pub/sub either).
    let owner = master_of("chat:room-7", &ports);
    for port in &ports {
        let numsub = subscriptions(*port, &prefix, "chat:room-7", mode);
        let expected = if *port == owner { 1 } else { 0 };
        assert!(
            numsub.ends_with(&expected.to_string()),
            "{port} (owner {owner}): {numsub}"
        );
        let other = subscriptions(*port, &prefix, "chat:room-7", !mode);
        assert!(other.ends_with('0'), "{port}: {other}");
    }
    let page = two
        .history("chat:room-7", HistoryQuery::default())
        .await
        .unwrap();
    assert_eq!(page.publications.len(), 1);
    assert!(one.is_ready() && two.is_ready());
    // A channel whose keys could not share a slot is refused, not sent.
    let error = one
        .publish(publication("}odd", "x"), Some(RETENTION))
        .await
        .unwrap_err();
    let why = std::error::Error::source(&error).unwrap().to_string();
    assert!(why.contains("starts with '}'"), "{error}: {why}");
}

/// Publishes `text` to `channel` again and again until the engine takes it (calls fail while
/// the cluster changes), failing the test at `deadline`.
async fn publish_until_taken(
    engine: &RedisEngine,
    channel: &str,
    text: &str,
    deadline: Instant,
) -> StreamPosition {
    loop {
        match engine
            .publish(publication(channel, text), Some(RETENTION))
            .await
        {
            Ok(position) => return position.unwrap(),
            Err(error) => {
                assert!(Instant::now() < deadline, "{channel}: {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The port of the master that holds `channel`'s keys: the one that takes a key with its hash
/// tag instead of redirecting (`MOVED`).
fn master_of(channel: &str, masters: &[u16]) -> u16 {
    let key = format!("{{{channel}}}probe");
    *masters
        .iter()
        .find(|port| redis_cli(**port, &["set", &key, "1"]) == "OK")
        .expect("a master takes the key")
}

/// Waits until every replica of the master on `port` has its whole replication stream.
fn replicas_caught_up(port: u16) {
    let started = Instant::now();
    loop {
        let info = redis_cli(port, &["info", "replication"]);
        let field = |line: &str, name: &str| -> Option<u64> {
            line.split(',')
                .find_map(|part| part.strip_prefix(name))
                .and_then(|value| value.trim().parse().ok())
        };
        let master = info
            .lines()
            .find_map(|line| field(line, "master_repl_offset:"));
        let replicas: Vec<u64> = info
            .lines()
            .filter(|line| line.starts_with("slave"))
            .filter_map(|line| field(line.split_once(':')?.1, "offset="))
            .collect();
        if master.is_some() && !replicas.is_empty() && replicas.iter().all(|&r| Some(r) == master) {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{info}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Three masters with a replica each; the master of the first channel is killed (the node
/// the engine's pub/sub connection is on, too); the cluster promotes its replica and the
/// engine, told by the failed calls, reads the new map and goes on: offsets continue from the
/// replicated history, deliveries resume through another node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_a_failover() {
    failover(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_a_failover_with_sharded_pubsub() {
    failover(true).await;
}

async fn failover(mode: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, ports) = RedisServer::start_cluster(3, 1, dir.path());
    let channels: Vec<String> = (0..12).map(|i| format!("chat:ha-{i}")).collect();
    let victim = master_of(&channels[0], &ports[..3]);
    // The pub/sub connection goes to the first seed: the master about to die.
    let mut seeds = vec![victim];
    seeds.extend(ports.iter().filter(|&&port| port != victim));
    let hub = Arc::new(Recorder::default());
    let engine = RedisEngine::new(sharded(options(&seeds, &prefix()), mode), hub.clone()).unwrap();
    engine.watch(&channels[0], true).await.unwrap();
    for channel in &channels {
        for text in ["one", "two"] {
            engine
                .publish(publication(channel, text), Some(RETENTION))
                .await
                .unwrap();
        }
    }
    replicas_caught_up(victim);
    let index = ports.iter().position(|&port| port == victim).unwrap();
    drop(nodes.remove(index));
    let started = Instant::now();
    for channel in &channels {
        let deadline = started + Duration::from_secs(20);
        let position = publish_until_taken(&engine, channel, "three", deadline).await;
        assert_eq!(position.offset, 3, "{channel}: the history went on");
        let page = engine
            .history(channel, HistoryQuery::default())
            .await
            .unwrap();
        let texts: Vec<&[u8]> = page
            .publications
            .iter()
            .map(|publication| &publication.data[..])
            .collect();
        assert_eq!(texts, [&b"one"[..], b"two", b"three"], "{channel}");
    }
    eprintln!(
        "every channel published again {:?} after the kill",
        started.elapsed()
    );
    // The subscriber moved to another node (and the hub was told it may have missed some).
    let texts = |hub: &Recorder| -> Vec<String> {
        hub.publications()
            .into_iter()
            .map(|(text, _)| text)
            .collect()
    };
    let started = Instant::now();
    let interruptions = hub.interruptions();
    assert!(
        interruptions >= 1,
        "the hub was told the moved channel may have missed deliveries"
    );
    while !texts(&hub).contains(&"three".to_owned()) {
        engine
            .publish(publication(&channels[0], "three"), Some(RETENTION))
            .await
            .ok();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "deliveries after the failover: {:?}",
            texts(&hub)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let started = Instant::now();
    while !engine.is_ready() {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "ready again without the dead master"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Moves one slot, with its keys, from the master on `from` to the master on `to`, as
/// `redis-cli --cluster reshard` does, and tells every master in `masters`.
fn move_slot(slot: &str, from: u16, to: u16, masters: &[u16]) {
    let from_id = redis_cli(from, &["cluster", "myid"]);
    let to_id = redis_cli(to, &["cluster", "myid"]);
    assert_eq!(
        redis_cli(to, &["cluster", "setslot", slot, "importing", &from_id]),
        "OK"
    );
    assert_eq!(
        redis_cli(from, &["cluster", "setslot", slot, "migrating", &to_id]),
        "OK"
    );
    loop {
        let keys = redis_cli(from, &["cluster", "getkeysinslot", slot, "100"]);
        let keys: Vec<&str> = keys.lines().filter(|key| !key.is_empty()).collect();
        if keys.is_empty() {
            break;
        }
        let port = to.to_string();
        let mut migrate = vec!["migrate", "127.0.0.1", &port, "", "0", "5000", "keys"];
        migrate.extend(keys);
        assert_eq!(redis_cli(from, &migrate), "OK");
    }
    for port in masters {
        assert_eq!(
            redis_cli(*port, &["cluster", "setslot", slot, "node", &to_id]),
            "OK",
            "setslot on {port}"
        );
    }
}

/// A resharding: the slot of a watched channel moves to another master with its keys. Calls
/// that meet the move fail (unavailable) until the engine reads the new map; then publishing
/// goes on with the same history and offsets, and the channel is read from its new master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_a_slot_to_another_master() {
    reshard(false).await;
}

/// With sharded pub/sub the old master also drops the channel's subscription by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_a_slot_to_another_master_with_sharded_pubsub() {
    reshard(true).await;
}

async fn reshard(mode: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (_nodes, ports) = RedisServer::start_cluster(3, 0, dir.path());
    let prefix = prefix();
    let hub = Arc::new(Recorder::default());
    let engine = RedisEngine::new(sharded(options(&ports, &prefix), mode), hub.clone()).unwrap();
    let channel = "chat:moving";
    engine.watch(channel, true).await.unwrap();
    for text in ["one", "two"] {
        engine
            .publish(publication(channel, text), Some(RETENTION))
            .await
            .unwrap();
    }
    let from = master_of(channel, &ports);
    let to = *ports.iter().find(|&&port| port != from).unwrap();
    let slot = redis_cli(from, &["cluster", "keyslot", &format!("{{{channel}}}")]);
    move_slot(&slot, from, to, &ports);
    assert_eq!(master_of(channel, &ports), to);

    let deadline = Instant::now() + Duration::from_secs(15);
    let position = publish_until_taken(&engine, channel, "three", deadline).await;
    assert_eq!(position.offset, 3, "the history moved with the slot");
    let page = engine
        .history(channel, HistoryQuery::default())
        .await
        .unwrap();
    assert_eq!(page.publications.len(), 3);
    // Read from the new master now: subscribed there, no longer on the old one.
    let started = Instant::now();
    loop {
        let numsub = |port: u16| subscriptions(port, &prefix, channel, mode);
        if numsub(to).ends_with('1') && numsub(from).ends_with('0') {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "subscribed on {to}: {}, on {from}: {}",
            numsub(to),
            numsub(from)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    engine
        .publish(publication(channel, "four"), Some(RETENTION))
        .await
        .unwrap();
    let started = Instant::now();
    while !hub.publications().contains(&("four".to_owned(), 4)) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "delivered from the new master: {:?}",
            hub.publications()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(hub.interruptions() >= 1, "told to recover across the move");
    assert!(engine.is_ready());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_cluster_options_are_refused() {
    let deliver = || Arc::new(Recorder::default());
    let refused = |options: RedisOptions| RedisEngine::new(options, deliver()).unwrap_err();
    assert!(matches!(
        refused(options(&[7000], "a{b}")),
        RedisEngineError::ClusterPrefix
    ));
    assert!(matches!(
        refused(RedisOptions {
            sharded_pubsub: true,
            ..RedisOptions::new("redis://127.0.0.1", "p")
        }),
        RedisEngineError::ShardedWithoutCluster
    ));
    assert!(matches!(
        refused(RedisOptions {
            cluster: Some(vec!["nowhere".into()]),
            ..RedisOptions::new("redis://127.0.0.1", "p")
        }),
        RedisEngineError::ClusterNode(_)
    ));
    assert!(matches!(
        refused(RedisOptions {
            url: "redis://127.0.0.1/2".into(),
            ..options(&[7000], "p")
        }),
        RedisEngineError::ClusterDatabase
    ));
    assert!(matches!(
        refused(RedisOptions {
            cluster: Some(vec!["user:pw@10.0.0.1:7000".into()]),
            ..RedisOptions::new("redis://127.0.0.1", "p")
        }),
        RedisEngineError::ClusterNode(_)
    ));
    // Accepted: IPv6 in brackets, and the schemes.
    RedisEngine::new(
        RedisOptions {
            cluster: Some(vec!["[::1]:7000".into(), "redis://10.0.0.1:7000/".into()]),
            ..RedisOptions::new("redis://127.0.0.1", "p")
        },
        deliver(),
    )
    .unwrap();
    assert!(matches!(
        refused(RedisOptions {
            sentinel: Some((vec!["redis://127.0.0.1:1".into()], "m".into())),
            ..options(&[7000], "p")
        }),
        RedisEngineError::ClusterAndSentinel
    ));
}
