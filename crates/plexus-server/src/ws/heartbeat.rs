//! One heartbeat sweep for every WebSocket connection, instead of a timer per connection.
//!
//! Connections sit in a ring of slots, one slot per tick of the ping interval. Each tick the
//! sweeper visits one slot and asks each of its connections for a ping
//! ([`Control::Heartbeat`] in its outbox: a parked connection's ping goes out with the direct
//! writer's next round, with the rest of the slot's, and its task is not woken). It also visits
//! the slot pinged `pong_timeout` ago: a connection that has read nothing since its ping is told
//! to close ([`Control::HeartbeatTimeout`]). Anything read from the peer counts as an answer.
//!
//! An idle connection so costs one ping write and one read per ping interval, with no timer of
//! its own and no wake-up of its own to send the ping.
//!
//! The sweep knows every WebSocket connection, so it also tells them all when the server shuts
//! down ([`Control::Shutdown`]), and connections wait on their outbox alone.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use plexus_core::{Control, Outbox};
use tokio::time::MissedTickBehavior;

use super::lock;
use crate::Shared;

/// One connection's place in the sweep.
#[derive(Debug)]
pub(crate) struct Beat {
    outbox: Arc<Outbox>,
    /// The tick its unanswered ping was sent at; 0 when nothing is outstanding.
    pinged_at: AtomicU64,
}

impl Beat {
    /// The peer sent something: any outstanding ping is answered.
    pub(crate) fn heard(&self) {
        if self.pinged_at.load(Ordering::Relaxed) != 0 {
            self.pinged_at.store(0, Ordering::Relaxed);
        }
    }
}

#[derive(Debug)]
pub(crate) struct Heartbeats {
    slots: Box<[Mutex<Vec<Weak<Beat>>>]>,
    tick: Duration,
    /// `pong_timeout` in ticks.
    pong_ticks: u64,
    /// The next slot the sweeper visits.
    cursor: AtomicUsize,
}

impl Heartbeats {
    pub(crate) fn new(ping_interval: Duration, pong_timeout: Duration) -> Heartbeats {
        let tick = (ping_interval.min(pong_timeout) / 4)
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        let ticks = |d: Duration| (d.as_nanos() / tick.as_nanos()).max(1);
        let n_slots = ticks(ping_interval) as usize;
        Heartbeats {
            slots: (0..n_slots).map(|_| Mutex::default()).collect(),
            tick,
            pong_ticks: ticks(pong_timeout) as u64,
            cursor: AtomicUsize::new(0),
        }
    }

    /// Adds a connection; its first ping comes about one ping interval from now.
    pub(crate) fn register(&self, outbox: Arc<Outbox>) -> Arc<Beat> {
        let beat = Arc::new(Beat {
            outbox,
            pinged_at: AtomicU64::new(0),
        });
        let n = self.slots.len();
        // The slot just visited is the one visited last from now.
        let slot = (self.cursor.load(Ordering::Relaxed) + n - 1) % n;
        lock(&self.slots[slot]).push(Arc::downgrade(&beat));
        beat
    }

    /// One tick: pings the slot due, closes the silent ones of the slot pinged
    /// `pong_timeout` ago. Ticks are numbered from 1.
    fn sweep(&self, tick: u64) {
        let n = self.slots.len();
        let due = self.cursor.fetch_add(1, Ordering::Relaxed) % n;
        lock(&self.slots[due]).retain(|beat| {
            let Some(beat) = beat.upgrade() else {
                return false; // the connection is gone
            };
            let pinged_at = beat.pinged_at.load(Ordering::Relaxed);
            if pinged_at == 0 {
                beat.pinged_at.store(tick, Ordering::Relaxed);
                beat.outbox.push_control(Control::Heartbeat);
            } else {
                self.check(&beat, pinged_at, tick); // no second ping while one is unanswered
            }
            true
        });
        let checked = (due + n - (self.pong_ticks % n as u64) as usize) % n;
        if checked != due {
            for beat in lock(&self.slots[checked]).iter().filter_map(Weak::upgrade) {
                let pinged_at = beat.pinged_at.load(Ordering::Relaxed);
                if pinged_at != 0 {
                    self.check(&beat, pinged_at, tick);
                }
            }
        }
    }

    /// Asks every connection to close for shutdown.
    fn shut_down(&self) {
        for slot in self.slots.iter() {
            for beat in lock(slot).iter().filter_map(Weak::upgrade) {
                beat.outbox.push_control(Control::Shutdown);
            }
        }
    }

    fn check(&self, beat: &Beat, pinged_at: u64, tick: u64) {
        if tick.saturating_sub(pinged_at) >= self.pong_ticks {
            beat.outbox.push_control(Control::HeartbeatTimeout);
        }
    }
}

/// Runs the sweep until shutdown, then tells every connection. (A connection that registers
/// after that sees the server's shutdown token cancelled when it starts.)
pub(crate) fn start(shared: &Arc<Shared>) {
    let weak = Arc::downgrade(shared);
    let shutdown = shared.shutdown.clone();
    let mut interval = tokio::time::interval(shared.heartbeats.tick);
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tokio::spawn(async move {
        interval.tick().await;
        let mut tick = 0u64;
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                () = shutdown.cancelled() => {
                    if let Some(shared) = weak.upgrade() {
                        shared.heartbeats.shut_down();
                    }
                    return;
                }
            }
            let Some(shared) = weak.upgrade() else { return };
            tick += 1;
            shared.heartbeats.sweep(tick);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use plexus_core::Delivery;

    fn drained(outbox: &Outbox) -> Vec<Delivery> {
        let mut out = Vec::new();
        outbox.drain(usize::MAX, &mut out);
        out
    }

    #[test]
    fn pings_once_per_interval_and_times_out_the_silent() {
        // Ticks of 500 ms: 8 slots, a pong timeout of 4 ticks.
        let beats = Heartbeats::new(Duration::from_secs(4), Duration::from_secs(2));
        assert_eq!((beats.slots.len(), beats.pong_ticks), (8, 4));
        let quiet = Arc::new(Outbox::new(1 << 20));
        let chatty = Arc::new(Outbox::new(1 << 20));
        let quiet_beat = beats.register(quiet.clone());
        let chatty_beat = beats.register(chatty.clone());
        let mut pings = Vec::new();
        for tick in 1..=12 {
            beats.sweep(tick);
            for delivery in drained(&chatty) {
                assert!(matches!(delivery, Delivery::Control(Control::Heartbeat)));
                pings.push(tick);
                chatty_beat.heard();
            }
            let got = drained(&quiet);
            match tick {
                8 => assert!(matches!(got[..], [Delivery::Control(Control::Heartbeat)])),
                12 => assert!(
                    matches!(got[..], [Delivery::Control(Control::HeartbeatTimeout)]),
                    "{got:?}"
                ),
                _ => assert!(got.is_empty(), "tick {tick}: {got:?}"),
            }
        }
        assert_eq!(pings, [8], "the first ping one interval after registering");
        drop(quiet_beat);
        for tick in 13..=16 {
            beats.sweep(tick);
        }
        assert_eq!(
            drained(&chatty).len(),
            1,
            "the next ping, one interval later"
        );
        let live: usize = beats.slots.iter().map(|slot| lock(slot).len()).sum();
        assert_eq!(live, 1, "a dropped connection leaves the sweep");
    }
}
