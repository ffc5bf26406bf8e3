//! Per-kind counters since start, in the terms Triton's `ModelStatistics` uses: requests
//! answered OK and failed (arrival to answer), and per request the time queued, in
//! preprocessing, in the model and in postprocessing; per batch size the batches run and their
//! model time. The Open Inference Protocol's statistics rpc reads these; Prometheus has its own
//! histograms ([`crate::telemetry`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::engine::queue::Kind;

/// A count and the total of its durations.
#[derive(Debug, Default)]
struct Tally {
    count: AtomicU64,
    ns: AtomicU64,
}

impl Tally {
    fn add(&self, d: Duration) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.ns.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    fn read(&self) -> Totals {
        Totals {
            count: self.count.load(Ordering::Relaxed),
            ns: self.ns.load(Ordering::Relaxed),
        }
    }
}

/// A count and its total duration in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub count: u64,
    pub ns: u64,
}

/// Where one answered request spent its time.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestTimes {
    pub total: Duration,
    pub input: Duration,
    pub queue: Duration,
    pub infer: Duration,
    pub output: Duration,
}

#[derive(Debug, Default)]
struct KindCounters {
    success: Tally,
    fail: Tally,
    queue: Tally,
    input: Tally,
    infer: Tally,
    output: Tally,
    images: AtomicU64,
    batches: AtomicU64,
    last_ms: AtomicU64,
    /// Batch size → model time of batches of that size.
    by_size: Mutex<BTreeMap<usize, (u64, u64)>>,
}

/// One kind's counters as read at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KindStatistics {
    pub success: Totals,
    pub fail: Totals,
    pub queue: Totals,
    pub compute_input: Totals,
    pub compute_infer: Totals,
    pub compute_output: Totals,
    /// Images computed.
    pub inference_count: u64,
    /// Batches run.
    pub execution_count: u64,
    /// Milliseconds since the epoch of the last batch (0: none yet).
    pub last_inference_ms: u64,
    /// (batch size, model time of the batches of that size), by size.
    pub batches: Vec<(usize, Totals)>,
}

#[derive(Debug, Default)]
pub struct Statistics {
    kinds: [KindCounters; 2],
}

impl Statistics {
    /// A request answered, OK or not.
    pub fn request(&self, kind: Kind, ok: bool, times: RequestTimes) {
        let c = &self.kinds[kind.index()];
        if !ok {
            c.fail.add(times.total);
            return;
        }
        c.success.add(times.total);
        c.input.add(times.input);
        c.queue.add(times.queue);
        c.infer.add(times.infer);
        c.output.add(times.output);
    }

    /// A batch of `size` images ran for `model` time.
    pub fn batch(&self, kind: Kind, size: usize, model: Duration) {
        let c = &self.kinds[kind.index()];
        c.images.fetch_add(size as u64, Ordering::Relaxed);
        c.batches.fetch_add(1, Ordering::Relaxed);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        c.last_ms.fetch_max(now, Ordering::Relaxed);
        let mut by_size = c.by_size.lock().unwrap_or_else(|p| p.into_inner());
        let entry = by_size.entry(size).or_default();
        entry.0 += 1;
        entry.1 += model.as_nanos() as u64;
    }

    pub fn read(&self, kind: Kind) -> KindStatistics {
        let c = &self.kinds[kind.index()];
        let batches = c
            .by_size
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(&size, &(count, ns))| (size, Totals { count, ns }))
            .collect();
        KindStatistics {
            success: c.success.read(),
            fail: c.fail.read(),
            queue: c.queue.read(),
            compute_input: c.input.read(),
            compute_infer: c.infer.read(),
            compute_output: c.output.read(),
            inference_count: c.images.load(Ordering::Relaxed),
            execution_count: c.batches.load(Ordering::Relaxed),
            last_inference_ms: c.last_ms.load(Ordering::Relaxed),
            batches,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_batches_are_counted_per_kind() {
        let s = Statistics::default();
        let ms = Duration::from_millis;
        let times = RequestTimes {
            total: ms(10),
            input: ms(1),
            queue: ms(2),
            infer: ms(6),
            output: ms(1),
        };
        s.request(Kind::Embed, true, times);
        s.request(Kind::Embed, false, times);
        s.batch(Kind::Embed, 4, ms(6));
        s.batch(Kind::Embed, 4, ms(4));
        s.batch(Kind::Embed, 1, ms(1));
        let e = s.read(Kind::Embed);
        assert_eq!(
            e.success,
            Totals {
                count: 1,
                ns: 10_000_000
            }
        );
        assert_eq!(e.fail.count, 1);
        assert_eq!(e.queue.ns, 2_000_000);
        assert_eq!((e.inference_count, e.execution_count), (9, 3));
        assert_eq!(
            e.batches,
            vec![
                (
                    1,
                    Totals {
                        count: 1,
                        ns: 1_000_000
                    }
                ),
                (
                    4,
                    Totals {
                        count: 2,
                        ns: 10_000_000
                    }
                )
            ]
        );
        assert!(e.last_inference_ms > 0);
        assert_eq!(s.read(Kind::Complete), KindStatistics::default());
    }
}
