//! The admin operations on tokens.
//!
//! Every change is one critical section under the change lock: check the
//! caller again, validate, persist, then apply in memory. It runs in a task
//! of its own, so a caller that goes away (an HTTP client hanging up drops
//! its handler's future) cannot stop it between persist and apply: a change
//! happens whole, or not at all, whether or not anybody hears the answer.
//!
//! Standalone, "persist" is an fsynced write to the store and "apply" a
//! call on the registry. In cluster mode (`plane`), the change first
//! catches up with the token bucket, is validated against the registry,
//! written to the bucket with compare-and-set on the revision it was
//! validated against (a conflict validates again, up to
//! `MAX_ATTEMPTS` times), and applied by the follower like everybody
//! else's; the call waits until it has been, and a revoking one (after
//! the change lock is released) until every live broker has.

use std::future::Future;
use std::sync::Arc;

use ring::rand::SystemRandom;
use tokio::sync::Mutex;

use super::load::{load, Loaded};
use super::plane::Plane;
use super::request::{CreateToken, UpdateToken};
use super::TokenError;
use crate::auth::{
    attenuate, status_change, Registry, Requested, Revoker, Status, TokenEntry, TokenRecord,
};
use crate::config::TokensConfig;
use crate::secret::TokenSecret;
use crate::store::{Store, StoreError};
use crate::timefmt;

/// The configured bounds on what admin calls may create.
#[derive(Clone, Copy, Debug)]
pub struct TokenLimits {
    /// Longest explicit device list on one token.
    pub max_devices: usize,
    /// Most tokens one application may hold.
    pub max_per_application: usize,
    /// Longest chain from the root admin token down to a token.
    pub max_chain_depth: usize,
}

impl From<&TokensConfig> for TokenLimits {
    fn from(c: &TokensConfig) -> TokenLimits {
        TokenLimits {
            max_devices: c.max_devices_per_token,
            max_per_application: c.max_per_application,
            max_chain_depth: c.max_chain_depth,
        }
    }
}

/// Writes in cluster mode that lose a compare-and-set race validate again
/// against the newer record and retry, this many times in all; then the
/// call answers 409 conflict.
const MAX_ATTEMPTS: usize = 8;

/// What a change did, and (for a revocation in cluster mode) the brokers
/// that had not confirmed they enforce it when `cluster.barrier_timeout`
/// ran out: empty when every live broker did, and always standalone.
#[derive(Debug)]
pub struct Enforced<T> {
    pub value: T,
    pub unconfirmed: Vec<String>,
}

pub struct TokenService {
    registry: Arc<Registry>,
    /// Standalone: the tokens and their lastUsedAt. Cluster mode: only
    /// this broker's lastUsedAt of each token.
    store: Store,
    /// Cluster mode: the token bucket every broker shares.
    plane: Option<Arc<Plane>>,
    rng: SystemRandom,
    /// Serialises admin changes so "check, persist, apply" is atomic with
    /// respect to other changes. Never taken on the ingest path. Callers
    /// queue on it while they can still give up harmlessly; the change
    /// task then holds it, so at most one change is in flight.
    changes: Arc<Mutex<()>>,
    limits: TokenLimits,
}

impl TokenService {
    /// Loads every stored token into the registry (see `load`).
    pub fn load(
        store: Store,
        registry: Arc<Registry>,
        limits: TokenLimits,
    ) -> Result<TokenService, TokenError> {
        let Loaded { tokens, orphans } = load(&store, &registry)?;
        if !orphans.is_empty() {
            tracing::warn!(
                deleted = orphans.len(),
                "deleted stored tokens whose parent no longer exists"
            );
        }
        tracing::debug!(tokens, "stored tokens loaded");
        Ok(TokenService {
            registry,
            store,
            plane: None,
            rng: SystemRandom::new(),
            changes: Arc::new(Mutex::new(())),
            limits,
        })
    }

    /// Cluster mode: the tokens are the plane's (already loaded into
    /// `registry`); `store` keeps this broker's lastUsedAt.
    pub fn clustered(
        store: Store,
        registry: Arc<Registry>,
        limits: TokenLimits,
        plane: Arc<Plane>,
    ) -> TokenService {
        TokenService {
            registry,
            store,
            plane: Some(plane),
            rng: SystemRandom::new(),
            changes: Arc::new(Mutex::new(())),
            limits,
        }
    }

    /// Cluster mode's token plane.
    pub fn plane(&self) -> Option<&Arc<Plane>> {
        self.plane.as_ref()
    }

    /// Cluster mode, on a clean shutdown: stops following the bucket and
    /// leaves the node registry, so revocations stop waiting for this
    /// broker at once.
    pub async fn leave(&self) {
        if let Some(plane) = &self.plane {
            plane.leave().await;
        }
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn limits(&self) -> TokenLimits {
        self.limits
    }

    /// Runs one change to completion. The lock is taken here, where
    /// dropping this future is harmless (nothing has happened yet); the
    /// change itself runs in a spawned task that holds the lock, so it
    /// finishes even if this future is dropped while awaiting it. A change
    /// that returns a bucket revision to enforce (a revocation in cluster
    /// mode) then waits, in the same task but without the lock, until
    /// every live broker has applied it.
    async fn change<T, Fut>(
        self: &Arc<Self>,
        f: impl FnOnce(Arc<TokenService>) -> Fut,
    ) -> Result<Enforced<T>, TokenError>
    where
        T: Send + 'static,
        Fut: Future<Output = Result<(T, Option<u64>), TokenError>> + Send + 'static,
    {
        let guard = self.changes.clone().lock_owned().await;
        let change = f(self.clone());
        let plane = self.plane.clone();
        tokio::spawn(async move {
            let out = change.await;
            drop(guard);
            let (value, enforce) = out?;
            let unconfirmed = match (enforce, plane) {
                (Some(revision), Some(plane)) => plane.barrier(revision).await,
                _ => Vec::new(),
            };
            Ok(Enforced { value, unconfirmed })
        })
        .await
        .map_err(|e| TokenError::Internal(format!("admin change task: {e}")))?
    }

    /// Mints a token for `app` on behalf of `caller` (already checked to
    /// hold `token.create` there, or to be root). Returns the record and
    /// the secret, which exists nowhere else.
    pub async fn create(
        self: &Arc<Self>,
        caller: Arc<TokenEntry>,
        app: String,
        req: CreateToken,
    ) -> Result<(TokenRecord, TokenSecret), TokenError> {
        self.change(move |svc| async move {
            let created = svc.create_now(&caller, app, req).await?;
            Ok((created, None))
        })
        .await
        .map(|c| c.value)
    }

    async fn create_now(
        &self,
        caller: &Arc<TokenEntry>,
        app: String,
        req: CreateToken,
    ) -> Result<(TokenRecord, TokenSecret), TokenError> {
        if let Some(plane) = &self.plane {
            plane.catch_up().await?;
        }
        self.still_usable(caller)?;
        let granted = attenuate(
            caller,
            &app,
            Requested {
                scopes: req.scopes,
                devices: req.devices,
                expires_at: req.expires_at,
                rate_limit: req.rate_limit,
            },
        )?;
        let deepest = self.limits.max_chain_depth;
        if caller.depth() >= deepest {
            return Err(TokenError::BadRequest(format!(
                "the new token would be {} tokens below the root, more than `tokens.max_chain_depth` ({deepest}) allows",
                caller.depth() + 1
            )));
        }
        if self.registry.count(&app) >= self.limits.max_per_application {
            return Err(self.too_many(&app));
        }
        let secret = TokenSecret::generate(&self.rng)
            .map_err(|_| TokenError::Internal("system random failed".into()))?;
        let record = TokenRecord {
            id: self.new_id()?,
            app,
            name: req.name,
            scopes: granted.scopes,
            devices: granted.devices,
            expires_at: granted.expires_at,
            status: req.status,
            // A token created inactive was deactivated by its minter.
            deactivated_by: (req.status == Status::Inactive).then(|| Revoker::of(caller)),
            parent_id: (!caller.root).then(|| caller.id.to_string()),
            created_at: timefmt::now_ms(),
            rate_limit: granted.rate_limit,
            hash: secret.hash(),
            last_used: None,
        };
        match &self.plane {
            None => {
                self.persist(&record).await?;
                self.registry
                    .insert(record.clone())
                    .map_err(|e| TokenError::Internal(e.to_string()))?;
            }
            Some(plane) => self.create_in_bucket(plane, caller, &record).await?,
        }
        Ok((record, secret))
    }

    /// Cluster mode's create: the record is stored if its id is new, and
    /// then checked again at its own revision, once this broker has
    /// applied everything stored before it. The guarantee: a create
    /// answers 201 only if, in bucket order, the whole chain above the new
    /// token was still usable and its application within
    /// `tokens.max_per_application` when it was stored. A parent deleted
    /// or deactivated on another broker after this broker validated (and
    /// before the new record landed) is seen here: the new token is then
    /// deleted again, before its secret has left this broker, so nobody
    /// can ever have used it, and the call answers as if validation had
    /// seen the change (401; 400 for the limit). A record under a parent
    /// deleted before it is never loaded by any broker.
    async fn create_in_bucket(
        &self,
        plane: &Plane,
        caller: &TokenEntry,
        record: &TokenRecord,
    ) -> Result<(), TokenError> {
        let revision = match plane.create(record).await {
            Ok(r) => r,
            // The bucket did not answer: the record may be stored all the
            // same, with a secret nobody will ever see.
            Err(e @ TokenError::Unavailable(_)) => {
                plane.discard(&record.id).await;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let verdict = match plane.wait_applied(revision).await {
            Err(e) => Err(e),
            Ok(()) if self.registry.entry(&record.id).is_none() => Err(TokenError::Unauthorized),
            Ok(()) => match self.still_usable(caller) {
                Err(e) => Err(e),
                Ok(()) if self.registry.count(&record.app) > self.limits.max_per_application => {
                    Err(self.too_many(&record.app))
                }
                Ok(()) => Ok(()),
            },
        };
        if verdict.is_err() {
            plane.discard(&record.id).await;
        }
        verdict
    }

    fn too_many(&self, app: &str) -> TokenError {
        let max = self.limits.max_per_application;
        TokenError::BadRequest(format!(
            "application {app:?} already holds {max} tokens, the most `tokens.max_per_application` allows"
        ))
    }

    /// A fresh random id (96 bits, hex), checked against the resident ones
    /// so a record is never overwritten.
    fn new_id(&self) -> Result<String, TokenError> {
        loop {
            let mut raw = [0u8; 12];
            ring::rand::SecureRandom::fill(&self.rng, &mut raw)
                .map_err(|_| TokenError::Internal("system random failed".into()))?;
            let id: String = raw.iter().map(|b| format!("{b:02x}")).collect();
            if self.registry.entry(&id).is_none() {
                return Ok(id);
            }
        }
    }

    /// The caller was authenticated before the change lock was taken; a
    /// concurrent revoke or delete in between must win, or a child could be
    /// minted under a deleted parent.
    fn still_usable(&self, caller: &TokenEntry) -> Result<(), TokenError> {
        if caller.root
            || (self.registry.entry(&caller.id).is_some() && caller.usable(timefmt::now_ms()))
        {
            Ok(())
        } else {
            Err(TokenError::Unauthorized)
        }
    }

    /// A token `caller` may see: in `app`, and a descendant unless root.
    fn visible(&self, caller: &TokenEntry, app: &str, id: &str) -> Result<TokenRecord, TokenError> {
        let entry = self.registry.entry(id).ok_or(TokenError::NotFound)?;
        if *entry.app != *app || !(caller.root || entry.descends_from(caller)) {
            return Err(TokenError::NotFound);
        }
        self.registry.record(id).ok_or(TokenError::NotFound)
    }

    pub fn get(&self, caller: &TokenEntry, app: &str, id: &str) -> Result<TokenRecord, TokenError> {
        self.visible(caller, app, id)
    }

    pub fn list(&self, caller: &TokenEntry, app: &str) -> Vec<TokenRecord> {
        self.registry.list(app, caller)
    }

    /// Renames and/or (de)activates a token. Re-activating a token whose
    /// ancestor is inactive sets its own status but it stays unusable,
    /// because usability is derived from the whole chain; re-activating
    /// one that a token above the caller deactivated is refused. In
    /// cluster mode a deactivation returns once every live broker enforces
    /// it, or names those that had not confirmed in time.
    pub async fn update(
        self: &Arc<Self>,
        caller: Arc<TokenEntry>,
        app: String,
        id: String,
        upd: UpdateToken,
    ) -> Result<Enforced<TokenRecord>, TokenError> {
        self.change(move |svc| async move {
            match svc.plane.clone() {
                None => Ok((svc.update_now(&caller, &app, &id, upd).await?, None)),
                Some(plane) => svc.update_in_bucket(&plane, &caller, &app, &id, upd).await,
            }
        })
        .await
    }

    async fn update_now(
        &self,
        caller: &TokenEntry,
        app: &str,
        id: &str,
        upd: UpdateToken,
    ) -> Result<TokenRecord, TokenError> {
        self.still_usable(caller)?;
        let record = self.changed(caller, self.visible(caller, app, id)?, &upd)?;
        self.persist(&record).await?;
        self.registry.set_name(id, record.name.clone());
        self.registry
            .set_status(id, record.status, record.deactivated_by.clone())
            .ok_or(TokenError::NotFound)
    }

    /// Cluster mode's update. Returns the record and the revision every
    /// broker must apply before the call returns: a deactivation's, or
    /// any change's this broker could not apply in time (the caller then
    /// learns which brokers did not confirm, this one among them).
    async fn update_in_bucket(
        &self,
        plane: &Plane,
        caller: &TokenEntry,
        app: &str,
        id: &str,
        upd: UpdateToken,
    ) -> Result<(TokenRecord, Option<u64>), TokenError> {
        let revoking = upd.status == Some(Status::Inactive);
        for _ in 0..MAX_ATTEMPTS {
            plane.catch_up().await?;
            self.still_usable(caller)?;
            self.visible(caller, app, id)?;
            let (current, expected) = plane.current(id).ok_or(TokenError::NotFound)?;
            let record = self.changed(caller, current, &upd)?;
            let revision = match plane.update(&record, expected).await {
                Ok(r) => r,
                Err(TokenError::Conflict) => continue,
                Err(e) => return Err(e),
            };
            let applied = plane.wait_applied(revision).await.is_ok();
            let view = match applied {
                true => self.registry.record(id).unwrap_or(record),
                false => record,
            };
            return Ok((view, (revoking || !applied).then_some(revision)));
        }
        Err(TokenError::Conflict)
    }

    /// `record` as `upd` changes it, if `caller` may (see
    /// `auth::status_change`).
    fn changed(
        &self,
        caller: &TokenEntry,
        mut record: TokenRecord,
        upd: &UpdateToken,
    ) -> Result<TokenRecord, TokenError> {
        if let Some(want) = upd.status {
            let deactivator = match &record.deactivated_by {
                Some(Revoker::Token(by)) => self.registry.entry(by),
                _ => None,
            };
            record.deactivated_by = status_change(
                caller,
                record.status,
                record.deactivated_by.as_ref(),
                deactivator.as_deref(),
                want,
            )?;
            record.status = want;
        }
        if let Some(n) = &upd.name {
            record.name = n.clone();
        }
        Ok(record)
    }

    /// Deletes a token and its whole subtree, permanently; returns the ids
    /// removed (the token's first). In cluster mode it returns once every
    /// live broker enforces it, or names those that had not confirmed in
    /// time.
    pub async fn delete(
        self: &Arc<Self>,
        caller: Arc<TokenEntry>,
        app: String,
        id: String,
    ) -> Result<Enforced<Vec<String>>, TokenError> {
        self.change(move |svc| async move {
            match svc.plane.clone() {
                None => Ok((svc.delete_now(&caller, &app, &id).await?, None)),
                Some(plane) => svc.delete_in_bucket(&plane, &caller, &app, &id).await,
            }
        })
        .await
    }

    async fn delete_now(
        &self,
        caller: &TokenEntry,
        app: &str,
        id: &str,
    ) -> Result<Vec<String>, TokenError> {
        self.still_usable(caller)?;
        self.visible(caller, app, id)?;
        let ids = self.registry.subtree(id);
        let store = self.store.clone();
        let stored = ids.clone();
        blocking(move || store.delete_tokens(&stored)).await?;
        self.registry.remove_subtree(id);
        Ok(ids)
    }

    /// The first half of removing an application (`DELETE
    /// /applications/{app}`): records the removal with the ids of every
    /// token of `app` in the store (fsynced), then removes those tokens
    /// from memory, so they stop working at once and live sessions holding
    /// them end at their next check. Returns the ids; the writer's removal
    /// batch deletes their records with the application's data, and a stop
    /// in between is finished when the store next opens
    /// (`Store::open_with`). Runs to completion like every change.
    pub async fn begin_application_removal(
        self: &Arc<Self>,
        caller: Arc<TokenEntry>,
        app: String,
    ) -> Result<Vec<String>, TokenError> {
        self.change(move |svc| async move {
            if svc.plane.is_some() {
                // The data of an application lives in every broker's read
                // model; removing it must go through the stream so every
                // broker applies it (not built yet).
                return Err(TokenError::BadRequest(
                    "removing an application is not available in cluster mode yet; delete its tokens instead".into(),
                ));
            }
            svc.still_usable(&caller)?;
            let records = svc.registry.list(&app, &TokenEntry::new_root());
            let ids: Vec<String> = records.iter().map(|r| r.id.clone()).collect();
            let store = svc.store.clone();
            let ids2 = ids.clone();
            blocking(move || store.begin_application_removal(&app, &ids2)).await?;
            for top in records.iter().filter(|r| r.parent_id.is_none()) {
                svc.registry.remove_subtree(&top.id);
            }
            Ok((ids, None))
        })
        .await
        .map(|done| done.value)
    }

    /// Cluster mode's delete: the token's own record is deleted with
    /// compare-and-set, which is the moment the whole subtree becomes
    /// unusable on every broker (usability is derived along the chain, and
    /// a record under a deleted parent is never loaded). The descendants'
    /// records are deleted after that, in the background: they only take
    /// space, and whatever a crash leaves behind is deleted by the next
    /// broker that starts.
    async fn delete_in_bucket(
        &self,
        plane: &Arc<Plane>,
        caller: &TokenEntry,
        app: &str,
        id: &str,
    ) -> Result<(Vec<String>, Option<u64>), TokenError> {
        for _ in 0..MAX_ATTEMPTS {
            plane.catch_up().await?;
            self.still_usable(caller)?;
            self.visible(caller, app, id)?;
            let (_, expected) = plane.current(id).ok_or(TokenError::NotFound)?;
            let revision = match plane.delete(id, expected).await {
                Ok(r) => r,
                Err(TokenError::Conflict) => continue,
                Err(e) => return Err(e),
            };
            // Not applied in time: the barrier names this broker too.
            let _ = plane.wait_applied(revision).await;
            let removed = plane.take_removed(id);
            let mut ids = vec![id.to_string()];
            ids.extend(removed.iter().map(|(r, _)| r.clone()));
            if !removed.is_empty() {
                let plane = plane.clone();
                tokio::spawn(async move { plane.delete_quietly(removed).await });
            }
            return Ok((ids, Some(revision)));
        }
        Err(TokenError::Conflict)
    }

    /// Persists lastUsedAt of tokens used since the last flush. Holding the
    /// change lock means a token deleted meanwhile is not written back; a
    /// failed write puts the tokens back for the next flush.
    pub async fn flush_last_used(self: &Arc<Self>) -> Result<usize, TokenError> {
        self.change(|svc| async move { Ok((svc.flush_now().await?, None)) })
            .await
            .map(|f| f.value)
    }

    async fn flush_now(&self) -> Result<usize, TokenError> {
        let used = self.registry.take_used();
        let items: Vec<(String, i64)> = used
            .iter()
            .filter(|e| self.registry.entry(&e.id).is_some())
            .map(|e| (e.id.to_string(), e.last_used()))
            .collect();
        if items.is_empty() {
            return Ok(0);
        }
        let n = items.len();
        let store = self.store.clone();
        if let Err(e) = blocking(move || store.put_last_used(&items)).await {
            self.registry.requeue_used(used);
            return Err(e);
        }
        Ok(n)
    }

    async fn persist(&self, record: &TokenRecord) -> Result<(), TokenError> {
        let bytes = serde_json::to_vec(record).map_err(|e| TokenError::Internal(e.to_string()))?;
        let store = self.store.clone();
        let id = record.id.clone();
        blocking(move || store.put_token(&id, &bytes)).await
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, TokenError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TokenError::Internal(e.to_string()))?
        .map_err(TokenError::Store)
}
