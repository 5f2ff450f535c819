//! One conformance suite for every [`Engine`]: the memory engine runs it here, other engines in
//! their own crates (enable the `conformance` feature and call [`check_engine`]).
//!
//! Each check builds a fresh engine with the factory, delivers into a recording [`Deliver`],
//! and asserts what every engine promises (see [`Engine`]'s contract).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::engine::{Deliver, Engine, HistoryQuery, HistoryRetention, NodeCommand};
use crate::outbox::Delivery;
use crate::publication::{ClientDescriptor, Membership, Publication};
use crate::MessageKind;

/// Records what an engine delivers.
#[derive(Debug, Default)]
pub struct Recorder {
    deliveries: Mutex<Vec<Delivery>>,
    commands: Mutex<Vec<NodeCommand>>,
    interruptions: std::sync::atomic::AtomicUsize,
}

impl Recorder {
    /// How many times the engine said deliveries may have been lost
    /// ([`Deliver::interrupted`]).
    pub fn interruptions(&self) -> usize {
        self.interruptions
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Data of the publications delivered so far, with their offsets.
    pub fn publications(&self) -> Vec<(String, u64)> {
        self.deliveries
            .lock()
            .unwrap()
            .iter()
            .filter_map(|delivery| match delivery {
                Delivery::Publication(p) => {
                    Some((String::from_utf8_lossy(&p.data).into_owned(), p.offset))
                }
                _ => None,
            })
            .collect()
    }

    /// Tags of the publications delivered so far (empty when none).
    pub fn publication_tags(&self) -> Vec<crate::Tags> {
        self.deliveries
            .lock()
            .unwrap()
            .iter()
            .filter_map(|delivery| match delivery {
                Delivery::Publication(p) => Some(p.tags.as_deref().cloned().unwrap_or_default()),
                _ => None,
            })
            .collect()
    }

    fn memberships(&self) -> Vec<(bool, String)> {
        self.deliveries
            .lock()
            .unwrap()
            .iter()
            .filter_map(|delivery| match delivery {
                Delivery::Join(m) => Some((true, m.client.user.to_string())),
                Delivery::Leave(m) => Some((false, m.client.user.to_string())),
                _ => None,
            })
            .collect()
    }
}

impl Deliver for Recorder {
    fn deliver(&self, delivery: Delivery) {
        self.deliveries.lock().unwrap().push(delivery);
    }

    fn command(&self, command: &NodeCommand) {
        self.commands.lock().unwrap().push(command.clone());
    }

    fn interrupted(&self) {
        self.interruptions
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Builds a fresh engine delivering into the given recorder.
pub type Factory<'a> = &'a dyn Fn(Arc<dyn Deliver>) -> Arc<dyn Engine>;

const RETENTION: HistoryRetention = HistoryRetention {
    size: 5,
    ttl: Duration::from_secs(60),
};

fn publication(channel: &str, text: &str) -> Publication {
    let info = Arc::new(ClientDescriptor {
        user: "u".into(),
        client: "c".into(),
        conn_info: None,
        chan_info: None,
    });
    Publication::new(
        channel.into(),
        MessageKind::Text,
        text.to_owned().into(),
        Some(info),
    )
}

fn engine(factory: Factory<'_>) -> (Arc<Recorder>, Arc<dyn Engine>) {
    let recorder = Arc::new(Recorder::default());
    let engine = factory(recorder.clone());
    (recorder, engine)
}

/// Waits until `condition` holds (deliveries may come from another thread), at most 5 s.
async fn eventually(mut condition: impl FnMut() -> bool) {
    for _ in 0..500 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(condition(), "condition not met within 5 s");
}

/// Runs every check. Each builds its own engine, so an engine that shares state between
/// instances (a Redis or NATS server) must use fresh channel names per factory call or clean
/// up: the checks use the channels `a:1`, `a:2`, `o:1`, `r:1`, `t:1`, `n:1`, `p:1`, `i:1`, `i:2` (prefix them in
/// the factory's engine if needed) and expect them empty.
pub async fn check_engine(factory: Factory<'_>) {
    offsets_history_and_delivery_order(factory).await;
    ordered_at_call_time(factory).await;
    retention_and_removal(factory).await;
    without_history(factory).await;
    presence_and_membership(factory).await;
    commands(factory).await;
    idempotent_publishing(factory).await;
}

/// Subscribes the node to channels, as a hub does when it gets its first local subscriber.
async fn watch(engine: &Arc<dyn Engine>, channels: &[&str]) {
    for channel in channels {
        engine.watch(channel, true).await.unwrap();
    }
}

async fn offsets_history_and_delivery_order(factory: Factory<'_>) {
    let (recorder, engine) = engine(factory);
    watch(&engine, &["a:1", "a:2"]).await;
    let first = engine
        .publish(publication("a:1", "one"), Some(RETENTION))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.offset, 1);
    let tags = crate::Tags::from([("kind".to_owned(), "test".to_owned())]);
    let second = engine
        .publish(
            publication("a:1", "two").with_tags(tags.clone()),
            Some(RETENTION),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (second.offset, &second.epoch),
        (2, &first.epoch),
        "same stream, next offset"
    );
    let other = engine
        .publish(publication("a:2", "x"), Some(RETENTION))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(other.offset, 1, "channels have their own streams");
    eventually(|| recorder.publications().len() == 3).await;
    assert_eq!(
        recorder.publications(),
        [("one".into(), 1), ("two".into(), 2), ("x".into(), 1)]
    );
    let no_tags = crate::Tags::new();
    assert_eq!(
        recorder.publication_tags(),
        [no_tags.clone(), tags.clone(), no_tags.clone()],
        "tags are delivered"
    );
    let page = engine
        .history("a:1", HistoryQuery::default())
        .await
        .unwrap();
    assert_eq!(page.top, second);
    let offsets: Vec<u64> = page.publications.iter().map(|p| p.offset).collect();
    assert_eq!(offsets, [1, 2]);
    let kept: Vec<crate::Tags> = page
        .publications
        .iter()
        .map(|p| p.tags.as_deref().cloned().unwrap_or_default())
        .collect();
    assert_eq!(kept, [no_tags, tags], "tags are kept in history");
    assert_eq!(
        page.publications[0].publisher(),
        Some("c"),
        "publisher info is kept"
    );
    let since = engine
        .history(
            "a:1",
            HistoryQuery {
                since: Some(1),
                ..HistoryQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(since.publications.len(), 1);
    let newest = engine
        .history(
            "a:1",
            HistoryQuery {
                limit: Some(1),
                reverse: true,
                ..HistoryQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(newest.publications[0].offset, 2);
    let position_only = engine
        .history(
            "a:1",
            HistoryQuery {
                limit: Some(0),
                ..HistoryQuery::default()
            },
        )
        .await
        .unwrap();
    assert!(position_only.publications.is_empty());
    assert_eq!(position_only.top, second);
}

async fn ordered_at_call_time(factory: Factory<'_>) {
    let (recorder, engine) = engine(factory);
    watch(&engine, &["o:1"]).await;
    // Futures created in order and awaited in reverse (or dropped) keep the call order.
    let futures: Vec<_> = (0..20)
        .map(|i| engine.publish(publication("o:1", &i.to_string()), Some(RETENTION)))
        .collect();
    let mut positions = Vec::new();
    for future in futures.into_iter().rev() {
        positions.push(future.await.unwrap().unwrap().offset);
    }
    positions.reverse();
    assert_eq!(positions, (1..=20).collect::<Vec<u64>>());
    drop(engine.publish(publication("o:1", "dropped"), Some(RETENTION)));
    eventually(|| recorder.publications().len() == 21).await;
    let delivered: Vec<u64> = recorder
        .publications()
        .iter()
        .map(|(_, offset)| *offset)
        .collect();
    assert_eq!(
        delivered,
        (1..=21).collect::<Vec<u64>>(),
        "delivered in offset order, dropped ones too"
    );
}

async fn retention_and_removal(factory: Factory<'_>) {
    let (_recorder, engine) = engine(factory);
    for i in 0..8 {
        engine
            .publish(publication("r:1", &i.to_string()), Some(RETENTION))
            .await
            .unwrap();
    }
    let page = engine
        .history("r:1", HistoryQuery::default())
        .await
        .unwrap();
    let offsets: Vec<u64> = page.publications.iter().map(|p| p.offset).collect();
    assert_eq!(offsets, [4, 5, 6, 7, 8], "only the newest `size` are kept");
    engine.remove_history("r:1").await.unwrap();
    let removed = engine
        .history("r:1", HistoryQuery::default())
        .await
        .unwrap();
    assert!(removed.publications.is_empty());
    assert_eq!(
        (removed.top.offset, &removed.top.epoch),
        (8, &page.top.epoch),
        "top and epoch stay"
    );
    let short = HistoryRetention {
        size: 10,
        ttl: Duration::from_millis(200),
    };
    engine
        .publish(publication("t:1", "soon gone"), Some(short))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    engine
        .publish(publication("t:1", "fresh"), Some(short))
        .await
        .unwrap();
    let page = engine
        .history("t:1", HistoryQuery::default())
        .await
        .unwrap();
    let offsets: Vec<u64> = page.publications.iter().map(|p| p.offset).collect();
    assert_eq!(offsets, [2], "expired publications are not returned");
}

async fn without_history(factory: Factory<'_>) {
    let (recorder, engine) = engine(factory);
    watch(&engine, &["n:1"]).await;
    assert_eq!(
        engine
            .publish(publication("n:1", "plain"), None)
            .await
            .unwrap(),
        None
    );
    eventually(|| recorder.publications() == [("plain".to_owned(), 0)]).await;
}

async fn presence_and_membership(factory: Factory<'_>) {
    let (recorder, engine) = engine(factory);
    let client = |user: &str| {
        Arc::new(ClientDescriptor {
            user: user.into(),
            client: format!("client-{user}").into(),
            conn_info: None,
            chan_info: None,
        })
    };
    engine.add_presence("p:1", client("ann")).await.unwrap();
    engine.add_presence("p:1", client("ben")).await.unwrap();
    engine.add_presence("p:1", client("ben")).await.unwrap();
    let users: Vec<String> = engine
        .presence("p:1")
        .await
        .unwrap()
        .iter()
        .map(|c| c.user.to_string())
        .collect();
    assert_eq!(users.len(), 2, "{users:?}");
    engine.remove_presence("p:1", "client-ann").await.unwrap();
    assert_eq!(engine.presence("p:1").await.unwrap().len(), 1);
    // A present client's entry replaced with new info: still one entry, the new one.
    let renamed = Arc::new(ClientDescriptor {
        conn_info: Some(bytes::Bytes::from_static(br#"{"name":"Ben B."}"#)),
        chan_info: Some(bytes::Bytes::from_static(br#"{"role":"host"}"#)),
        ..(*client("ben")).clone()
    });
    engine
        .update_presence("p:1", renamed.clone())
        .await
        .unwrap();
    let present = engine.presence("p:1").await.unwrap();
    assert_eq!(present.len(), 1, "{present:?}");
    assert_eq!(*present[0], *renamed);
    watch(&engine, &["p:1"]).await;
    engine
        .publish_membership(true, Membership::new("p:1".into(), client("cid")))
        .await
        .unwrap();
    engine
        .publish_membership(false, Membership::new("p:1".into(), client("cid")))
        .await
        .unwrap();
    eventually(|| recorder.memberships().len() == 2).await;
    assert_eq!(
        recorder.memberships(),
        [(true, "cid".into()), (false, "cid".into())]
    );
}

async fn commands(factory: Factory<'_>) {
    let (recorder, engine) = engine(factory);
    let command = NodeCommand::Disconnect {
        user: "u1".into(),
        client: None,
        code: 3011,
        reason: "force reconnect".into(),
    };
    engine.command(command.clone()).await.unwrap();
    eventually(|| recorder.commands.lock().unwrap().len() == 1).await;
    assert_eq!(recorder.commands.lock().unwrap()[0], command);
}

/// Idempotency records: claimed once, recorded, released; and `publish_once` over them.
async fn idempotent_publishing(factory: Factory<'_>) {
    use crate::idempotency::{publish_once, Claim, Failure, OnceError, PENDING, WINDOW};
    let (recorder, engine) = engine(factory);
    assert_eq!(engine.claim("i:1", "k", PENDING).await.unwrap(), Claim::Won);
    assert!(
        matches!(engine.claim("i:1", "k", PENDING).await.unwrap(), Claim::Held(record) if record.starts_with(b"p")),
        "a second claim sees the first, pending"
    );
    assert_eq!(
        engine.claim("i:1", "k2", PENDING).await.unwrap(),
        Claim::Won
    );
    assert_eq!(engine.claim("i:2", "k", PENDING).await.unwrap(), Claim::Won);
    engine.record("i:1", "k", "-".into(), WINDOW).await.unwrap();
    assert_eq!(
        engine.claim("i:1", "k", PENDING).await.unwrap(),
        Claim::Held("-".into())
    );
    engine.release("i:1", "k").await.unwrap();
    assert_eq!(
        engine.claim("i:1", "k", PENDING).await.unwrap(),
        Claim::Won,
        "released"
    );
    // A claim pending past its time (its claimer never recorded) is free again.
    let brief = Duration::from_millis(5);
    assert_eq!(
        engine.claim("i:1", "stale", brief).await.unwrap(),
        Claim::Won
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        engine.claim("i:1", "stale", PENDING).await.unwrap(),
        Claim::Won,
        "a stale pending claim is taken over"
    );

    // The same key publishes once and answers the first position again; a failed publish
    // leaves the key free.
    watch(&engine, &["i:2"]).await;
    let once = |text: &'static str| {
        let engine = engine.clone();
        async move {
            let publish = || async {
                let publish = engine.publish(publication("i:2", text), Some(RETENTION));
                publish.await.map_err(Failure::Unknown)
            };
            publish_once(&*engine, "i:2", "first", publish).await
        }
    };
    let first = once("one").await.unwrap().unwrap();
    let again = once("two").await.unwrap().unwrap();
    assert_eq!(again, first, "the first publish's position");
    let refused = || async { Err(Failure::Refused("refused")) };
    let failed: Result<_, OnceError<&str>> = publish_once(&*engine, "i:2", "second", refused).await;
    assert!(matches!(failed, Err(OnceError::Publish("refused"))));
    let publish = || async {
        let publish = engine.publish(publication("i:2", "three"), Some(RETENTION));
        publish.await.map_err(Failure::Unknown)
    };
    let third = publish_once(&*engine, "i:2", "second", publish)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(third.offset, first.offset + 1);
    eventually(|| recorder.publications().len() == 2).await;
    assert_eq!(
        recorder.publications(),
        [("one".into(), first.offset), ("three".into(), third.offset)]
    );
}

/// Waits until `engine` reports ready, at most 10 s.
pub async fn until_ready(engine: &dyn Engine) {
    let started = std::time::Instant::now();
    while !engine.ready() {
        assert!(started.elapsed() < Duration::from_secs(10), "ready in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Checks that `engine` is cut off from its broker (a refused TLS handshake, say): not ready,
/// and a publish fails as unavailable. `what` names it in a failure.
pub async fn check_unavailable(engine: &dyn Engine, what: &str) {
    assert!(!engine.ready(), "{what}: not ready");
    let publication = Publication::new("chat:x".into(), MessageKind::Text, "x".into(), None);
    let error = engine.publish(publication, None).await.unwrap_err();
    assert!(
        matches!(error, crate::EngineError::Unavailable { .. }),
        "{what}: {error:?}"
    );
}

/// A server process of an engine test's own (a broker), listening on a port; killed when
/// dropped.
pub struct ServerProcess {
    child: std::process::Child,
}

impl ServerProcess {
    /// Starts `command` (its output discarded) and waits until something listens on `port`.
    pub fn spawn(mut command: std::process::Command, port: u16) -> ServerProcess {
        let what = command.get_program().to_string_lossy().into_owned();
        let child = command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("{what} runs: {error}"));
        let server = ServerProcess { child };
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{what} listens on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    /// Stops the process (SIGSTOP) and returns once every thread of it is stopped, so that
    /// nothing sent to it afterwards is handled: a broker frozen mid-flight. Linux only (it
    /// reads `/proc`).
    pub fn freeze(&self) {
        let pid = self.child.id();
        signal(pid, "-STOP");
        let tasks = format!("/proc/{pid}/task");
        let started = std::time::Instant::now();
        loop {
            let stopped = std::fs::read_dir(&tasks).unwrap().all(|task| {
                let stat =
                    std::fs::read_to_string(task.unwrap().path().join("stat")).unwrap_or_default();
                // The state follows the command name's closing parenthesis.
                stat.rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('T') || rest.starts_with('t'))
            });
            if stopped {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "process {pid} stops"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Resumes a frozen process (SIGCONT).
    pub fn thaw(&self) {
        signal(self.child.id(), "-CONT");
    }

    /// Kills it now (SIGKILL) and waits for it.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

/// A TCP port on 127.0.0.1 that nothing listens on right now.
/// A text publication in `channel` with no publisher, as engine tests publish.
pub fn text_publication(channel: &str, text: &str) -> Publication {
    Publication::new(
        channel.into(),
        MessageKind::Text,
        text.to_owned().into(),
        None,
    )
}

/// A prefix of its own for one engine under test (`{stem}-{process}-{n}`), so runs and tests
/// never see each other's keys, subjects or streams.
pub fn unique_prefix(stem: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{stem}-{}-{n}", std::process::id())
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Certificates for the engines' TLS tests: a CA, a server certificate for `localhost` and
/// 127.0.0.1 signed by it, and a client certificate signed by it, all PEM.
pub struct TestPki {
    pub ca: String,
    pub server_cert: String,
    pub server_key: String,
    pub client_cert: String,
    pub client_key: String,
}

impl TestPki {
    pub fn new() -> TestPki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        // Each with a name of its own: a leaf named like its issuer looks self-signed to
        // OpenSSL (redis-server), which then refuses it.
        let named = |names: Vec<String>, common_name: &str| {
            let mut params = CertificateParams::new(names).unwrap();
            params
                .distinguished_name
                .push(DnType::CommonName, common_name);
            params
        };
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = named(Vec::new(), "Plexus test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, &ca_key);
        let leaf = |names: Vec<String>, common_name: &str| {
            let key = KeyPair::generate().unwrap();
            let cert = named(names, common_name).signed_by(&key, &issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) =
            leaf(vec!["localhost".into(), "127.0.0.1".into()], "localhost");
        let (client_cert, client_key) = leaf(vec!["plexus-client".into()], "plexus-client");
        TestPki {
            ca: ca.pem(),
            server_cert,
            server_key,
            client_cert,
            client_key,
        }
    }

    /// Writes the server's files and the CA to `dir`: (ca, cert, key) paths.
    pub fn write_server_files(
        &self,
        dir: &std::path::Path,
    ) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
        let paths = (
            dir.join("ca.pem"),
            dir.join("server.pem"),
            dir.join("server.key"),
        );
        std::fs::write(&paths.0, &self.ca).unwrap();
        std::fs::write(&paths.1, &self.server_cert).unwrap();
        std::fs::write(&paths.2, &self.server_key).unwrap();
        paths
    }
}

impl Default for TestPki {
    fn default() -> TestPki {
        TestPki::new()
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn memory_engine_conforms() {
        super::check_engine(&|deliver| std::sync::Arc::new(crate::MemoryEngine::new(deliver)))
            .await;
    }
}
