//! Prometheus metrics. Handles are resolved once at start-up so the hot
//! path only increments atomics; writer metrics are counted per batch.

use std::sync::atomic::{AtomicUsize, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Statuses the device listener can answer; each has a pre-made counter.
pub const HTTP_STATUSES: [u16; 11] = [200, 400, 401, 403, 404, 405, 408, 413, 415, 429, 503];

pub struct Metrics {
    registry: Registry,
    http_by_status: Vec<(u16, Counter)>,
    pub messages_stored: Counter,
    pub batches: Counter,
    pub commit_errors: Counter,
    pub attribute_limit_refusals: Counter,
    pub http_connections_refused: Counter,
    pub batch_messages: Histogram,
    pub commit_seconds: Histogram,
    /// Per batch: the longest time from receiving a request or publish
    /// to its acknowledgement (its batch committed and completed).
    pub ack_latency_seconds: Histogram,
    pub queue_depth: Gauge,
    pub queue_bytes: Gauge,
    pub token_cache_entries: Gauge,
    /// Open SSE streams (both listeners).
    pub sse_streams: Gauge,
    /// States sent to live-stream consumers (SSE and MQTT subscribers),
    /// counted per frame or per batch.
    pub stream_states_sent: Counter,
    /// Live-stream consumers that fell behind the live buffer and went on
    /// from storage.
    pub stream_lags: Counter,
    rate_limited: Family<Vec<(String, String)>, Counter>,
    /// Distinct token ids in `rate_limited`, to bound its cardinality.
    rate_limited_series: AtomicUsize,
}

/// Most token ids that get their own `sluice_rate_limited_total` series;
/// later ones are counted under `token="_other"`.
pub const MAX_RATE_LIMITED_SERIES: usize = 1000;

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let http = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "sluice_http_requests",
            "Device-listener HTTP requests by response status",
            http.clone(),
        );
        let http_by_status = HTTP_STATUSES
            .iter()
            .map(|s| {
                (
                    *s,
                    http.get_or_create_owned(&vec![("status".to_string(), s.to_string())]),
                )
            })
            .collect();
        let messages_stored = Counter::default();
        registry.register(
            "sluice_messages_stored",
            "State messages committed to storage",
            messages_stored.clone(),
        );
        let batches = Counter::default();
        registry.register(
            "sluice_batches_committed",
            "Group commits written to storage",
            batches.clone(),
        );
        let commit_errors = Counter::default();
        registry.register(
            "sluice_commit_errors",
            "Group commits that failed (their requests got an error)",
            commit_errors.clone(),
        );
        let attribute_limit_refusals = Counter::default();
        registry.register(
            "sluice_attribute_limit_refusals",
            "Requests refused (nothing stored) because their device would exceed storage.max_attributes_per_device",
            attribute_limit_refusals.clone(),
        );
        let http_connections_refused = Counter::default();
        registry.register(
            "sluice_http_connections_refused",
            "Device-listener connections refused because their address already held http.max_connections_per_ip",
            http_connections_refused.clone(),
        );
        let batch_messages = Histogram::new(exponential_buckets(1.0, 2.0, 15));
        registry.register(
            "sluice_batch_messages",
            "Messages per group commit",
            batch_messages.clone(),
        );
        let commit_seconds = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        registry.register(
            "sluice_commit_duration_seconds",
            "Time to write one group commit (WAL and memtable, plus fsync if configured)",
            commit_seconds.clone(),
        );
        let ack_latency_seconds = Histogram::new(exponential_buckets(0.000_1, 2.0, 18));
        registry.register(
            "sluice_ack_latency_seconds",
            "Per group commit, the longest time from receiving a request (HTTP) or publish (MQTT) to its acknowledgement: body read, checks, queue wait and commit",
            ack_latency_seconds.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "sluice_queue_depth",
            "Requests waiting for the writer",
            queue_depth.clone(),
        );
        let queue_bytes = Gauge::default();
        registry.register(
            "sluice_queue_bytes",
            "Payload bytes waiting for the writer",
            queue_bytes.clone(),
        );
        let token_cache_entries = Gauge::default();
        registry.register(
            "sluice_token_cache_entries",
            "Application tokens resident in the token cache",
            token_cache_entries.clone(),
        );
        let sse_streams = Gauge::default();
        registry.register(
            "sluice_sse_streams",
            "Open SSE streams (GET /applications/{app}/stream) on both listeners",
            sse_streams.clone(),
        );
        let stream_states_sent = Counter::default();
        registry.register(
            "sluice_stream_states_sent",
            "States sent to live-stream consumers (SSE events and MQTT PUBLISH to subscribers)",
            stream_states_sent.clone(),
        );
        let stream_lags = Counter::default();
        registry.register(
            "sluice_stream_lags",
            "Live-stream consumers that fell behind streams.live_buffer_bytes and went on reading from storage",
            stream_lags.clone(),
        );
        let rate_limited = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "sluice_rate_limited",
            "Requests and publishes refused by a token's rate limit, by token id",
            rate_limited.clone(),
        );
        Metrics {
            rate_limited,
            rate_limited_series: AtomicUsize::new(0),
            registry,
            http_by_status,
            messages_stored,
            batches,
            commit_errors,
            attribute_limit_refusals,
            http_connections_refused,
            batch_messages,
            commit_seconds,
            ack_latency_seconds,
            queue_depth,
            queue_bytes,
            token_cache_entries,
            sse_streams,
            stream_states_sent,
            stream_lags,
        }
    }

    /// Adds sub-metrics owned by another module (e.g. MQTT).
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    pub fn http_response(&self, status: u16) {
        if let Some((_, c)) = self.http_by_status.iter().find(|(s, _)| *s == status) {
            c.inc();
        }
    }

    /// Counts a rate-limit refusal (not on the hot path: only refusals).
    pub fn rate_limited(&self, token_id: &str) {
        let mut label = vec![("token".to_string(), token_id.to_string())];
        if self.rate_limited.get(&label).is_none()
            && self.rate_limited_series.fetch_add(1, Ordering::Relaxed) >= MAX_RATE_LIMITED_SERIES
        {
            label = vec![("token".to_string(), "_other".to_string())];
        }
        self.rate_limited.get_or_create(&label).inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8192);
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_names_with_total_suffix() {
        let m = Metrics::new();
        m.http_response(200);
        m.http_response(200);
        m.messages_stored.inc_by(5);
        let text = m.render();
        assert!(
            text.contains("sluice_http_requests_total{status=\"200\"} 2"),
            "{text}"
        );
        assert!(text.contains("sluice_messages_stored_total 5"), "{text}");
        assert!(
            text.contains("sluice_commit_duration_seconds_bucket"),
            "{text}"
        );
    }
}
