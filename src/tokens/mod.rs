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
//!
//! The record itself, [`TokenRecord`](crate::auth::TokenRecord), is one
//! type from request to store and back.

mod json;
mod load;
mod request;
mod service;

pub use json::TokenJson;
pub use request::{parse_create, parse_update, CreateToken, UpdateToken, MAX_NAME_CHARS};
pub use service::{TokenLimits, TokenService};

use crate::auth::{AuthorityError, Exceeds};
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
}
