//! The server's counters and histograms, rendered as Prometheus text by `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the time histograms' buckets.
const TIME_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Upper bounds of the batch-rows histogram's buckets.
const ROW_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
/// Upper bounds of the batch-tokens histogram's buckets (padded tokens).
const TOKEN_BUCKETS: [f64; 9] = [
    64.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0,
];

/// A cumulative histogram with fixed buckets.
#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        for (c, &b) in self.counts.iter_mut().zip(self.bounds) {
            if v <= b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (c, b) in self.counts.iter().zip(self.bounds) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

/// Everything behind the lock.
struct Inner {
    requests: BTreeMap<(String, u16), u64>,
    batch_rows: Histogram,
    batch_tokens: Histogram,
    batch_adapters: Histogram,
    tokenization: Histogram,
    queue: Histogram,
    inference: Histogram,
}

/// The server's metrics.
pub(crate) struct Metrics {
    inner: Mutex<Inner>,
    /// Requests waiting for the batcher.
    pub queue_depth: AtomicI64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            inner: Mutex::new(Inner {
                requests: BTreeMap::new(),
                batch_rows: Histogram::new(&ROW_BUCKETS),
                batch_tokens: Histogram::new(&TOKEN_BUCKETS),
                batch_adapters: Histogram::new(&ROW_BUCKETS),
                tokenization: Histogram::new(&TIME_BUCKETS),
                queue: Histogram::new(&TIME_BUCKETS),
                inference: Histogram::new(&TIME_BUCKETS),
            }),
            queue_depth: AtomicI64::new(0),
        }
    }
}

impl Metrics {
    fn with(&self, f: impl FnOnce(&mut Inner)) {
        match self.inner.lock() {
            Ok(mut g) => f(&mut g),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    /// One answered `/predict` request for `adapter` (a served name, or `<unknown>`).
    pub fn request(&self, adapter: &str, status: u16) {
        self.with(|m| *m.requests.entry((adapter.to_string(), status)).or_default() += 1);
    }

    /// One forward: its rows, padded tokens and distinct adapters, and how long it took.
    pub fn batch(&self, rows: usize, tokens: usize, adapters: usize, took: Duration) {
        self.with(|m| {
            m.batch_adapters.observe(adapters as f64);
            m.batch_rows.observe(rows as f64);
            m.batch_tokens.observe(tokens as f64);
            m.inference.observe(took.as_secs_f64());
        });
    }

    /// One request's tokenization time.
    pub fn tokenization(&self, took: Duration) {
        self.with(|m| m.tokenization.observe(took.as_secs_f64()));
    }

    /// One request's wait in the queue.
    pub fn queued(&self, took: Duration) {
        self.with(|m| m.queue.observe(took.as_secs_f64()));
    }

    /// The Prometheus text exposition of everything, plus the number of adapters served.
    pub fn render(&self, adapters: usize) -> String {
        let mut out = String::new();
        let depth = self.queue_depth.load(Ordering::Relaxed).max(0);
        self.with(|m| {
            out.push_str("# HELP adapterkit_requests_total Answered /predict requests by adapter and HTTP status.\n# TYPE adapterkit_requests_total counter\n");
            for ((a, s), n) in &m.requests {
                let _ = writeln!(
                    out,
                    "adapterkit_requests_total{{adapter=\"{a}\",status=\"{s}\"}} {n}"
                );
            }
            let _ = writeln!(out, "# HELP adapterkit_queue_depth Requests waiting for the batcher.\n# TYPE adapterkit_queue_depth gauge\nadapterkit_queue_depth {depth}");
            let _ = writeln!(out, "# HELP adapterkit_adapters Adapters being served.\n# TYPE adapterkit_adapters gauge\nadapterkit_adapters {adapters}");
            m.batch_rows.render(&mut out, "adapterkit_batch_rows", "Rows per forward of the base.");
            m.batch_tokens.render(
                &mut out,
                "adapterkit_batch_tokens",
                "Padded tokens per forward of the base.",
            );
            m.batch_adapters.render(
                &mut out,
                "adapterkit_batch_adapters",
                "Distinct adapters per forward of the base.",
            );
            m.tokenization.render(
                &mut out,
                "adapterkit_tokenization_seconds",
                "Tokenization time per request.",
            );
            m.queue.render(
                &mut out,
                "adapterkit_queue_seconds",
                "Time a request waited before its first row ran.",
            );
            m.inference.render(
                &mut out,
                "adapterkit_inference_seconds",
                "Time per forward of the base (all rows of a batch).",
            );
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_counters_keyed() {
        let m = Metrics::default();
        m.batch(3, 96, 2, Duration::from_millis(7));
        m.batch(40, 1280, 1, Duration::from_millis(70));
        m.request("mr", 200);
        m.request("mr", 200);
        m.request("<unknown>", 404);
        let text = m.render(2);
        assert!(text.contains("adapterkit_requests_total{adapter=\"mr\",status=\"200\"} 2"));
        assert!(text.contains("adapterkit_requests_total{adapter=\"<unknown>\",status=\"404\"} 1"));
        assert!(text.contains("adapterkit_batch_rows_bucket{le=\"4\"} 1"));
        assert!(text.contains("adapterkit_batch_rows_bucket{le=\"64\"} 2"));
        assert!(text.contains("adapterkit_batch_rows_count 2"));
        assert!(text.contains("adapterkit_inference_seconds_bucket{le=\"0.01\"} 1"));
        assert!(text.contains("adapterkit_adapters 2"));
    }
}
