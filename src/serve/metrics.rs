//! `/metrics`: the server's Prometheus registry, rendered in the text exposition format.
//!
//! Gauges of the engine's state (requests running and waiting, slots in use) are read from
//! the engine when scraped; counters and histograms are updated as requests go.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Every metric the server exports, registered in its own registry.
pub struct Metrics {
    registry: Registry,
    pub running: IntGauge,
    pub waiting: IntGauge,
    pub slots_in_use: IntGauge,
    pub slots: IntGauge,
    pub prompt_tokens: IntCounter,
    pub generated_tokens: IntCounter,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    /// HTTP answers by endpoint and status code.
    pub requests: IntCounterVec,
    /// Generations by how they ended: stop, length, cancelled, error.
    pub finished: IntCounterVec,
}

fn buckets(from: f64, factor: f64, n: usize) -> Vec<f64> {
    prometheus::exponential_buckets(from, factor, n).expect("fixed, valid bucket parameters")
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry =
            Registry::new_custom(Some("ngpt".into()), None).expect("a valid, fixed metric prefix");
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("a valid, fixed metric name");
            registry
                .register(Box::new(g.clone()))
                .expect("each metric registered once");
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("a valid, fixed metric name");
            registry
                .register(Box::new(c.clone()))
                .expect("each metric registered once");
            c
        };
        let histogram = |name: &str, help: &str, b: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(b))
                .expect("a valid, fixed metric name");
            registry
                .register(Box::new(h.clone()))
                .expect("each metric registered once");
            h
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)
                .expect("a valid, fixed metric name");
            registry
                .register(Box::new(c.clone()))
                .expect("each metric registered once");
            c
        };
        Metrics {
            running: gauge("requests_running", "Requests generating in an engine slot"),
            waiting: gauge("requests_waiting", "Requests queued for a slot"),
            slots_in_use: gauge("slots_in_use", "KV-cache slots held by a sequence"),
            slots: gauge("slots", "KV-cache slots (--max-batch)"),
            prompt_tokens: counter("prompt_tokens_total", "Prompt tokens of admitted requests"),
            generated_tokens: counter("generation_tokens_total", "Tokens generated"),
            ttft: histogram(
                "time_to_first_token_seconds",
                "Seconds from a request's arrival to its first generated token",
                buckets(0.001, 2.0, 18),
            ),
            itl: histogram(
                "inter_token_latency_seconds",
                "Seconds between consecutive generated tokens of a request",
                buckets(0.0005, 2.0, 16),
            ),
            e2e: histogram(
                "request_duration_seconds",
                "Seconds from a request's arrival to its last token",
                buckets(0.005, 2.0, 16),
            ),
            requests: counter_vec(
                "http_requests_total",
                "HTTP requests answered, by endpoint and status code",
                &["endpoint", "status"],
            ),
            finished: counter_vec(
                "requests_finished_total",
                "Generations ended, by finish reason (stop, length, cancelled, error)",
                &["reason"],
            ),
            registry,
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail on I/O; a metric family that fails to encode is
        // skipped rather than failing the scrape.
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .ok();
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new();
        m.slots.set(4);
        m.generated_tokens.inc_by(3);
        m.ttft.observe(0.02);
        m.requests.with_label_values(&["completions", "200"]).inc();
        let text = m.render();
        assert!(text.contains("# TYPE ngpt_slots gauge"), "{text}");
        assert!(text.contains("ngpt_slots 4"), "{text}");
        assert!(text.contains("ngpt_generation_tokens_total 3"), "{text}");
        assert!(
            text.contains("ngpt_time_to_first_token_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains(r#"ngpt_http_requests_total{endpoint="completions",status="200"} 1"#),
            "{text}"
        );
    }
}
