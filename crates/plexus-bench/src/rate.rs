//! Rates (`2000/s`) and the pacing arithmetic: when the k-th event of a paced run is due.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// `count` events every `per`, e.g. 2000 per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u64,
    pub per: Duration,
}

impl Rate {
    /// The fastest rate accepted: a million events a second.
    pub const MAX_PER_SECOND: f64 = 1_000_000.0;

    pub const fn per_second(count: u64) -> Rate {
        Rate {
            count,
            per: Duration::from_secs(1),
        }
    }

    pub fn events_per_second(&self) -> f64 {
        self.count as f64 / self.per.as_secs_f64()
    }

    /// When event `k` (0-based) is due, after the start: `k × per / count`, rounded down to the
    /// nanosecond. Event 0 is due at once.
    pub fn due(&self, k: u64) -> Duration {
        let nanos = u128::from(k) * self.per.as_nanos() / u128::from(self.count);
        duration_from_nanos(nanos)
    }

    /// How many events are due strictly before `span` has passed: the number of `k` with
    /// `due(k) < span`, i.e. ⌈span × count / per⌉.
    pub fn events_in(&self, span: Duration) -> u64 {
        let numerator = span.as_nanos() * u128::from(self.count);
        let per = self.per.as_nanos();
        u64::try_from(numerator.div_ceil(per)).unwrap_or(u64::MAX)
    }

    /// How long `n` events take at this rate: the time the n-th one is due after the first.
    pub fn span_of(&self, n: u64) -> Duration {
        self.due(n)
    }
}

fn duration_from_nanos(nanos: u128) -> Duration {
    let secs = u64::try_from(nanos / 1_000_000_000).unwrap_or(u64::MAX);
    Duration::new(secs, (nanos % 1_000_000_000) as u32)
}

impl FromStr for Rate {
    type Err = String;

    /// `N/s`, `N/m`, `N/h`, `N/<duration>` (`5/100ms`), or `N` alone for per second.
    fn from_str(text: &str) -> Result<Rate, String> {
        let text = text.trim();
        let (count, per) = match text.split_once('/') {
            Some((count, per)) => (count.trim(), per.trim()),
            None => (text, "s"),
        };
        let count: u64 = count
            .parse()
            .map_err(|_| format!("{text:?}: expected a rate like 2000/s"))?;
        if count == 0 {
            return Err(format!("{text:?}: the rate must be more than 0"));
        }
        let per = match per {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            other => humantime::parse_duration(other)
                .map_err(|_| format!("{text:?}: expected a rate like 2000/s, 30/m or 5/100ms"))?,
        };
        if per.is_zero() {
            return Err(format!("{text:?}: the period must be more than 0"));
        }
        let rate = Rate { count, per };
        if rate.events_per_second() > Rate::MAX_PER_SECOND {
            return Err(format!(
                "{text:?}: at most {} per second",
                Rate::MAX_PER_SECOND as u64
            ));
        }
        Ok(rate)
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.per == Duration::from_secs(1) {
            write!(f, "{}/s", self.count)
        } else {
            write!(f, "{}/{}", self.count, humantime::format_duration(self.per))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(text: &str) -> Rate {
        text.parse().unwrap()
    }

    #[test]
    fn parses_rates() {
        assert_eq!(rate("2000/s"), Rate::per_second(2000));
        assert_eq!(rate("50"), Rate::per_second(50));
        assert_eq!(rate(" 7 / s "), Rate::per_second(7));
        assert_eq!(rate("30/m").per, Duration::from_secs(60));
        assert_eq!(rate("1/h").per, Duration::from_secs(3600));
        assert_eq!(rate("5/100ms").per, Duration::from_millis(100));
        assert_eq!(rate("5/100ms").events_per_second(), 50.0);
        for bad in [
            "",
            "x/s",
            "0/s",
            "-1/s",
            "5/0s",
            "5/fortnight",
            "2000000/s",
            "2/1us",
        ] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
        assert_eq!(rate("2000/s").to_string(), "2000/s");
        assert_eq!(rate("30/m").to_string(), "30/1m");
    }

    #[test]
    fn due_times_are_evenly_spaced() {
        let r = Rate::per_second(4);
        let due: Vec<_> = (0..6).map(|k| r.due(k)).collect();
        assert_eq!(
            due,
            [0, 250, 500, 750, 1000, 1250].map(Duration::from_millis)
        );
        // Thirds of a second round down to the nanosecond and never drift.
        let r = Rate::per_second(3);
        assert_eq!(r.due(1), Duration::from_nanos(333_333_333));
        assert_eq!(r.due(3), Duration::from_secs(1));
        assert_eq!(r.due(3_000_000), Duration::from_secs(1_000_000));
        // A period other than a second.
        assert_eq!(rate("5/100ms").due(5), Duration::from_millis(100));
        // Huge indexes do not overflow.
        assert_eq!(
            Rate::per_second(1).due(u64::MAX),
            Duration::from_secs(u64::MAX)
        );
    }

    #[test]
    fn events_within_a_span() {
        let r = Rate::per_second(50);
        assert_eq!(r.events_in(Duration::from_secs(10)), 500);
        assert_eq!(r.events_in(Duration::ZERO), 0);
        assert_eq!(r.events_in(Duration::from_nanos(1)), 1); // event 0 is due at once
        let r = Rate::per_second(3);
        assert_eq!(r.events_in(Duration::from_secs(1)), 3);
        assert_eq!(r.events_in(Duration::from_millis(1100)), 4);
        // Every event counted is due before the span ends, and the next one is not.
        for (count, ms) in [(7, 1000), (3, 999), (1000, 2500), (13, 77)] {
            let r = Rate::per_second(count);
            let span = Duration::from_millis(ms);
            let n = r.events_in(span);
            assert!(n == 0 || r.due(n - 1) < span, "{count}/s {ms}ms");
            assert!(r.due(n) >= span, "{count}/s {ms}ms");
        }
        assert_eq!(
            Rate::per_second(2000).span_of(10_000),
            Duration::from_secs(5)
        );
    }
}
