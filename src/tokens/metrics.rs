//! Metrics of the cluster token plane: how far this broker's view of the
//! token bucket lags, whether it is stale, and what revocation barriers
//! cost. Registered only in cluster mode; token changes are rare, so each
//! is counted on its own.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone)]
pub struct PlaneMetrics {
    /// The token-bucket revision this broker has applied.
    pub revision: Gauge,
    /// Changes still to apply after the last one applied (revisions
    /// behind, as the server counted).
    pub pending: Gauge,
    /// From a change being stored in the bucket (server clock) to this
    /// broker applying it (its own clock).
    pub apply_delay_seconds: Histogram,
    /// 1 while this broker refuses requests because its view is stale.
    pub stale: Gauge,
    /// Times the watch of the bucket was lost and re-opened.
    pub view_losses: Counter,
    /// How long revoking calls waited for every live broker.
    pub barrier_seconds: Histogram,
    /// Revoking calls answered 202 because a broker had not confirmed in
    /// time.
    pub barrier_timeouts: Counter,
}

impl PlaneMetrics {
    pub fn register(registry: &mut Registry) -> PlaneMetrics {
        let m = PlaneMetrics {
            revision: Gauge::default(),
            pending: Gauge::default(),
            apply_delay_seconds: Histogram::new(exponential_buckets(0.000_25, 2.0, 16)),
            stale: Gauge::default(),
            view_losses: Counter::default(),
            barrier_seconds: Histogram::new(exponential_buckets(0.000_25, 2.0, 16)),
            barrier_timeouts: Counter::default(),
        };
        registry.register(
            "sluice_cluster_token_revision",
            "Token-bucket revision this broker has applied",
            m.revision.clone(),
        );
        registry.register(
            "sluice_cluster_token_pending_changes",
            "Token-bucket changes still to apply after the last one applied",
            m.pending.clone(),
        );
        registry.register(
            "sluice_cluster_token_apply_delay_seconds",
            "From a token change being stored in the bucket to this broker applying it",
            m.apply_delay_seconds.clone(),
        );
        registry.register(
            "sluice_cluster_token_view_stale",
            "1 while this broker refuses connections and requests because its view of the token bucket is stale",
            m.stale.clone(),
        );
        registry.register(
            "sluice_cluster_token_view_losses",
            "Times the watch of the token bucket was lost and opened again",
            m.view_losses.clone(),
        );
        registry.register(
            "sluice_cluster_barrier_wait_seconds",
            "How long a revoking admin call waited for every live broker to apply it",
            m.barrier_seconds.clone(),
        );
        registry.register(
            "sluice_cluster_barrier_timeouts",
            "Revoking admin calls answered 202 because a broker had not confirmed in time",
            m.barrier_timeouts.clone(),
        );
        m
    }
}
