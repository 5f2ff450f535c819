//! Tests of the durable history log through its public API.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use plexus_engine_embedded::log::{
    DurableLog, LogError, LogOptions, OnCommit, Retention, StreamPosition,
};

type Delivered = Arc<Mutex<Vec<(String, StreamPosition, Bytes)>>>;

fn recorder() -> (OnCommit, Delivered) {
    let delivered: Delivered = Arc::default();
    let sink = delivered.clone();
    let on_commit: OnCommit = Arc::new(move |channel, position, data| {
        sink.lock()
            .unwrap()
            .push((channel.to_string(), position.clone(), data.clone()));
    });
    (on_commit, delivered)
}

fn ignore() -> OnCommit {
    Arc::new(|_, _, _| {})
}

fn keep(max_len: usize) -> Retention {
    Retention {
        max_len,
        ttl: Duration::from_secs(3600),
    }
}

/// Four tasks append `each` entries apiece, `"{task}-{i}"` to `channel(task, i)`, all at once,
/// each waiting for its acknowledgement before the next.
async fn append_from_tasks(
    log: &DurableLog,
    each: u32,
    channel: fn(u32, u32) -> String,
    retention: Retention,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..4u32 {
        let log = log.clone();
        tasks.spawn(async move {
            for i in 0..each {
                log.append(
                    channel(task, i),
                    Bytes::from(format!("{task}-{i}")),
                    retention,
                )
                .await
                .unwrap();
            }
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.unwrap();
    }
}

fn offsets(entries: &[plexus_engine_embedded::Entry]) -> Vec<u64> {
    entries.iter().map(|e| e.offset).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_increase_per_channel_and_channels_are_independent() {
    let dir = tempfile::tempdir().unwrap();
    let log = DurableLog::open(dir.path(), ignore()).unwrap();
    let mut a = Vec::new();
    let mut b = Vec::new();
    for i in 0..5 {
        a.push(
            log.append("a", Bytes::from(format!("a{i}")), keep(100))
                .await
                .unwrap(),
        );
        if i < 3 {
            b.push(
                log.append("b", Bytes::from(format!("b{i}")), keep(100))
                    .await
                    .unwrap(),
            );
        }
    }
    assert_eq!(
        a.iter().map(|p| p.offset).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(b.iter().map(|p| p.offset).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(a.iter().all(|p| p.epoch == a[0].epoch));
    assert!(b.iter().all(|p| p.epoch == b[0].epoch));
    assert_ne!(a[0].epoch, b[0].epoch, "each stream gets its own epoch");
    assert!(a[0].epoch.len() >= 8 && a[0].epoch.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(log.top("a").unwrap(), a[4]);
    assert_eq!(log.top("b").unwrap(), b[2]);
    log.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epoch_and_offsets_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let log = DurableLog::open(dir.path(), ignore()).unwrap();
    let first = log
        .append("news", Bytes::from_static(b"1"), keep(10))
        .await
        .unwrap();
    log.append("news", Bytes::from_static(b"2"), keep(10))
        .await
        .unwrap();
    // `top` of an unknown channel creates and persists its stream.
    let empty = log.top("quiet").unwrap();
    assert_eq!(empty.offset, 0);
    assert_eq!(log.top("quiet").unwrap(), empty);
    log.close();

    let log = DurableLog::open(dir.path(), ignore()).unwrap();
    assert_eq!(
        log.top("news").unwrap(),
        StreamPosition {
            offset: 2,
            epoch: first.epoch.clone()
        }
    );
    assert_eq!(log.top("quiet").unwrap(), empty);
    let next = log
        .append("news", Bytes::from_static(b"3"), keep(10))
        .await
        .unwrap();
    assert_eq!(
        next,
        StreamPosition {
            offset: 3,
            epoch: first.epoch
        }
    );
    let (entries, _) = log.read("news", None, None, false).unwrap();
    assert_eq!(offsets(&entries), [1, 2, 3]);
    assert_eq!(entries[1].data, Bytes::from_static(b"2"));
}

/// `close` takes a checkpoint, so the checkpoint file alone holds the history: the reopened
/// log needs nothing from the write-ahead file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_leaves_everything_in_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let log = DurableLog::open(dir.path(), ignore()).unwrap();
    let mut last = None;
    for i in 1..=50u64 {
        last = Some(
            log.append("trimmed", Bytes::from(format!("m{i}")), keep(10))
                .await
                .unwrap(),
        );
    }
    log.append("other", Bytes::from_static(b"x"), keep(10))
        .await
        .unwrap();
    log.remove("other").unwrap();
    let stats = log.stats();
    log.close();
    assert_eq!(stats.failed_checkpoints, 0);

    std::fs::remove_file(dir.path().join(plexus_engine_embedded::log::WAL_FILE_NAME)).unwrap();
    let log = DurableLog::open(dir.path(), ignore()).unwrap();
    let (entries, top) = log.read("trimmed", None, None, false).unwrap();
    assert_eq!(Some(top.clone()), last);
    assert_eq!(offsets(&entries), (41..=50).collect::<Vec<_>>());
    assert_eq!(entries[9].data, Bytes::from_static(b"m50"));
    let (entries, top) = log.read("other", None, None, false).unwrap();
    assert!(entries.is_empty());
    assert_eq!(top.offset, 1);
    let next = log
        .append("trimmed", Bytes::from_static(b"m51"), keep(10))
        .await
        .unwrap();
    assert_eq!(next.offset, 51);
    assert_eq!(next.epoch, top_epoch(&log, "trimmed"));
    log.close();
}

fn top_epoch(log: &DurableLog, channel: &str) -> std::sync::Arc<str> {
    log.top(channel).unwrap().epoch
}

/// Checkpoints taken while appends go on (every few milliseconds and every few KiB)
/// lose nothing and keep offsets consecutive, and the write-ahead file stays small.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_during_appends_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let options = LogOptions {
        checkpoint_interval: Duration::from_millis(2),
        checkpoint_bytes: 2048,
        ..LogOptions::default()
    };
    let log = DurableLog::open_with_options(dir.path(), ignore(), options).unwrap();
    append_from_tasks(&log, 250, |task, _| format!("c{task}"), keep(1000)).await;
    let stats = log.stats();
    assert!(
        stats.checkpoints >= 2,
        "expected checkpoints, got {stats:?}"
    );
    assert_eq!(stats.failed_checkpoints, 0);
    assert!(
        stats.checkpoint_micros > 0 && stats.commit_micros > 0,
        "{stats:?}"
    );
    // What the records since the last checkpoint hold, at most its threshold and one batch.
    assert!(stats.wal_bytes < 2048 + 64 * 1024, "{stats:?}");
    assert_eq!(stats.streams, 4, "{stats:?}");
    let wal = std::fs::metadata(dir.path().join(plexus_engine_embedded::log::WAL_FILE_NAME))
        .unwrap()
        .len();
    // 1,000 appends are ~60 KiB of records; the file is reused from its start instead.
    assert!(wal <= 1 << 20, "write-ahead file grew to {wal} bytes");
    log.close();
    let log = DurableLog::open(dir.path(), ignore()).unwrap();
    for task in 0..4u32 {
        let (entries, top) = log.read(&format!("c{task}"), None, None, false).unwrap();
        assert_eq!(top.offset, 250);
        assert_eq!(offsets(&entries), (1..=250).collect::<Vec<_>>());
        assert_eq!(entries[249].data, Bytes::from(format!("{task}-249")));
    }
    log.close();
}

/// A checkpoint over many changed streams is stored in slices with appends in between;
/// appends that change streams already stored in the round are stored again, and nothing
/// is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sliced_checkpoints_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // Long enough for hundreds of streams to change between checkpoints.
    let options = LogOptions {
        checkpoint_interval: Duration::from_millis(100),
        ..LogOptions::default()
    };
    let log = DurableLog::open_with_options(dir.path(), ignore(), options).unwrap();
    append_from_tasks(
        &log,
        1000,
        |task, i| format!("m{}", (task * 1000 + i) % 1000),
        keep(100),
    )
    .await;
    let stats = log.stats();
    assert!(
        stats.checkpoint_slices > stats.checkpoints,
        "expected checkpoints in several slices: {stats:?}"
    );
    log.close();
    std::fs::remove_file(dir.path().join(plexus_engine_embedded::log::WAL_FILE_NAME)).unwrap();
    let log = DurableLog::open(dir.path(), ignore()).unwrap();
    for channel in 0..1000u32 {
        let (entries, top) = log.read(&format!("m{channel}"), None, None, false).unwrap();
        assert_eq!(top.offset, 4, "m{channel}");
        assert_eq!(offsets(&entries), [1, 2, 3, 4], "m{channel}");
    }
    log.close();
}

/// A write-ahead file on a device that fails every write (`/dev/full`: ENOSPC): the first
/// batch gets the I/O error; its place cannot be cleared either, so the log stops taking
/// writes rather than risk a restart replaying what was reported failed.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_fails_writes_stops_the_log() {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        "/dev/full",
        dir.path().join(plexus_engine_embedded::log::WAL_FILE_NAME),
    )
    .unwrap();
    let log = DurableLog::open(dir.path(), ignore()).unwrap();
    assert!(log.accepts_writes());
    let first = log.append("a", Bytes::from_static(b"x"), keep(10)).await;
    assert!(matches!(first, Err(LogError::Io(_))), "{first:?}");
    assert!(!log.accepts_writes());
    let second = log.append("a", Bytes::from_static(b"y"), keep(10)).await;
    assert!(matches!(second, Err(LogError::Failed(_))), "{second:?}");
    assert!(second
        .unwrap_err()
        .to_string()
        .contains("stopped taking writes"));
    let stats = log.stats();
    assert_eq!((stats.failed_commits, stats.appends), (1, 0));
    log.close();
}

/// Intervals too long to add to a clock reading mean "never", not a panic of the writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_intervals_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let options = LogOptions {
        sweep_interval: Duration::MAX,
        checkpoint_interval: Duration::MAX,
        commit_window: Duration::MAX,
        ..LogOptions::default()
    };
    let log = DurableLog::open_with_options(dir.path(), ignore(), options).unwrap();
    for i in 1..=3u64 {
        let position = log
            .append("long", Bytes::from(format!("{i}")), keep(10))
            .await
            .unwrap();
        assert_eq!(position.offset, i);
    }
    log.close();
    let log = DurableLog::open(dir.path(), ignore()).unwrap();
    assert_eq!(log.top("long").unwrap().offset, 3);
    log.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_since_limit_and_reverse() {
    let dir = tempfile::tempdir().unwrap();
    let log = DurableLog::open(dir.path(), ignore()).unwrap();
    for i in 1..=10u64 {
        log.append("c", Bytes::from(i.to_string()), keep(100))
            .await
            .unwrap();
    }
    let read = |since, limit, reverse| {
        let (entries, position) = log.read("c", since, limit, reverse).unwrap();
        assert_eq!(position.offset, 10);
        for e in &entries {
            assert_eq!(e.data, Bytes::from(e.offset.to_string()));
        }
        offsets(&entries)
    };
    assert_eq!(read(None, None, false), (1..=10).collect::<Vec<_>>());
    assert_eq!(read(None, None, true), (1..=10).rev().collect::<Vec<_>>());
    assert_eq!(read(None, Some(3), false), [1, 2, 3]);
    assert_eq!(read(None, Some(3), true), [10, 9, 8]);
    assert_eq!(read(Some(3), None, false), (4..=10).collect::<Vec<_>>());
    assert_eq!(read(Some(3), Some(2), false), [4, 5]);
    assert_eq!(read(Some(3), Some(2), true), [10, 9]);
    assert_eq!(read(Some(8), None, true), [10, 9]);
    assert_eq!(read(Some(0), Some(1), false), [1]);
    assert!(read(Some(10), None, false).is_empty());
    assert!(read(Some(99), None, false).is_empty());
    assert!(read(None, Some(0), false).is_empty());

    let (entries, position) = log.read("unknown", None, None, false).unwrap();
    assert!(entries.is_empty());
    assert_eq!(position.offset, 0);
    assert_eq!(log.top("unknown").unwrap(), position);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_len_trims_oldest_entries() {
    let dir = tempfile::tempdir().unwrap();
    let log = DurableLog::open(dir.path(), ignore()).unwrap();
    for i in 1..=10u64 {
        log.append("c", Bytes::from(i.to_string()), keep(3))
            .await
            .unwrap();
    }
    let (entries, position) = log.read("c", None, None, false).unwrap();
    assert_eq!(offsets(&entries), [8, 9, 10]);
    assert_eq!(position.offset, 10);
    // A client behind the window sees only what is retained (and can tell from offsets).
    let (entries, _) = log.read("c", Some(2), None, false).unwrap();
    assert_eq!(offsets(&entries), [8, 9, 10]);
    // A larger max_len later does not bring trimmed entries back.
    log.append("c", Bytes::from_static(b"11"), keep(100))
        .await
        .unwrap();
    let (entries, _) = log.read("c", None, None, false).unwrap();
    assert_eq!(offsets(&entries), [8, 9, 10, 11]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_expires_entries_on_read_sweep_and_append() {
    let short = Retention {
        max_len: 100,
        ttl: Duration::from_millis(200),
    };
    let dir = tempfile::tempdir().unwrap();
    let options = LogOptions {
        sweep_interval: Duration::from_millis(50),
        ..LogOptions::default()
    };
    let log = DurableLog::open_with_options(dir.path(), ignore(), options).unwrap();
    for _ in 0..3 {
        log.append("swept", Bytes::from_static(b"x"), short)
            .await
            .unwrap();
        log.append("idle", Bytes::from_static(b"x"), short)
            .await
            .unwrap();
    }
    let (entries, _) = log.read("swept", None, None, false).unwrap();
    assert_eq!(offsets(&entries), [1, 2, 3]);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Not returned once expired; the stream's position stays.
    let (entries, position) = log.read("idle", None, None, false).unwrap();
    assert!(entries.is_empty());
    assert_eq!(position.offset, 3);
    assert_eq!(log.top("idle").unwrap().offset, 3);

    // The sweep deleted them for real: a longer ttl now does not resurrect them.
    let pos = log
        .append("swept", Bytes::from_static(b"y"), keep(100))
        .await
        .unwrap();
    assert_eq!(pos.offset, 4);
    let (entries, _) = log.read("swept", None, None, false).unwrap();
    assert_eq!(offsets(&entries), [4]);
    log.close();

    // Without a sweep, an append trims expired entries of its channel.
    let dir = tempfile::tempdir().unwrap();
    let options = LogOptions {
        sweep_interval: Duration::from_secs(3600),
        ..LogOptions::default()
    };
    let log = DurableLog::open_with_options(dir.path(), ignore(), options).unwrap();
    for _ in 0..3 {
        log.append("c", Bytes::from_static(b"x"), short)
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    log.append("c", Bytes::from_static(b"y"), short)
        .await
        .unwrap();
    log.append("c", Bytes::from_static(b"z"), keep(100))
        .await
        .unwrap();
    let (entries, _) = log.read("c", None, None, false).unwrap();
    assert_eq!(offsets(&entries), [4, 5]);
    assert_eq!(log.stats().appends, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_keeps_top_and_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let log = DurableLog::open(dir.path(), ignore()).unwrap();
    let mut last = None;
    for _ in 0..5 {
        last = Some(
            log.append("c", Bytes::from_static(b"x"), keep(10))
                .await
                .unwrap(),
        );
    }
    let last = last.unwrap();
    log.remove("c").unwrap();
    log.remove("never-seen").unwrap();
    let (entries, position) = log.read("c", None, None, false).unwrap();
    assert!(entries.is_empty());
    assert_eq!(position, last);
    assert_eq!(log.top("c").unwrap(), last);
    log.close();

    let log = DurableLog::open(dir.path(), ignore()).unwrap();
    assert_eq!(log.top("c").unwrap(), last);
    let next = log
        .append("c", Bytes::from_static(b"y"), keep(10))
        .await
        .unwrap();
    assert_eq!(next.offset, 6);
    assert_eq!(next.epoch, last.epoch);
    let (entries, _) = log.read("c", None, None, false).unwrap();
    assert_eq!(offsets(&entries), [6]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_commit_sees_every_committed_entry_once_in_offset_order() {
    let dir = tempfile::tempdir().unwrap();
    let (on_commit, delivered) = recorder();
    let log = DurableLog::open(dir.path(), on_commit).unwrap();

    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..20 {
        let log = log.clone();
        tasks.spawn(async move {
            let mut acks = Vec::new();
            for i in 0..25 {
                let channel = format!("ch{}", (task + i) % 3);
                let data = Bytes::from(format!("{task}/{i}"));
                let position = log
                    .append(channel.as_str(), data.clone(), keep(1000))
                    .await
                    .unwrap();
                acks.push((channel, position, data));
            }
            acks
        });
    }
    let mut acked = Vec::new();
    while let Some(acks) = tasks.join_next().await {
        acked.extend(acks.unwrap());
    }
    // Neither a rejected append nor one after close reaches on_commit.
    let rejected = Retention {
        max_len: 0,
        ttl: Duration::from_secs(1),
    };
    assert!(matches!(
        log.append("ch0", Bytes::new(), rejected).await,
        Err(LogError::InvalidRetention)
    ));
    let other = log.clone();
    log.close();
    assert!(matches!(
        other.append("ch0", Bytes::new(), keep(10)).await,
        Err(LogError::Closed)
    ));
    assert!(matches!(other.top("fresh"), Err(LogError::Closed)));

    let delivered = delivered.lock().unwrap().clone();
    assert_eq!(delivered.len(), 500);
    assert_eq!(acked.len(), 500);
    let mut next: HashMap<&str, u64> = HashMap::new();
    for (channel, position, _) in &delivered {
        let expected = next.entry(channel).or_insert(1);
        assert_eq!(position.offset, *expected, "channel {channel} out of order");
        *expected += 1;
    }
    let by_position: HashMap<_, _> = delivered
        .iter()
        .map(|(c, p, d)| ((c.clone(), p.offset), (p.epoch.clone(), d.clone())))
        .collect();
    for (channel, position, data) in acked {
        let (epoch, seen) = &by_position[&(channel, position.offset)];
        assert_eq!(epoch, &position.epoch);
        assert_eq!(seen, &data);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_commit_may_call_back_into_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let slot: Arc<Mutex<Option<DurableLog>>> = Arc::default();
    let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
    let (slot2, seen2) = (slot.clone(), seen.clone());
    let on_commit: OnCommit = Arc::new(move |channel, position, _| {
        if let Some(log) = slot2.lock().unwrap().as_ref() {
            // Reads, and a stream creation, from inside the writer thread.
            let (entries, top) = log
                .read(channel, Some(position.offset - 1), None, false)
                .unwrap();
            assert_eq!(top.offset, position.offset);
            assert_eq!(entries.len(), 1);
            seen2.lock().unwrap().push(
                log.top(&format!("side-{}", position.offset))
                    .unwrap()
                    .offset,
            );
        }
    });
    let log = DurableLog::open(dir.path(), on_commit).unwrap();
    *slot.lock().unwrap() = Some(log.clone());
    for _ in 0..3 {
        log.append("c", Bytes::from_static(b"x"), keep(10))
            .await
            .unwrap();
    }
    slot.lock().unwrap().take();
    assert_eq!(*seen.lock().unwrap(), [0, 0, 0]);
    assert_eq!(log.top("side-2").unwrap().offset, 0);
    log.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let log = DurableLog::open(dir.path(), ignore()).unwrap();
    let start = Arc::new(tokio::sync::Barrier::new(1000));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000u32 {
        let (log, start) = (log.clone(), start.clone());
        tasks.spawn(async move {
            start.wait().await;
            let channel = format!("ch{}", i % 10);
            log.append(channel.as_str(), Bytes::from(i.to_string()), keep(1000))
                .await
                .unwrap()
        });
    }
    let mut count = 0;
    while let Some(result) = tasks.join_next().await {
        result.unwrap();
        count += 1;
    }
    assert_eq!(count, 1000);
    let stats = log.stats();
    eprintln!("1000 concurrent appends: {stats:?}");
    assert_eq!(stats.appends, 1000);
    assert!(stats.commits < 100, "expected group commit, got {stats:?}");
    // After big batches the writer waits for another big one, but only for a moment: an
    // append on its own still gets through, and the one after it too.
    for i in 0..2 {
        let lone = log
            .append("lone", Bytes::from(format!("lone{i}")), keep(10))
            .await
            .unwrap();
        assert_eq!(lone.offset, i + 1);
    }
    for c in 0..10 {
        let (entries, top) = log.read(&format!("ch{c}"), None, None, false).unwrap();
        assert_eq!(top.offset, 100);
        assert_eq!(offsets(&entries), (1..=100).collect::<Vec<_>>());
    }
}

const CHILD_ENV: &str = "PLEXUS_LOG_CHILD";
/// Set in the child to take a checkpoint every few milliseconds and every few records.
const CHILD_CHECKPOINTS_ENV: &str = "PLEXUS_LOG_CHILD_CHECKPOINTS";

/// Child side: remove the history of one channel, then append forever (well, at most a
/// minute) and print every acknowledgement.
fn run_child(dir: &Path) {
    // With checkpoints: many channels, so that a checkpoint takes several slices.
    let (options, channels) = if std::env::var_os(CHILD_CHECKPOINTS_ENV).is_some() {
        let options = LogOptions {
            // Long enough for several hundred streams to change between checkpoints, so
            // that each takes several slices.
            checkpoint_interval: Duration::from_millis(20),
            ..LogOptions::default()
        };
        (options, 400)
    } else {
        (LogOptions::default(), 3)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let log = DurableLog::open_with_options(dir, ignore(), options).unwrap();
        for i in 0..3 {
            log.append("gone", Bytes::from(format!("gone{i}")), keep(100))
                .await
                .unwrap();
        }
        log.remove("gone").unwrap();
        // On a line of its own: libtest has already printed "test NAME ... " without one.
        println!("\nREMOVED gone {}", log.top("gone").unwrap().offset);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut tasks = tokio::task::JoinSet::new();
        for task in 0..8 {
            let log = log.clone();
            tasks.spawn(async move {
                let mut i = 0u64;
                while Instant::now() < deadline {
                    let channel = format!("ch{}", (task + 8 * i) % channels);
                    let data = format!("t{task}-{i}-{}", "p".repeat(i as usize % 50));
                    let position = log
                        .append(channel.as_str(), Bytes::from(data.clone()), keep(1_000_000))
                        .await
                        .unwrap();
                    println!(
                        "ACK {channel} {} {} {data}",
                        position.offset, position.epoch
                    );
                    if task == 0 && i.is_multiple_of(200) {
                        let stats = log.stats();
                        println!("STATS {} {}", stats.checkpoints, stats.checkpoint_slices);
                    }
                    i += 1;
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    });
}

#[cfg(unix)]
#[test]
fn sigkill_loses_no_acknowledged_entry() {
    sigkill_child("sigkill_loses_no_acknowledged_entry", false, 500);
}

/// The same, with a checkpoint every few milliseconds: the kill lands during or between
/// checkpoints, and the write-ahead file is overwritten from its start many times.
#[cfg(unix)]
#[test]
fn sigkill_during_checkpoints_loses_no_acknowledged_entry() {
    sigkill_child(
        "sigkill_during_checkpoints_loses_no_acknowledged_entry",
        true,
        20_000,
    );
}

/// Runs the child (this test binary, as test `name`), kills it with SIGKILL after
/// `kill_after` acknowledgements, then checks every acknowledged entry in the reopened log.
#[cfg(unix)]
fn sigkill_child(name: &str, with_checkpoints: bool, kill_after: usize) {
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};

    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        run_child(Path::new(&dir));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if with_checkpoints {
        command.env(CHILD_CHECKPOINTS_ENV, "1");
    }
    let mut child = command.spawn().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut acks = Vec::new();
    let mut removed_top = None;
    // The child's last (checkpoints, slices).
    let mut checkpoints = (0, 0);
    let mut killed = false;
    let mut line = Vec::new();
    loop {
        line.clear();
        if stdout.read_until(b'\n', &mut line).unwrap() == 0 {
            break;
        }
        // A line cut short by the kill was never a complete acknowledgement.
        let Some(text) = line.strip_suffix(b"\n") else {
            break;
        };
        let text = String::from_utf8(text.to_vec()).unwrap();
        let fields: Vec<&str> = text.split(' ').collect();
        if fields.len() == 5 && fields[0] == "ACK" {
            acks.push((
                fields[1].to_owned(),
                fields[2].parse::<u64>().unwrap(),
                fields[3].to_owned(),
                fields[4].to_owned(),
            ));
        }
        if fields.len() == 3 && fields[0] == "STATS" {
            checkpoints = (
                fields[1].parse::<u64>().unwrap(),
                fields[2].parse::<u64>().unwrap(),
            );
        }
        if fields.len() == 3 && fields[0] == "REMOVED" {
            removed_top = Some(fields[2].parse::<u64>().unwrap());
        }
        if acks.len() == kill_after && !killed {
            child.kill().unwrap(); // SIGKILL, with appends in flight
            killed = true;
        }
    }
    let status = child.wait().unwrap();
    assert!(
        killed,
        "child stopped early: {status:?} after {} acks",
        acks.len()
    );
    assert_eq!(status.signal(), Some(9));
    assert!(acks.len() >= kill_after);
    eprintln!(
        "child acknowledged {} appends before SIGKILL; (checkpoints, slices) {checkpoints:?}",
        acks.len()
    );
    if with_checkpoints {
        assert!(
            checkpoints.1 > checkpoints.0 && checkpoints.0 > 0,
            "expected checkpoints in several slices before the kill: {checkpoints:?}"
        );
    }

    let log = DurableLog::open(dir.path(), ignore()).unwrap();
    // The removal was acknowledged before any append: it must hold after the crash.
    let (gone, gone_top) = log.read("gone", None, None, false).unwrap();
    assert_eq!(Some(gone_top.offset), removed_top);
    assert_eq!(gone_top.offset, 3);
    assert!(gone.is_empty(), "removed history came back: {gone:?}");
    let mut max_offset: HashMap<String, u64> = HashMap::new();
    for (channel, offset, epoch, data) in &acks {
        let (entries, top) = log.read(channel, Some(offset - 1), Some(1), false).unwrap();
        assert_eq!(&*top.epoch, epoch.as_str(), "epoch of {channel} changed");
        assert_eq!(entries.len(), 1, "{channel}@{offset} lost");
        assert_eq!(entries[0].offset, *offset);
        assert_eq!(entries[0].data, Bytes::from(data.clone()));
        let max = max_offset.entry(channel.clone()).or_default();
        *max = (*max).max(*offset);
    }
    for (channel, max) in max_offset {
        let (entries, top) = log.read(&channel, None, None, false).unwrap();
        assert!(top.offset >= max);
        assert_eq!(offsets(&entries), (1..=top.offset).collect::<Vec<_>>());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let next = runtime
            .block_on(log.append(
                channel.as_str(),
                Bytes::from_static(b"after"),
                keep(1_000_000),
            ))
            .unwrap();
        assert_eq!(next.offset, top.offset + 1, "offsets must never be reused");
        assert_eq!(next.epoch, top.epoch);
    }
    log.close();
}
