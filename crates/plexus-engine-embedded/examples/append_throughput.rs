//! Appends per second with 1, 8 and 64 concurrent appenders, 3 seconds each, each
//! append acknowledged only once durable. Run with
//! `cargo run --release -p plexus-engine-embedded --example append_throughput`.
//! Uses a fresh log under the system temp directory (or `PLEXUS_BENCH_DIR`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use plexus_engine_embedded::{DurableLog, Retention};

const RUN: Duration = Duration::from_secs(3);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let base = std::env::var_os("PLEXUS_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let retention = Retention {
        max_len: 1000,
        ttl: Duration::from_secs(600),
    };
    let payload = Bytes::from(vec![b'x'; 200]);
    println!("appenders  appends/s  commits  appends/commit  mean latency");
    for appenders in [1usize, 8, 64] {
        let dir = tempfile::tempdir_in(&base)?;
        let log = DurableLog::open(dir.path(), Arc::new(|_, _, _| {}))?;
        let done = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..appenders {
            let (log, done, payload) = (log.clone(), done.clone(), payload.clone());
            tasks.spawn(async move {
                let channel = format!("bench-{}", i % 16);
                while start.elapsed() < RUN {
                    log.append(channel.as_str(), payload.clone(), retention)
                        .await?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<_, plexus_engine_embedded::LogError>(())
            });
        }
        while let Some(result) = tasks.join_next().await {
            result??;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let appends = done.load(Ordering::Relaxed);
        let stats = log.stats();
        println!(
            "{appenders:>9}  {:>9.0}  {:>7}  {:>14.1}  {:>8.2} ms",
            appends as f64 / elapsed,
            stats.commits,
            appends as f64 / stats.commits.max(1) as f64,
            elapsed * 1000.0 * appenders as f64 / appends.max(1) as f64,
        );
        log.close();
    }
    Ok(())
}
