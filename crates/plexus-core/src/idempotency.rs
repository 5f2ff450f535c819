//! Idempotent publishing (the server API's `idempotency_key`, as in Centrifugo): a backend that
//! retries a publish it is unsure of, with the same key, gets the first attempt's result
//! instead of a second publication, for [`WINDOW`] after the first.
//!
//! The engines keep one small record per channel and key ([`Engine::claim`]): claimed by the
//! first caller (pending, for at most [`PENDING`]), then its outcome (the publication's
//! position, or none) for [`WINDOW`], or removed again if the publish was refused before
//! anything was written, so that a retry publishes. Engines shared by several nodes keep it
//! where every node sees it (Redis, a NATS key-value bucket), so a retry that a load balancer
//! sends to another node is still recognised. [`publish_once`] runs the protocol over any
//! engine.
//!
//! When it is unknown whether the publish happened (an engine timeout, a node that died
//! between its claim and its record), the claim stays pending until [`PENDING`] has passed:
//! retries meanwhile are told to wait ([`OnceError::InProgress`]), later ones publish.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::engine::{Engine, EngineError, StreamPosition};

/// How long a key's outcome is remembered (Centrifugo's window is 5 minutes too).
pub const WINDOW: Duration = Duration::from_secs(300);

/// How long a claim stays pending without an outcome: then the key is free again.
pub const PENDING: Duration = Duration::from_secs(30);

/// How long a duplicate waits for the first attempt, still in flight, to finish.
const PENDING_WAIT: Duration = Duration::from_secs(5);

/// The record of a publication without history (no position).
const NO_POSITION: &[u8] = b"-";

/// Longest idempotency key, in bytes (the API refuses longer ones).
pub const MAX_KEY_LEN: usize = 256;

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
        [b'p', ..] => Some(Record::Pending),
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

fn unix_millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |since| {
        u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
    })
}

/// The record a claim starts with: `p` and when it stops being pending (Unix milliseconds),
/// for engines that cannot expire it by themselves ([`pending_is_stale`]).
pub fn pending_record(ttl: Duration) -> Bytes {
    format!("p{}", unix_millis(SystemTime::now() + ttl)).into()
}

/// Whether `record` is a pending claim whose time is up (its claimer never recorded an
/// outcome), so that the key may be claimed again.
pub fn pending_is_stale(record: &[u8]) -> bool {
    let Some(deadline) = record.strip_prefix(b"p") else {
        return false;
    };
    std::str::from_utf8(deadline)
        .ok()
        .and_then(|deadline| deadline.parse::<u64>().ok())
        .is_none_or(|deadline| deadline <= unix_millis(SystemTime::now()))
}

/// How a publish attempted under a claim failed.
#[derive(Debug)]
pub enum Failure<E> {
    /// Refused before anything was written (a bad channel, say; an engine error is not
    /// taken for one, as the publication may have been sent): the key is given back, and a
    /// retry publishes.
    Refused(E),
    /// Unknown whether it was published (a timeout): the key stays pending for [`PENDING`],
    /// so a retry meanwhile cannot publish it twice.
    Unknown(E),
}

/// Why [`publish_once`] did not publish or answer.
#[derive(Debug, thiserror::Error)]
pub enum OnceError<E> {
    /// The engine could not keep the record.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The first attempt with this key is still in flight, or its outcome is unknown (for at
    /// most [`PENDING`]): try again later.
    #[error("a publish with this idempotency key is in progress")]
    InProgress,
    /// The publish itself failed.
    #[error("the publish failed")]
    Publish(E),
}

/// Publishes with `publish` unless `key` was used in `channel` within [`WINDOW`]; then answers
/// with the first publish's position and publishes nothing. Concurrent calls with one key
/// publish once: the others wait for the first (at most a few seconds).
///
/// Run it where it cannot be dropped half-way (a task of its own): dropped between its claim
/// and its record, it leaves the key pending for [`PENDING`].
pub async fn publish_once<F, Fut, E>(
    engine: &dyn Engine,
    channel: &str,
    key: &str,
    publish: F,
) -> Result<Option<StreamPosition>, OnceError<E>>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<Option<StreamPosition>, Failure<E>>>,
{
    let deadline = Instant::now() + PENDING_WAIT;
    let mut pause = Duration::from_millis(10);
    loop {
        match engine.claim(channel, key, PENDING).await? {
            Claim::Won => break,
            Claim::Held(record) => match decode(&record) {
                Some(Record::Published(position)) => return Ok(position),
                Some(Record::Pending) if Instant::now() < deadline => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(250));
                }
                // Still pending, or unreadable (from a newer version?): not ours to replace.
                _ => return Err(OnceError::InProgress),
            },
        }
    }
    match publish().await {
        Ok(position) => {
            // Published. A record that is not kept leaves the key pending until its claim
            // expires: retries meanwhile are told to wait, later ones publish.
            let record = engine.record(channel, key, encode(position.as_ref()), WINDOW);
            if let Err(error) = record.await {
                tracing::warn!(%error, channel, "idempotency record not kept");
            }
            Ok(position)
        }
        Err(Failure::Refused(error)) => {
            if let Err(release) = engine.release(channel, key).await {
                tracing::warn!(error = %release, channel, "idempotency claim not released");
            }
            Err(OnceError::Publish(error))
        }
        Err(Failure::Unknown(error)) => Err(OnceError::Publish(error)),
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
                state.records.insert(id, (pending_record(ttl), now + ttl));
                Claim::Won
            }
        }
    }

    /// Sets a key's record, kept `ttl` from now (even if its claim had expired meanwhile:
    /// the outcome is known now).
    pub fn record(&self, channel: &str, key: &str, record: Bytes, ttl: Duration) {
        let id = (Arc::<str>::from(channel), Box::<str>::from(key));
        self.lock()
            .records
            .insert(id, (record, Instant::now() + ttl));
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
        assert_eq!(decode(&pending_record(PENDING)), Some(Record::Pending));
        assert!(!pending_is_stale(&pending_record(PENDING)));
        assert!(pending_is_stale(&pending_record(Duration::ZERO)));
        assert!(pending_is_stale(b"p"), "no deadline: stale");
        assert!(!pending_is_stale(b"-"));
        assert_eq!(decode(b"x:y"), None);
        assert_eq!(decode(b""), None);
    }

    #[test]
    fn local_claims_expire_and_release() {
        let claims = LocalClaims::default();
        let short = Duration::from_millis(50);
        assert_eq!(claims.claim("c", "k", short), Claim::Won);
        assert!(matches!(claims.claim("c", "k", short), Claim::Held(record) if record[0] == b'p'));
        assert_eq!(claims.claim("c", "other", short), Claim::Won);
        assert_eq!(claims.claim("d", "k", short), Claim::Won);
        claims.record("c", "k", Bytes::from_static(b"-"), short);
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
