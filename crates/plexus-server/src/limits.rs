//! Connection caps: in all and per IP address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::metrics::Refusal;

#[derive(Debug)]
pub struct ConnectionLimits {
    max_total: usize,
    max_per_ip: usize,
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Holds one connection's place; dropping it frees the place.
#[derive(Debug)]
pub struct ConnectionGuard {
    limits: Arc<ConnectionLimits>,
    ip: IpAddr,
}

impl ConnectionLimits {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<ConnectionLimits> {
        Arc::new(ConnectionLimits {
            max_total,
            max_per_ip,
            total: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
        })
    }

    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionGuard, Refusal> {
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if self.total.load(Ordering::Relaxed) >= self.max_total {
            return Err(Refusal::ServerFull);
        }
        let count = per_ip.entry(ip).or_insert(0);
        if *count >= self.max_per_ip {
            return Err(Refusal::AddressFull);
        }
        *count += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(ConnectionGuard {
            limits: self.clone(),
            ip,
        })
    }

    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut per_ip = self.limits.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = per_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                per_ip.remove(&self.ip);
            }
        }
        self.limits.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A token bucket for one connection's messages: `rate` a second on average, in bursts of up
/// to `rate`. Eight bytes, as it is part of every connection's state.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MessageRate {
    tokens: f32,
    /// [`now_ms`] when `tokens` was last brought up to date.
    at_ms: u32,
}

impl MessageRate {
    pub(crate) fn new(rate: u32) -> MessageRate {
        MessageRate {
            tokens: rate as f32,
            at_ms: now_ms(),
        }
    }

    /// Takes a message's token: false when the connection is over `rate` (0: no limit).
    pub(crate) fn allow(&mut self, rate: u32) -> bool {
        if rate == 0 {
            return true;
        }
        let now = now_ms();
        // Wraps after 49 days; a connection silent that long at worst starts with fewer tokens.
        let elapsed = now.wrapping_sub(self.at_ms);
        self.at_ms = now;
        let rate = rate as f32;
        self.tokens = (self.tokens + elapsed as f32 * rate / 1000.0).min(rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Milliseconds since the first call, wrapping.
fn now_ms() -> u32 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps() {
        let limits = ConnectionLimits::new(3, 2);
        let a: IpAddr = [127, 0, 0, 1].into();
        let b: IpAddr = [127, 0, 0, 2].into();
        let first = limits.try_acquire(a).unwrap();
        let _second = limits.try_acquire(a).unwrap();
        assert_eq!(limits.try_acquire(a).unwrap_err(), Refusal::AddressFull);
        let _third = limits.try_acquire(b).unwrap();
        assert_eq!(limits.try_acquire(b).unwrap_err(), Refusal::ServerFull);
        drop(first);
        assert_eq!(limits.open(), 2);
        limits.try_acquire(a).unwrap();
    }

    #[test]
    fn message_rate() {
        let mut unlimited = MessageRate::new(0);
        assert!((0..10_000).all(|_| unlimited.allow(0)));
        let mut rate = MessageRate::new(50);
        // A burst of a second's worth, then nothing until tokens come back.
        assert_eq!((0..100).filter(|_| rate.allow(50)).count(), 50);
        assert!(!rate.allow(50));
        std::thread::sleep(std::time::Duration::from_millis(120));
        // 120 ms at 50 a second: 6 (5 if the clock ticked late), not more.
        let allowed = (0..100).filter(|_| rate.allow(50)).count();
        assert!((5..=7).contains(&allowed), "{allowed}");
    }
}
