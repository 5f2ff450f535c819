//! Two engines on one prefix, as two nodes: deliveries, commands and presence cross over, and
//! the presence of a node that is gone expires while the other's is kept fresh.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use plexus_core::conformance::Recorder;
use plexus_core::{
    ClientDescriptor, Deliver, Delivery, Engine, HistoryRetention, MessageKind, NodeCommand,
    Publication,
};
use plexus_engine_redis::{RedisEngine, RedisOptions};

/// Records deliveries (through the conformance recorder) and commands.
#[derive(Default)]
struct Hub {
    recorder: Recorder,
    commands: Mutex<Vec<NodeCommand>>,
}

impl Deliver for Hub {
    fn deliver(&self, delivery: Delivery) {
        self.recorder.deliver(delivery);
    }

    fn command(&self, command: &NodeCommand) {
        self.commands.lock().unwrap().push(command.clone());
    }
}

fn options(prefix: &str) -> RedisOptions {
    let url =
        std::env::var("PLEXUS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let mut options = RedisOptions::new(url, prefix);
    options.presence_ttl = Duration::from_millis(1000);
    options.presence_refresh = Duration::from_millis(300);
    options.history_meta_ttl = Duration::from_secs(120);
    options
}

fn prefix() -> String {
    plexus_core::conformance::unique_prefix("plexus-test-nodes")
}

fn client(user: &str) -> Arc<ClientDescriptor> {
    Arc::new(ClientDescriptor {
        user: user.into(),
        client: format!("client-{user}").into(),
        conn_info: Some(format!("{{\"name\":\"{user}\"}}").into()),
        chan_info: None,
    })
}

async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < Duration::from_secs(5), "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn users(engine: &RedisEngine, channel: &str) -> Vec<String> {
    let mut users: Vec<String> = engine
        .presence(channel)
        .await
        .unwrap()
        .iter()
        .map(|client| client.user.to_string())
        .collect();
    users.sort();
    users
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_deliveries_commands_and_presence() {
    let prefix = prefix();
    let (one_hub, two_hub) = (Arc::new(Hub::default()), Arc::new(Hub::default()));
    let one = RedisEngine::new(options(&prefix), one_hub.clone()).unwrap();
    let two = RedisEngine::new(options(&prefix), two_hub.clone()).unwrap();
    two.watch("chat:x", true).await.unwrap();
    let retention = HistoryRetention {
        size: 10,
        ttl: Duration::from_secs(60),
    };
    for text in ["a", "b", "c"] {
        let publication = Publication::new("chat:x".into(), MessageKind::Text, text.into(), None);
        drop(one.publish(publication, Some(retention)));
    }
    eventually("deliveries on the other node", || {
        two_hub.recorder.publications().len() == 3
    })
    .await;
    assert_eq!(
        two_hub.recorder.publications(),
        [("a".into(), 1), ("b".into(), 2), ("c".into(), 3)]
    );
    assert!(
        one_hub.recorder.publications().is_empty(),
        "not watched on node one"
    );
    let page = two
        .history("chat:x", plexus_core::HistoryQuery::default())
        .await
        .unwrap();
    assert_eq!(page.top.offset, 3);

    // A command from one node reaches both.
    let command = NodeCommand::Unsubscribe {
        user: "ann".into(),
        channel: "chat:x".into(),
    };
    two.command(command.clone()).await.unwrap();
    for hub in [&one_hub, &two_hub] {
        eventually("the command on both nodes", || {
            *hub.commands.lock().unwrap() == [command.clone()]
        })
        .await;
    }

    // Presence from both nodes, kept fresh past its ttl by each node's refresh.
    one.add_presence("chat:x", client("ann")).await.unwrap();
    two.add_presence("chat:x", client("ben")).await.unwrap();
    assert_eq!(users(&one, "chat:x").await, ["ann", "ben"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(users(&two, "chat:x").await, ["ann", "ben"]);
    let ann = one.presence("chat:x").await.unwrap();
    let ann = ann.iter().find(|client| &*client.user == "ann").unwrap();
    assert_eq!(ann.conn_info.as_deref(), Some(&b"{\"name\":\"ann\"}"[..]));

    // Node one goes away without cleaning up: its presence expires, node two's stays.
    drop(one);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(users(&two, "chat:x").await, ["ben"]);
    two.remove_presence("chat:x", "client-ben").await.unwrap();
    assert!(users(&two, "chat:x").await.is_empty());
}
