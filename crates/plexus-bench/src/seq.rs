//! The measured messages (`{"seq":1,"t":123,"pad":"xxx"}`) and the accounting of their order and
//! loss at each receiver.

use serde::Deserialize;

/// What a measured message carries: its sequence number (1, 2, …; 0 is a warm-up probe that is
/// not counted) and when it was sent, in nanoseconds since the run's shared start instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Stamp {
    pub seq: u64,
    pub t: u64,
}

/// The sequence number of warm-up probes.
pub const PROBE: u64 = 0;

/// The message text for `seq` sent at `t`, padded with `x` to `size` bytes when `size` is more
/// than the message without padding.
pub fn stamp_message(seq: u64, t: u64, size: usize) -> String {
    let bare = format!(r#"{{"seq":{seq},"t":{t},"pad":""}}"#);
    let pad = size.saturating_sub(bare.len());
    let mut text = String::with_capacity(bare.len() + pad);
    text.push_str(&bare[..bare.len() - 2]);
    text.extend(std::iter::repeat_n('x', pad));
    text.push_str("\"}");
    text
}

/// Reads a stamp from a message's text; `None` when the text is not one.
pub fn parse_stamp(text: &str) -> Option<Stamp> {
    serde_json::from_str(text).ok()
}

/// What one receiver saw of a numbered stream, 1, 2, 3, …: counts, not the numbers, so it stays
/// a few words whatever the length of the run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeqTracker {
    /// The number expected next: one past the highest seen.
    next: u64,
    received: u64,
    /// Arrivals lower than one already seen: late, or duplicated.
    out_of_order: u64,
}

/// How one arrival relates to those before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    InOrder,
    /// Arrived after a gap of this many numbers.
    AfterGap(u64),
    /// Lower than one already seen.
    OutOfOrder,
}

/// The tally at the end of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeqCounts {
    pub received: u64,
    /// Sent but never received: `sent − received` (a duplicate would hide one loss; it is
    /// counted in `out_of_order` too).
    pub lost: u64,
    pub out_of_order: u64,
}

impl SeqTracker {
    pub fn new() -> SeqTracker {
        SeqTracker {
            next: 1,
            ..SeqTracker::default()
        }
    }

    /// Counts the arrival of `seq` (≥ 1).
    pub fn observe(&mut self, seq: u64) -> Arrival {
        self.received += 1;
        if seq == self.next {
            self.next += 1;
            Arrival::InOrder
        } else if seq > self.next {
            let gap = seq - self.next;
            self.next = seq + 1;
            Arrival::AfterGap(gap)
        } else {
            self.out_of_order += 1;
            Arrival::OutOfOrder
        }
    }

    pub fn received(&self) -> u64 {
        self.received
    }

    /// The tally once `sent` numbers (1..=sent) were sent.
    pub fn finish(&self, sent: u64) -> SeqCounts {
        SeqCounts {
            received: self.received,
            lost: sent.saturating_sub(self.received),
            out_of_order: self.out_of_order,
        }
    }
}

impl std::ops::AddAssign for SeqCounts {
    fn add_assign(&mut self, other: SeqCounts) {
        self.received += other.received;
        self.lost += other.lost;
        self.out_of_order += other.out_of_order;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_have_the_requested_size_and_parse_back() {
        let text = stamp_message(1, 123, 40);
        assert_eq!(text.len(), 40);
        assert!(text.starts_with(r#"{"seq":1,"t":123,"pad":"xxx"#), "{text}");
        assert_eq!(parse_stamp(&text), Some(Stamp { seq: 1, t: 123 }));
        // Smaller than the bare message: no padding.
        assert_eq!(stamp_message(12, 5, 0), r#"{"seq":12,"t":5,"pad":""}"#);
        let big = stamp_message(u64::MAX, u64::MAX, 4096);
        assert_eq!(big.len(), 4096);
        assert_eq!(
            parse_stamp(&big),
            Some(Stamp {
                seq: u64::MAX,
                t: u64::MAX
            })
        );
        let value: serde_json::Value = serde_json::from_str(&big).unwrap();
        assert!(value["pad"].as_str().unwrap().chars().all(|c| c == 'x'));
        assert_eq!(parse_stamp("hello"), None);
        assert_eq!(parse_stamp(r#"{"seq":1}"#), None);
    }

    #[test]
    fn in_order_stream() {
        let mut tracker = SeqTracker::new();
        for seq in 1..=5 {
            assert_eq!(tracker.observe(seq), Arrival::InOrder);
        }
        assert_eq!(
            tracker.finish(5),
            SeqCounts {
                received: 5,
                lost: 0,
                out_of_order: 0
            }
        );
    }

    #[test]
    fn gaps_late_arrivals_and_tail_loss() {
        let mut tracker = SeqTracker::new();
        let arrivals: Vec<_> = [1, 2, 5, 3, 6, 6, 9].map(|seq| tracker.observe(seq)).into();
        assert_eq!(
            arrivals,
            [
                Arrival::InOrder,
                Arrival::InOrder,
                Arrival::AfterGap(2),
                Arrival::OutOfOrder,
                Arrival::InOrder,
                Arrival::OutOfOrder, // a duplicate
                Arrival::AfterGap(2),
            ]
        );
        // 10 sent: 4, 7, 8 and 10 never came; the duplicate 6 hides one of them.
        assert_eq!(
            tracker.finish(10),
            SeqCounts {
                received: 7,
                lost: 3,
                out_of_order: 2
            }
        );
    }

    #[test]
    fn nothing_received() {
        let tracker = SeqTracker::new();
        assert_eq!(
            tracker.finish(3),
            SeqCounts {
                received: 0,
                lost: 3,
                out_of_order: 0
            }
        );
        assert_eq!(tracker.finish(0), SeqCounts::default());
    }

    #[test]
    fn counts_add_up() {
        let mut total = SeqCounts::default();
        total += SeqCounts {
            received: 3,
            lost: 1,
            out_of_order: 0,
        };
        total += SeqCounts {
            received: 4,
            lost: 0,
            out_of_order: 2,
        };
        assert_eq!(
            total,
            SeqCounts {
                received: 7,
                lost: 1,
                out_of_order: 2
            }
        );
    }
}
