//! Idempotent publishing (the server API's `idempotency_key`, as in Centrifugo): a backend that
//! retries a publish it is unsure of, with the same key, gets the first attempt's result
//! instead of a second publication, for [`WINDOW`] after the first.
//!
//! The engines keep one small record per channel and key ([`Engine::claim`]): claimed by the
//! first caller (`pending`), then its outcome (the publication's position, or none), or
//! removed again if the publish failed so that a retry publishes. Engines shared by several
//! nodes keep it where every node sees it (Redis, a NATS key-value bucket), so a retry that a
//! load balancer sends to another node is still recognised. [`publish_once`] runs the
//! protocol over any engine.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::engine::{Engine, EngineError, StreamPosition};

/// How long a key is remembered after its first publish (Centrifugo's is 5 minutes too).
pub const WINDOW: Duration = Duration::from_secs(300);

/// How long a duplicate waits for the first attempt, still in flight, to finish.
const PENDING_WAIT: Duration = Duration::from_secs(5);

/// The record of a key still being published.
const PENDING: &[u8] = b"p";
/// The record of a publication without history (no position).
const NO_POSITION: &[u8] = b"-";

/// What [`Engine::claim`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Nobody had the key: it is now this caller's (recorded as pending).
    Won,
    /// Someone had it: what they recorded.
    Held(Bytes),
}

/// What a record says.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Record {
    Pending,
    Published(Option<StreamPosition>),
}

fn encode(position: Option<&StreamPosition>) -> Bytes {
    match position {
        None => Bytes::from_static(NO_POSITION),
        Some(position) => format!("{}:{}", position.offset, position.epoch).into(),
    }
}

fn decode(record: &[u8]) -> Option<Record> {
    match record {
        PENDING => Some(Record::Pending),
        NO_POSITION => Some(Record::Published(None)),
        _ => {
            let text = std::str::from_utf8(record).ok()?;
            let (offset, epoch) = text.split_once(':')?;
            Some(Record::Published(Some(StreamPosition {
                offset: offset.parse().ok()?,
                epoch: epoch.into(),
            })))
        }
    }
}

/// The record a claim starts with, for engines that store it.
pub fn pending_record() -> Bytes {
    Bytes::from_static(PENDING)
}

/// Why [`publish_once`] did not publish or answer.
#[derive(Debug, thiserror::Error)]
pub enum OnceError<E> {
    /// The engine could not keep the record.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The first attempt with this key is still in flight (or its node stopped before it
    /// finished): try again later.
    #[error("a publish with this idempotency key is in progress")]
    InProgress,
    /// The publish itself failed (nothing was published; a retry may publish).
    #[error("the publish failed")]
    Publish(E),
}

/// Publishes with `publish` unless `key` was used in `channel` within [`WINDOW`]; then answers
/// with the first publish's position and publishes nothing. Concurrent calls with one key
/// publish once: the others wait for the first (at most a few seconds).
pub async fn publish_once<F, Fut, E>(
    engine: &dyn Engine,
    channel: &str,
    key: &str,
    publish: F,
) -> Result<Option<StreamPosition>, OnceError<E>>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<Option<StreamPosition>, E>>,
{
    let deadline = Instant::now() + PENDING_WAIT;
    loop {
        match engine.claim(channel, key, WINDOW).await? {
            Claim::Won => break,
            Claim::Held(record) => match decode(&record) {
                Some(Record::Published(position)) => return Ok(position),
                Some(Record::Pending) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                // Still pending, or unreadable (from a newer version?): not ours to replace.
                _ => return Err(OnceError::InProgress),
            },
        }
    }
    match publish().await {
        Ok(position) => {
            // Published: a record that fails to be written only lets a retry publish again,
            // which is what happens without a key.
            if let Err(error) = engine.record(channel, key, encode(position.as_ref())).await {
                tracing::warn!(%error, channel, "idempotency record not kept");
            }
            Ok(position)
        }
        Err(error) => {
            if let Err(release) = engine.release(channel, key).await {
                tracing::warn!(error = %release, channel, "idempotency claim not released");
            }
            Err(OnceError::Publish(error))
        }
    }
}

/// Claims kept in this process, for the single-node engines. Expired records are swept at
/// most once a second, when claiming.
#[derive(Default)]
pub struct LocalClaims {
    state: Mutex<LocalState>,
}

#[derive(Default)]
struct LocalState {
    records: HashMap<(Arc<str>, Box<str>), (Bytes, Instant)>,
    swept: Option<Instant>,
}

impl LocalClaims {
    fn lock(&self) -> std::sync::MutexGuard<'_, LocalState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn claim(&self, channel: &str, key: &str, ttl: Duration) -> Claim {
        let now = Instant::now();
        let mut state = self.lock();
        if state
            .swept
            .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1))
        {
            state.records.retain(|_, (_, expires)| *expires > now);
            state.swept = Some(now);
        }
        let id = (Arc::<str>::from(channel), Box::<str>::from(key));
        match state.records.get(&id) {
            Some((record, expires)) if *expires > now => Claim::Held(record.clone()),
            _ => {
                state.records.insert(id, (pending_record(), now + ttl));
                Claim::Won
            }
        }
    }

    pub fn record(&self, channel: &str, key: &str, record: Bytes) {
        let mut state = self.lock();
        let id = (Arc::<str>::from(channel), Box::<str>::from(key));
        if let Some(entry) = state.records.get_mut(&id) {
            entry.0 = record;
        }
    }

    pub fn release(&self, channel: &str, key: &str) {
        let id = (Arc::<str>::from(channel), Box::<str>::from(key));
        self.lock().records.remove(&id);
    }

    /// Records kept (expired ones included until the next sweep).
    pub fn len(&self) -> usize {
        self.lock().records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let position = StreamPosition {
            offset: 42,
            epoch: "ab:cd".into(),
        };
        assert_eq!(
            decode(&encode(Some(&position))),
            Some(Record::Published(Some(position)))
        );
        assert_eq!(decode(&encode(None)), Some(Record::Published(None)));
        assert_eq!(decode(&pending_record()), Some(Record::Pending));
        assert_eq!(decode(b"x:y"), None);
        assert_eq!(decode(b""), None);
    }

    #[test]
    fn local_claims_expire_and_release() {
        let claims = LocalClaims::default();
        let short = Duration::from_millis(50);
        assert_eq!(claims.claim("c", "k", short), Claim::Won);
        assert_eq!(claims.claim("c", "k", short), Claim::Held(pending_record()));
        assert_eq!(claims.claim("c", "other", short), Claim::Won);
        assert_eq!(claims.claim("d", "k", short), Claim::Won);
        claims.record("c", "k", Bytes::from_static(b"-"));
        assert_eq!(claims.claim("c", "k", short), Claim::Held("-".into()));
        claims.release("c", "k");
        assert_eq!(claims.claim("c", "k", short), Claim::Won);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(claims.claim("c", "k", short), Claim::Won, "expired");
        std::thread::sleep(Duration::from_millis(1000));
        claims.claim("e", "k", short);
        assert_eq!(claims.len(), 1, "expired records are swept");
    }
}
