//! Latency histograms (HDR, nanoseconds) shared by many connection tasks, and their summary.

use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// The highest latency recorded as itself: one hour (longer ones count as one hour).
const HIGHEST_NANOS: u64 = 3_600_000_000_000;

fn empty() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIGHEST_NANOS, 3).expect("valid histogram bounds")
}

/// Histograms split in shards, so thousands of tasks can record without contending on one lock
/// and without a histogram each (one is a few hundred KiB).
pub struct Latencies {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Latencies {
    pub fn new() -> Latencies {
        let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
        Latencies {
            shards: (0..threads * 2).map(|_| Mutex::new(empty())).collect(),
        }
    }

    /// Records one latency; `hint` (a connection's index) picks the shard.
    pub fn record(&self, hint: u64, latency: Duration) {
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX).max(1);
        let shard = &self.shards[(hint % self.shards.len() as u64) as usize];
        shard
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .saturating_record(nanos);
    }

    /// An empty histogram with the shared bounds, for a reader that records on its own and
    /// merges with [`Latencies::add`] at the end.
    pub fn histogram() -> Histogram<u64> {
        empty()
    }

    /// Records `nanos` in a histogram of [`Latencies::histogram`], as [`Latencies::record`] does.
    pub fn record_in(histogram: &mut Histogram<u64>, nanos: u64) {
        histogram.saturating_record(nanos.max(1));
    }

    /// Adds what a reader recorded on its own.
    pub fn add(&self, histogram: &Histogram<u64>) {
        self.shards[0]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .add(histogram)
            .expect("same bounds");
    }

    pub fn merged(&self) -> Histogram<u64> {
        let mut all = empty();
        for shard in &self.shards {
            let shard = shard
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            all.add(&*shard).expect("same bounds");
        }
        all
    }

    pub fn summary(&self) -> LatencySummary {
        LatencySummary::of(&self.merged())
    }
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies::new()
    }
}

/// Percentiles of a histogram, in microseconds (one decimal). All zero when nothing was recorded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub min_us: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

fn micros(nanos: f64) -> f64 {
    (nanos / 100.0).round() / 10.0
}

impl LatencySummary {
    pub fn of(histogram: &Histogram<u64>) -> LatencySummary {
        if histogram.is_empty() {
            return LatencySummary::default();
        }
        let at = |quantile: f64| micros(histogram.value_at_quantile(quantile) as f64);
        LatencySummary {
            count: histogram.len(),
            min_us: micros(histogram.min() as f64),
            mean_us: micros(histogram.mean()),
            p50_us: at(0.5),
            p90_us: at(0.9),
            p99_us: at(0.99),
            p999_us: at(0.999),
            max_us: micros(histogram.max() as f64),
        }
    }
}

/// A latency in microseconds as a person reads it: `850µs`, `12.3ms`, `1.52s`.
pub fn human(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.0}µs")
    } else if us < 1_000_000.0 {
        format!("{:.1}ms", us / 1000.0)
    } else {
        format!("{:.2}s", us / 1_000_000.0)
    }
}

impl std::fmt::Display for LatencySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.count == 0 {
            return write!(f, "no samples");
        }
        write!(
            f,
            "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (mean {}, {} samples)",
            human(self.p50_us),
            human(self.p90_us),
            human(self.p99_us),
            human(self.p999_us),
            human(self.max_us),
            human(self.mean_us),
            self.count
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_summary_is_zero() {
        assert_eq!(Latencies::new().summary(), LatencySummary::default());
        assert_eq!(LatencySummary::default().to_string(), "no samples");
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let latencies = Latencies::new();
        // 1..=1000 µs, recorded from many "connections".
        for (i, us) in (1..=1000u64).enumerate() {
            latencies.record(i as u64, Duration::from_micros(us));
        }
        let summary = latencies.summary();
        assert_eq!(summary.count, 1000);
        // Within the histogram's 3 significant digits.
        let near = |got: f64, want: f64| (got - want).abs() <= want * 0.002;
        for (got, want) in [
            (summary.min_us, 1.0),
            (summary.p50_us, 500.0),
            (summary.p90_us, 900.0),
            (summary.p99_us, 990.0),
            (summary.p999_us, 999.0),
            (summary.max_us, 1000.0),
            (summary.mean_us, 500.5),
        ] {
            assert!(near(got, want), "{got} vs {want}: {summary:?}");
        }
    }

    #[test]
    fn precision_is_three_significant_digits() {
        let latencies = Latencies::new();
        latencies.record(0, Duration::from_nanos(123_456_789));
        let summary = latencies.summary();
        // 123456.789 µs, within 0.1 %.
        assert!(
            (summary.max_us - 123_456.8).abs() / 123_456.8 < 0.001,
            "{summary:?}"
        );
        assert!(summary.p50_us <= summary.max_us);
    }

    #[test]
    fn extremes_are_clamped_not_lost() {
        let latencies = Latencies::new();
        latencies.record(1, Duration::ZERO);
        latencies.record(2, Duration::from_secs(100_000));
        let summary = latencies.summary();
        assert_eq!(summary.count, 2);
        assert_eq!(summary.min_us, 0.0);
        assert!(summary.max_us >= 3_599_000_000.0, "{summary:?}");
    }

    #[test]
    fn human_units() {
        assert_eq!(human(850.0), "850µs");
        assert_eq!(human(12_345.0), "12.3ms");
        assert_eq!(human(1_520_000.0), "1.52s");
    }
}
