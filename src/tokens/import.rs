//! Migration to cluster mode (`sluice cluster import --from-data-dir`):
//! copies a standalone broker's tokens into the cluster's token bucket with
//! their ids, hashes and tree intact, so every device and application
//! keeps its secret.
//!
//! Nothing is overwritten: if the bucket holds any of the ids already,
//! nothing is imported. Records are written parents first, so a broker
//! following the bucket meanwhile loads each one as it arrives. lastUsedAt
//! is not part of a record (in cluster mode it is each broker's own): a
//! broker started on the imported data directory keeps it.

use std::collections::HashSet;

use serde::Serialize;

use super::load::{insert_in_order, parse_record, Ordered};
use super::plane::bucket_error;
use super::TokenError;
use crate::auth::Registry;
use crate::cluster::kv::{Kv, KvError};
use crate::store::Store;

/// What an import did.
#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Imported {
    pub imported: usize,
    /// Tokens of the source whose parent is missing there: unusable, so
    /// not imported (a standalone broker would delete them at start).
    pub skipped_orphans: Vec<String>,
}

/// Copies every token of `store` into `bucket`, parents first.
pub async fn import(store: &Store, bucket: &Kv) -> Result<Imported, TokenError> {
    let mut records = Vec::new();
    for (index, (bytes, _)) in store.load_tokens()?.into_iter().enumerate() {
        let r = parse_record(&bytes, index)?;
        let value = serde_json::to_vec(&r).map_err(|e| TokenError::Internal(e.to_string()))?;
        records.push((r, value));
    }
    // Putting them into a scratch registry finds the order (parents first)
    // and the orphans, exactly as loading does.
    let Ordered {
        inserted: ordered,
        orphans,
    } = insert_in_order(records, &Registry::new())?;
    let existing: HashSet<String> = bucket
        .snapshot()
        .await
        .map_err(bucket_error)?
        .entries
        .into_iter()
        .map(|e| e.key)
        .collect();
    let mut clashes: Vec<&str> = ordered
        .iter()
        .map(|(id, _)| id.as_str())
        .filter(|id| existing.contains(*id))
        .collect();
    if !clashes.is_empty() {
        clashes.sort_unstable();
        return Err(TokenError::BadRequest(format!(
            "the token bucket already holds {} of these ids ({}); nothing was imported",
            clashes.len(),
            clashes.join(", ")
        )));
    }
    let mut imported = 0;
    for (id, value) in ordered {
        match bucket.create(&id, value.into()).await {
            Ok(_) => imported += 1,
            Err(KvError::AlreadyExists) => {
                return Err(TokenError::BadRequest(format!(
                    "token {id} was created in the bucket during the import; {imported} tokens were imported before it, the rest were not"
                )))
            }
            Err(e) => {
                return Err(TokenError::Unavailable(format!(
                    "{e}; {imported} tokens were imported, the rest were not"
                )))
            }
        }
    }
    Ok(Imported {
        imported,
        skipped_orphans: orphans.into_iter().map(|(id, _)| id).collect(),
    })
}
