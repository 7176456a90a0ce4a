//! Cluster mode on NATS JetStream: the parts that talk to NATS, each with
//! a small async API. The token service and the writer use them; nothing
//! here knows tokens or RocksDB.
//!
//! - `connect`: the client (URLs, credentials, TLS) and the wait until
//!   JetStream answers.
//! - `node_id`: this broker's id (`<data-dir>/node.id`).
//! - `names`: bucket, stream and subject names from `cluster.prefix`.
//! - `reader`: an ordered, gap-checked stream reader that reports a lost
//!   view instead of hiding it.
//! - `kv`: a KV bucket (tokens, nodes): snapshot, watch, compare-and-set.
//! - `registry`: brokers' applied token revisions and the revocation
//!   barrier.
//! - `stream`: the ingest stream's settings, created or checked.
//! - `publish`: atomic batch publish with deduplication and fences.
//! - `follow`: a broker's durable, in-order follower of the stream.
//! - `control`: control messages on the stream (removals, retention
//!   overrides) and the purge a removal makes.
//! - `replay`: ordered reads of one application's states for downstream
//!   readers.
//!
//! Consensus, membership and replication are NATS's: nothing here
//! re-implements them.

pub mod connect;
pub mod control;
pub mod follow;
pub mod kv;
pub mod names;
pub mod node_id;
pub mod publish;
pub mod reader;
pub mod registry;
pub mod replay;
pub mod stream;

pub use connect::{connect, Nats};
pub use names::Names;

/// Whether a get-stream failure means "no such stream" (as opposed to a
/// timeout or an unreachable cluster, which are retried).
pub(crate) fn stream_not_found(e: &async_nats::jetstream::context::GetStreamError) -> bool {
    matches!(
        e.kind(),
        async_nats::jetstream::context::GetStreamErrorKind::JetStream(j)
            if j.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}
