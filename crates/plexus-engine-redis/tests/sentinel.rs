//! Redis Sentinel: the engine finds the master through a sentinel, and after the master dies
//! and the sentinel promotes its replica, the same engine goes on with the new master, by
//! itself, with the history that was replicated.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use plexus_core::conformance::Recorder;
use plexus_core::{Engine, HistoryQuery, HistoryRetention, Publication};
use plexus_engine_redis::{RedisEngine, RedisOptions};

use common::{free_port, RedisServer};

const RETENTION: HistoryRetention = HistoryRetention {
    size: 100,
    ttl: Duration::from_secs(600),
};

fn publication(text: &str) -> Publication {
    plexus_core::conformance::text_publication("chat:ha", text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_a_failover() {
    let dir = tempfile::tempdir().unwrap();
    let (master_port, replica_port, sentinel_port) = (free_port(), free_port(), free_port());
    let master = RedisServer::start_master(master_port);
    let _replica = RedisServer::start_replica(replica_port, master_port);
    let _sentinel = RedisServer::start_sentinel(sentinel_port, master_port, dir.path());
    let options = RedisOptions {
        sentinel: Some((
            vec![format!("redis://127.0.0.1:{sentinel_port}")],
            "mymaster".to_owned(),
        )),
        timeout: Duration::from_secs(2),
        ..RedisOptions::new("redis://mymaster", "plexus-sentinel")
    };
    check_failover(options, master).await;
}

/// The same over TLS: the sentinel, the master and its replica speak TLS only; the engine
/// reaches the sentinel with `rediss://`, the master with a `rediss://` URL, and trusts their
/// CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_a_failover_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ports = (free_port(), free_port(), free_port());
    let (master, _replica, _sentinel, ca) = RedisServer::start_tls_sentinel_set(ports, dir.path());
    let sentinel = vec![format!("rediss://127.0.0.1:{}", ports.2)];
    let options = |tls_ca: Option<String>| RedisOptions {
        sentinel: Some((sentinel.clone(), "mymaster".to_owned())),
        timeout: Duration::from_secs(2),
        tls_ca: tls_ca.map(String::into_bytes),
        ..RedisOptions::new("rediss://mymaster", "plexus-sentinel-tls")
    };
    // Without the CA neither the sentinel nor the master is trusted: never ready.
    let untrusted = RedisEngine::new(options(None), Arc::new(Recorder::default())).unwrap();
    assert!(untrusted
        .publish(publication("x"), Some(RETENTION))
        .await
        .is_err());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!untrusted.is_ready());
    check_failover(options(Some(ca)), master).await;
}

/// Publishes through the master the sentinel names, kills it, and expects the engine to go on
/// with the promoted replica, offsets and history continuing.
async fn check_failover(options: RedisOptions, master: common::ServerProcess) {
    let engine = RedisEngine::new(options, Arc::new(Recorder::default())).unwrap();
    let started = Instant::now();
    let first = loop {
        // The sentinel may not have seen the master's replica yet.
        match engine.publish(publication("before"), Some(RETENTION)).await {
            Ok(position) => break position,
            Err(error) => {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "no master through the sentinel: {error:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(first.unwrap().offset, 1);
    // Let the replica and the sentinel catch up with the master before it dies.
    tokio::time::sleep(Duration::from_secs(2)).await;

    master.kill();
    let started = Instant::now();
    let offset = loop {
        match engine.publish(publication("after"), Some(RETENTION)).await {
            Ok(position) => break position.unwrap().offset,
            Err(error) => {
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "no new master: {error:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    // The promoted replica had the stream: the offsets go on.
    assert_eq!(offset, 2);
    let page = engine
        .history("chat:ha", HistoryQuery::default())
        .await
        .unwrap();
    let texts: Vec<String> = page
        .publications
        .iter()
        .map(|p| String::from_utf8_lossy(&p.data).into_owned())
        .collect();
    assert_eq!(texts, ["before", "after"]);
    // The pub/sub connection follows by itself, on its own backoff.
    let started = Instant::now();
    while !engine.is_ready() {
        assert!(started.elapsed() < Duration::from_secs(10), "ready again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
