//! Metrics of cluster-mode ingest: the writer's publishing onto the ingest
//! stream and the materializer that applies the stream to the read model.
//! Registered only in cluster mode; counted per batch, never per message.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone)]
pub struct ClusterMetrics {
    /// Atomic batches the stream stored.
    pub batches_published: Counter,
    /// States in them.
    pub messages_published: Counter,
    /// Batches the stream did not store: their requests were refused.
    pub publish_not_stored: Counter,
    /// Batches whose outcome stayed unknown past the duplicate window:
    /// their requests were answered with an error though they may be
    /// stored (see `writer::cluster`).
    pub publish_unsettled: Counter,
    /// From hand-off by the writer thread to the stream's acknowledgement.
    pub publish_seconds: Histogram,
    /// States per published batch.
    pub batch_messages: Histogram,
    /// States the materializer applied to this broker's read model.
    pub materialized: Counter,
    /// Stream messages the materializer could not apply (not a state
    /// Sluice publishes); skipped the same way on every broker.
    pub materialize_skipped: Counter,
    /// Stream sequence of the last state applied to the read model.
    pub applied_seq: Gauge,
    /// Stream sequences from the last state applied to the newest state in
    /// the stream (0: caught up; the rare fences in between count too).
    pub lag: Gauge,
}

impl ClusterMetrics {
    pub fn register(registry: &mut Registry) -> ClusterMetrics {
        let publish_failures = Family::<Vec<(String, String)>, Counter>::default();
        let outcome =
            |o: &str| publish_failures.get_or_create_owned(&vec![("outcome".into(), o.into())]);
        let m = ClusterMetrics {
            batches_published: Counter::default(),
            messages_published: Counter::default(),
            publish_not_stored: outcome("not_stored"),
            publish_unsettled: outcome("unsettled"),
            publish_seconds: Histogram::new(exponential_buckets(0.000_1, 2.0, 16)),
            batch_messages: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            materialized: Counter::default(),
            materialize_skipped: Counter::default(),
            applied_seq: Gauge::default(),
            lag: Gauge::default(),
        };
        registry.register(
            "sluice_cluster_batches_published",
            "Atomic batches the ingest stream stored",
            m.batches_published.clone(),
        );
        registry.register(
            "sluice_cluster_messages_published",
            "States published to the ingest stream and acknowledged",
            m.messages_published.clone(),
        );
        registry.register(
            "sluice_cluster_publish_failures",
            "Batches not acknowledged by the ingest stream, by outcome: not_stored (requests refused, nothing stored) or unsettled (answered with an error after the duplicate window; may be stored)",
            publish_failures,
        );
        registry.register(
            "sluice_cluster_publish_duration_seconds",
            "From the writer's hand-off to the ingest stream's acknowledgement of a batch",
            m.publish_seconds.clone(),
        );
        registry.register(
            "sluice_cluster_batch_messages",
            "States per atomic batch published",
            m.batch_messages.clone(),
        );
        registry.register(
            "sluice_cluster_materialized_messages",
            "States applied to this broker's read model from the ingest stream",
            m.materialized.clone(),
        );
        registry.register(
            "sluice_cluster_materialize_skipped_messages",
            "Stream messages the materializer skipped because they are not valid states",
            m.materialize_skipped.clone(),
        );
        registry.register(
            "sluice_cluster_materialize_applied_seq",
            "Stream sequence of the last state applied to this broker's read model",
            m.applied_seq.clone(),
        );
        registry.register(
            "sluice_cluster_materialize_lag_messages",
            "Stream sequences from the last state this broker's read model applied to the newest state in the ingest stream (0: caught up)",
            m.lag.clone(),
        );
        m
    }
}
