//! Two engines on one prefix, as two nodes: deliveries, commands and presence cross over,
//! offsets stay gapless and in order when both publish to one channel at once, and the
//! presence of a node that is gone expires while the other's is kept fresh.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use plexus_core::conformance::Recorder;
use plexus_core::{
    ClientDescriptor, Deliver, Delivery, Engine, HistoryQuery, HistoryRetention, NodeCommand,
    Publication,
};
use plexus_engine_nats::{NatsEngine, NatsOptions};

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

fn options(prefix: &str) -> NatsOptions {
    let url =
        std::env::var("PLEXUS_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let mut options = NatsOptions::new(url, prefix);
    options.presence_ttl = Duration::from_millis(1000);
    options.presence_refresh = Duration::from_millis(300);
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

fn publication(channel: &str, text: &str) -> Publication {
    plexus_core::conformance::text_publication(channel, text)
}

const RETENTION: HistoryRetention = HistoryRetention {
    size: 100,
    ttl: Duration::from_secs(60),
};

async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < Duration::from_secs(5), "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn users(engine: &NatsEngine, channel: &str) -> Vec<String> {
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
    let one = NatsEngine::new(options(&prefix), one_hub.clone()).unwrap();
    let two = NatsEngine::new(options(&prefix), two_hub.clone()).unwrap();
    // A channel name that is not a valid subject token as it is.
    let channel = "chat:x.y *>";
    two.watch(channel, true).await.unwrap();
    for text in ["a", "b", "c"] {
        drop(one.publish(publication(channel, text), Some(RETENTION)));
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
    let page = two.history(channel, HistoryQuery::default()).await.unwrap();
    assert_eq!(page.top.offset, 3);
    assert_eq!(page.publications.len(), 3);
    assert_eq!(&*page.publications[0].channel, channel);

    // A command from one node reaches both.
    let command = NodeCommand::Unsubscribe {
        user: "ann".into(),
        channel: channel.into(),
    };
    two.command(command.clone()).await.unwrap();
    for hub in [&one_hub, &two_hub] {
        eventually("the command on both nodes", || {
            *hub.commands.lock().unwrap() == [command.clone()]
        })
        .await;
    }

    // Presence from both nodes, kept fresh past its ttl by each node's refresh.
    one.add_presence(channel, client("ann")).await.unwrap();
    two.add_presence(channel, client("ben")).await.unwrap();
    assert_eq!(users(&one, channel).await, ["ann", "ben"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(users(&two, channel).await, ["ann", "ben"]);
    let ann = one.presence(channel).await.unwrap();
    let ann = ann.iter().find(|client| &*client.user == "ann").unwrap();
    assert_eq!(ann.conn_info.as_deref(), Some(&b"{\"name\":\"ann\"}"[..]));

    // Node one goes away without cleaning up: its presence expires, node two's stays.
    drop(one);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(users(&two, channel).await, ["ben"]);
    two.remove_presence(channel, "client-ben").await.unwrap();
    assert!(users(&two, channel).await.is_empty());
    two.destroy().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_on_two_nodes_get_gapless_offsets_delivered_in_order() {
    let prefix = prefix();
    let (one_hub, two_hub) = (Arc::new(Hub::default()), Arc::new(Hub::default()));
    let one = NatsEngine::new(options(&prefix), one_hub.clone()).unwrap();
    let two = NatsEngine::new(options(&prefix), two_hub.clone()).unwrap();
    one.watch("race", true).await.unwrap();
    two.watch("race", true).await.unwrap();
    let count = 100;
    let mut futures = Vec::new();
    for i in 0..count {
        let (engine, node) = if i % 2 == 0 {
            (&one, "one")
        } else {
            (&two, "two")
        };
        futures.push(engine.publish(publication("race", &format!("{node}-{i}")), Some(RETENTION)));
    }
    let mut offsets = Vec::new();
    for future in futures {
        offsets.push(future.await.unwrap().unwrap().offset);
    }
    offsets.sort_unstable();
    assert_eq!(
        offsets,
        (1..=count).collect::<Vec<u64>>(),
        "gapless, no duplicates"
    );
    for hub in [&one_hub, &two_hub] {
        eventually("every publication on both nodes", || {
            hub.recorder.publications().len() == count as usize
        })
        .await;
        let delivered: Vec<u64> = hub
            .recorder
            .publications()
            .iter()
            .map(|(_, offset)| *offset)
            .collect();
        assert_eq!(
            delivered,
            (1..=count).collect::<Vec<u64>>(),
            "in offset order"
        );
    }
    assert_eq!(
        one_hub.recorder.publications(),
        two_hub.recorder.publications()
    );
    let page = one.history("race", HistoryQuery::default()).await.unwrap();
    let texts: Vec<String> = page
        .publications
        .iter()
        .map(|p| String::from_utf8_lossy(&p.data).into_owned())
        .collect();
    let delivered: Vec<String> = one_hub
        .recorder
        .publications()
        .into_iter()
        .map(|(text, _)| text)
        .collect();
    assert_eq!(texts, delivered, "history and deliveries agree");
    one.destroy().await.unwrap();
}
