//! Token management: the admin operations on top of the in-memory
//! [`Registry`](crate::auth::Registry) and the store.
//!
//! - `request`: the create and update bodies, validated as they are read;
//! - `json`: a token record as the admin API shows it;
//! - `service`: the operations. Every change is persisted (fsynced) before
//!   it is applied in memory, applied before the call returns (so a revoke
//!   is in force for every listener once its response is sent), and runs
//!   to completion even when its caller goes away;
//! - `load`: reading the store back at start-up, repairing what it can.
//! - cluster mode: `plane` (the tokens in a KV bucket shared by every
//!   broker: loading it, writing with compare-and-set, the revocation
//!   barrier), `follow` (applying the bucket's changes to the registry,
//!   and failing closed when that stops), `metrics`, and `import`
//!   (copying a standalone broker's tokens into the bucket).
//!
//! The record itself, [`TokenRecord`](crate::auth::TokenRecord), is one
//! type from request to store and back.

mod follow;
mod import;
mod json;
mod load;
mod metrics;
mod plane;
mod request;
mod service;

pub use import::{import, Imported};
pub use json::TokenJson;
pub use metrics::PlaneMetrics;
pub use plane::{ClusterStatus, NodeStatus, Plane, PlaneConfig};
pub use request::{parse_create, parse_update, CreateToken, UpdateToken, MAX_NAME_CHARS};
pub use service::{Enforced, TokenLimits, TokenService};

use crate::auth::{AuthorityError, Exceeds};

/// Why a broker in cluster mode refuses everything while its view of the
/// token bucket is stale (the detail of its 503s and of `/healthz`).
pub const STALE: &str =
    "this broker has lost its view of the cluster's tokens and refuses requests until it is back; try another broker";
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The caller's token stopped being usable before the change could be
    /// made (revoked or deleted concurrently).
    #[error("unauthorized")]
    Unauthorized,
    #[error("not found")]
    NotFound,
    #[error("exceeds parent: {0}")]
    ExceedsParent(#[from] Exceeds),
    /// The caller may see the token but not make this change to it.
    #[error("forbidden: {0}")]
    Forbidden(#[from] AuthorityError),
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored record that cannot be read: nothing can be repaired without
    /// guessing what it granted, so the broker does not start.
    #[error("stored token record {index} is unreadable: {reason}")]
    Unreadable { index: usize, reason: String },
    #[error("internal error: {0}")]
    Internal(String),
    /// Cluster mode: the token bucket did not answer (or this broker's
    /// view of it is stale); the change was not made, or its outcome is
    /// unknown.
    #[error("the cluster's token bucket is unavailable: {0}")]
    Unavailable(String),
    /// Cluster mode: other brokers kept changing the token while this one
    /// tried to.
    #[error("the token was changed concurrently too many times; try again")]
    Conflict,
    /// Cluster mode: the token bucket or node registry cannot be used at
    /// all (settings that break a guarantee, a refused subscription).
    #[error("cluster: {0}")]
    Cluster(String),
}
