//! Reading the stored tokens back into the registry at start-up.
//!
//! Loading repairs what it can rather than refusing to start: a token whose
//! parent is gone (a change interrupted by a crash of an older version, or
//! a store edited by hand) can never be usable again, so it is deleted, and
//! logged by id. A record that cannot be read is not guessed at: the broker
//! refuses to start and says which.

use crate::auth::{Registry, Revoker, Status, TokenRecord};
use crate::store::Store;

use super::TokenError;

/// What loading found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    pub tokens: usize,
    /// Ids of tokens deleted because their parent no longer exists.
    pub orphans: Vec<String>,
}

/// Loads every stored token into `registry`, parents before children, and
/// deletes the orphans from the store.
pub fn load(store: &Store, registry: &Registry) -> Result<Loaded, TokenError> {
    let mut pending = Vec::new();
    for (index, (bytes, last_used)) in store.load_tokens()?.into_iter().enumerate() {
        let mut r = parse_record(&bytes, index)?;
        r.last_used = (last_used > 0).then_some(last_used);
        pending.push((r, ()));
    }
    let ordered = insert_in_order(pending, registry)?;
    let loaded = Loaded {
        tokens: ordered.inserted.len(),
        orphans: ordered.orphans.into_iter().map(|(id, ())| id).collect(),
    };
    if !loaded.orphans.is_empty() {
        store.delete_tokens(&loaded.orphans)?;
    }
    Ok(loaded)
}

/// A stored record (the `index`th read, for the error), as today's code
/// reads it.
pub(super) fn parse_record(bytes: &[u8], index: usize) -> Result<TokenRecord, TokenError> {
    let mut r: TokenRecord = serde_json::from_slice(bytes).map_err(|e| TokenError::Unreadable {
        index,
        reason: e.to_string(),
    })?;
    // Records from before revocation had an authority: the safe reading
    // is that the root deactivated them.
    if r.status == Status::Inactive && r.deactivated_by.is_none() {
        r.deactivated_by = Some(Revoker::Root);
    }
    Ok(r)
}

/// What [`insert_in_order`] did: ids with the caller's tags.
pub(super) struct Ordered<T> {
    /// Inserted, in insertion order (parents first).
    pub inserted: Vec<(String, T)>,
    /// Left out: their parent is neither resident nor among the records.
    pub orphans: Vec<(String, T)>,
}

/// Inserts `pending` (each record with a tag of the caller's, e.g. its
/// revision) into `registry`, each after its parent.
pub(super) fn insert_in_order<T>(
    mut pending: Vec<(TokenRecord, T)>,
    registry: &Registry,
) -> Result<Ordered<T>, TokenError> {
    // Insert in rounds: a token goes in once its parent is in. Parents are
    // always created first, but do not rely on clocks for it. What is left
    // when a round makes no progress has no parent to hang from (or hangs
    // in a cycle, which no API call can make): orphans.
    let mut inserted = Vec::with_capacity(pending.len());
    while !pending.is_empty() {
        let before = pending.len();
        let mut rest = Vec::new();
        for (r, tag) in pending {
            let ready = match &r.parent_id {
                None => true,
                Some(p) => registry.entry(p).is_some(),
            };
            if ready {
                let id = r.id.clone();
                registry
                    .insert(r)
                    .map_err(|e| TokenError::Internal(e.to_string()))?;
                inserted.push((id, tag));
            } else {
                rest.push((r, tag));
            }
        }
        if rest.len() == before {
            for (r, _) in &rest {
                tracing::warn!(
                    id = %r.id,
                    app = %r.app,
                    parent = r.parent_id.as_deref().unwrap_or(""),
                    "deleting stored token whose parent no longer exists"
                );
            }
            let orphans = rest.into_iter().map(|(r, tag)| (r.id, tag)).collect();
            return Ok(Ordered { inserted, orphans });
        }
        pending = rest;
    }
    Ok(Ordered {
        inserted,
        orphans: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Devices, Scope, Scopes};
    use crate::config::SyncMode;
    use crate::secret::TokenHash;

    fn record(id: &str, parent: Option<&str>, status: Status) -> TokenRecord {
        TokenRecord {
            id: id.into(),
            app: "app".into(),
            name: id.into(),
            scopes: Scopes::of(&[Scope::SendState, Scope::TokenCreate]),
            devices: Devices::All,
            expires_at: None,
            status,
            deactivated_by: None,
            parent_id: parent.map(String::from),
            created_at: 1,
            rate_limit: None,
            hash: TokenHash::of(id.as_bytes()),
            last_used: None,
        }
    }

    fn put(store: &Store, r: &TokenRecord) {
        store
            .put_token(&r.id, &serde_json::to_vec(r).unwrap())
            .unwrap();
    }

    #[test]
    fn orphans_are_deleted_and_the_rest_loads() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::None).unwrap();
        // c before b before a in key order: loading must not rely on it.
        put(&store, &record("c", Some("b"), Status::Active));
        put(&store, &record("b", Some("a"), Status::Active));
        put(&store, &record("a", None, Status::Inactive));
        // An orphan with a child of its own, and two tokens in a cycle.
        put(&store, &record("o1", Some("gone"), Status::Active));
        put(&store, &record("o2", Some("o1"), Status::Active));
        put(&store, &record("x", Some("y"), Status::Active));
        put(&store, &record("y", Some("x"), Status::Active));
        store
            .put_last_used(&[("o1".into(), 5), ("b".into(), 7)])
            .unwrap();

        let registry = Registry::new();
        let mut loaded = load(&store, &registry).unwrap();
        loaded.orphans.sort();
        assert_eq!(loaded.tokens, 3);
        assert_eq!(loaded.orphans, ["o1", "o2", "x", "y"]);
        assert_eq!(registry.len(), 3);
        assert_eq!(registry.record("b").unwrap().last_used, Some(7));
        assert_eq!(
            registry.record("a").unwrap().deactivated_by,
            Some(Revoker::Root)
        );
        // Gone from the store too: the next load finds nothing to repair.
        assert_eq!(store.load_tokens().unwrap().len(), 3);
        let again = load(&store, &Registry::new()).unwrap();
        assert_eq!((again.tokens, again.orphans.len()), (3, 0));
    }

    #[test]
    fn an_unreadable_record_is_not_guessed_at() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::None).unwrap();
        put(&store, &record("a", None, Status::Active));
        store
            .put_token("b", br#"{"id":"b","scope":["root"]}"#)
            .unwrap();
        let e = load(&store, &Registry::new()).unwrap_err();
        assert!(matches!(e, TokenError::Unreadable { .. }), "{e}");
    }
}
